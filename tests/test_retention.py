"""Retention on real folders: what goes, what stays, and why (api/wrapper/retention.py).

The lifecycle is a small stand-in (which ids are needed, known, readable); the files, links,
folders and deletions are real.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from api.comfy import ExecutionFailure, PromptResult, PromptStatus
from api.contract.result import HTTP_FOR_FAILURE, FailureKind
from api.host.disk import format_bytes
from api.wrapper import outcomes
from api.wrapper.files_on_disk import FolderCache, scan_outputs
from api.wrapper.retention import (
    FileGuard,
    Retention,
    RetentionPolicy,
    choose_outputs,
)

MB = 1_000_000


class Lifecycle:
    def __init__(self, needed=(), known=(), readable=()):
        self.needed_ids = set(needed)
        self.known_ids = set(known)
        self.readable_ids = set(readable)
        self.asked = 0

    def needed(self) -> set[str]:
        self.asked += 1
        return set(self.needed_ids)

    def known(self, request_id: str) -> bool:
        return request_id in self.known_ids

    def readable(self, request_id: str) -> bool:
        return request_id in self.readable_ids


def output(folder: Path, request_id: str, name: str, size: int, age: float = 0.0) -> Path:
    """What the wrapper leaves for one output: ComfyUI's file and its link in the request's
    folder (one inode)."""
    original = folder / name
    original.write_bytes(os.urandom(size))
    link_dir = folder / request_id
    link_dir.mkdir(exist_ok=True)
    link = link_dir / name
    os.link(original, link)
    stamp = time.time() - age
    for path in (original, link, link_dir):
        os.utime(path, (stamp, stamp))
    return link


def folder_bytes(folder: Path) -> int:
    seen, total = set(), 0
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def retention(tmp_path: Path, lifecycle: Lifecycle, **policy) -> Retention:
    out = tmp_path / "output"
    out.mkdir(exist_ok=True)
    (tmp_path / "input").mkdir(exist_ok=True)
    (tmp_path / "temp").mkdir(exist_ok=True)
    return Retention(RetentionPolicy(**policy), lifecycle, output_folder=lambda: out,
                     input_folder=tmp_path / "input", temp_folder=tmp_path / "temp")


def run(coro):
    return asyncio.run(coro)


def test_an_expired_request_loses_its_file_and_comfyuis_original_a_readable_one_keeps_both(
        tmp_path):
    life = Lifecycle(known={"old", "fresh"}, readable={"fresh"})
    r = retention(tmp_path, life)
    out = tmp_path / "output"
    output(out, "old", "a_00001_.png", MB, age=100)
    output(out, "fresh", "a_00002_.png", MB, age=10)
    report = run(r.run())
    assert not (out / "old").exists() and not (out / "a_00001_.png").exists()
    assert (out / "fresh" / "a_00002_.png").exists() and (out / "a_00002_.png").exists()
    # Two names, one inode: the bytes count once.
    assert report.removed["outputs"].files == 2
    assert report.removed["outputs"].bytes == MB
    assert report.reasons == {"result expired": 1}
    assert report.output_bytes == MB == folder_bytes(out)


def test_a_needed_request_keeps_its_files_whatever_the_rules_say(tmp_path):
    # Running, uploading or waiting for its webhook: expired, over the cap, and asked for.
    life = Lifecycle(needed={"busy"}, known={"busy"})
    r = retention(tmp_path, life, outputs_max_bytes=1, pressure_min_age=0)
    out = tmp_path / "output"
    link = output(out, "busy", "b_00001_.png", MB, age=3600)
    report = run(r.run(want_bytes=10 * MB))
    assert link.exists() and (out / "b_00001_.png").exists()
    assert report.freed_bytes == 0
    assert "still running, uploading or waiting for their webhook" in report.short


def test_over_the_cap_the_oldest_finished_go_first_until_the_folder_fits(tmp_path):
    ids = ["r1", "r2", "r3", "r4"]
    life = Lifecycle(known=set(ids), readable=set(ids))
    r = retention(tmp_path, life, outputs_max_bytes=int(2.5 * MB))
    out = tmp_path / "output"
    for age, rid in zip((40, 30, 20, 10), ids):
        output(out, rid, f"{rid}.png", MB, age=age)
    report = run(r.run())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["r3", "r4"]
    assert folder_bytes(out) == 2 * MB <= 2.5 * MB
    assert report.reasons == {"output folder over retention.outputs_max_gb": 2}


def test_uploaded_rule_deletes_once_every_file_is_in_s3_and_keeps_a_failed_upload(tmp_path):
    life = Lifecycle(known={"up", "failed"}, readable={"up", "failed"})
    r = retention(tmp_path, life, outputs="uploaded")
    out = tmp_path / "output"
    up = output(out, "up", "u.png", MB)
    failed = output(out, "failed", "f.png", MB)
    r.finished("up", [{"type": "output", "local_path": str(up), "url": "https://s3/u.png"}])
    r.finished("failed", [{"type": "output", "local_path": str(failed),
                           "upload_error": "403"}])
    run(r.run())
    assert not up.exists() and not (out / "u.png").exists()
    assert failed.exists()


def test_asked_for_space_it_frees_old_finished_requests_and_says_why_not_the_young(tmp_path):
    life = Lifecycle(known={"old", "young"}, readable={"old", "young"})
    r = retention(tmp_path, life, pressure_min_age=60)
    out = tmp_path / "output"
    output(out, "old", "o.png", MB, age=120)
    output(out, "young", "y.png", MB, age=5)
    report = run(r.run(want_bytes=2 * MB))
    assert not (out / "old").exists()
    assert (out / "young" / "y.png").exists()
    assert report.freed_bytes == MB
    assert report.summary() == ("retention freed 1.0 MB (2 files): nothing finished is old "
                                "enough (1 finished request(s) younger than "
                                "retention.pressure_min_age = 60 s)")


def test_retention_off_frees_nothing_and_says_which_setting(tmp_path):
    life = Lifecycle(known={"old"})
    out = tmp_path / "output"
    out.mkdir()
    output(out, "old", "o.png", MB, age=120)
    for policy, words in (({"enabled": False}, "retention.enabled = false"),
                          ({"outputs": "keep"}, "retention.outputs = keep")):
        r = retention(tmp_path, life, **policy)
        report = run(r.run(want_bytes=MB))
        assert report.freed_bytes == 0 and words in report.summary()
    assert (out / "old" / "o.png").exists()


def test_a_file_a_kept_request_shares_stays_with_comfyuis_original(tmp_path):
    # A prompt ComfyUI served from its cache reports the earlier file: both requests link it.
    life = Lifecycle(known={"first", "cached"}, readable={"cached"})
    r = retention(tmp_path, life)
    out = tmp_path / "output"
    output(out, "first", "c.png", MB, age=100)
    (out / "cached").mkdir()
    os.link(out / "c.png", out / "cached" / "c.png")
    report = run(r.run())
    assert not (out / "first").exists()
    assert (out / "c.png").exists() and (out / "cached" / "c.png").exists()
    assert report.freed_bytes == 0  # the inode is still linked


def test_what_is_no_known_request_s_is_never_touched(tmp_path):
    # The operator's subfolder, a request folder of another wrapper, ComfyUI's own file.
    life = Lifecycle(known=set())
    r = retention(tmp_path, life, outputs_max_bytes=1, pressure_min_age=0)
    out = tmp_path / "output"
    output(out, "someone-else", "s.png", MB, age=1000)
    (out / "loose.png").write_bytes(b"x" * 1000)
    report = run(r.run(want_bytes=MB))
    assert (out / "someone-else" / "s.png").exists() and (out / "loose.png").exists()
    assert report.freed_files == 0
    assert "no request has files in the output folder" in report.short


def test_inputs_go_when_their_request_finished_and_recovered_ones_only_if_known(tmp_path):
    inputs = tmp_path / "input"
    inputs.mkdir()
    for name in ("done_1.png", "busy_1.png", "earlier_1.png", "earlier_2.jpg",
                 "operator_1.png", "photo.png"):
        (inputs / name).write_bytes(b"i" * 1000)
    life = Lifecycle(needed={"busy"}, known={"earlier"})
    r = retention(tmp_path, life, interval=3600)
    r.input_uploaded("done", inputs / "done_1.png")
    r.input_uploaded("busy", inputs / "busy_1.png")

    async def first_pass():
        # start() recovers what an earlier run uploaded for requests the store knows, and runs
        # a pass at once.
        await r.start()
        while r.last is None:
            await asyncio.sleep(0.01)
        await r.stop()
        return r.last

    report = run(first_pass())
    left = sorted(p.name for p in inputs.iterdir())
    assert left == ["busy_1.png", "operator_1.png", "photo.png"]
    assert report.removed["inputs"].files == 3 and report.removed["inputs"].bytes == 3000


def test_temp_files_go_by_age(tmp_path):
    life = Lifecycle()
    r = retention(tmp_path, life, temp_max_age=600)
    temp = tmp_path / "temp"
    temp.mkdir(exist_ok=True)
    old, new = temp / "ComfyUI_temp_old.png", temp / "ComfyUI_temp_new.png"
    for path, age in ((old, 3600), (new, 10)):
        path.write_bytes(b"t" * 100)
        os.utime(path, (time.time() - age,) * 2)
    report = run(r.run())
    assert not old.exists() and new.exists()
    assert report.removed["temp"].files == 1


def test_a_request_that_becomes_needed_after_the_walk_keeps_its_files(tmp_path):
    class Becomes(Lifecycle):
        def needed(self):
            self.asked += 1
            return set() if self.asked == 1 else {"reused"}  # walk: no; step: yes

    life = Becomes(known={"reused"})
    r = retention(tmp_path, life)
    out = tmp_path / "output"
    link = output(out, "reused", "x.png", MB, age=100)
    report = run(r.run())
    assert link.exists() and report.freed_files == 0


def test_deletion_in_steps_of_batch_files(tmp_path):
    ids = [f"r{i}" for i in range(7)]
    life = Lifecycle(known=set(ids))
    r = retention(tmp_path, life, batch_files=4)
    out = tmp_path / "output"
    for rid in ids:
        output(out, rid, f"{rid}.png", 10)
    report = run(r.run())
    assert report.requests == 7 and not any(out.iterdir())
    # One ask at the walk, one before each step: 7 requests x 2 files in steps of >= 4 files.
    assert life.asked == 1 + 4


def test_what_retention_remembers_stays_bounded_by_what_is_on_disk(tmp_path):
    life = Lifecycle(known=set())
    r = retention(tmp_path, life)
    out = tmp_path / "output"
    for i in range(200):
        rid = f"q{i}"
        r.finished(rid, [{"type": "output", "local_path": "x", "url": "u"}])
        r.input_uploaded(rid, tmp_path / "input" / f"{rid}_1.png")
    output(out, "q199", "last.png", 10)  # the last one is still readable
    life.readable_ids = {"q199"}
    run(r.run())
    assert r._finished == {"q199"} and r._uploaded == {"q199"}
    assert r._inputs == {}


def test_a_deletion_step_waits_for_a_writer_and_holds_new_writers_back():
    async def scenario():
        guard = FileGuard()
        events = []

        async def writer(name, hold):
            async with guard.writing():
                events.append(f"{name} in")
                await asyncio.sleep(hold)
                events.append(f"{name} out")

        async def deleter():
            async with guard.deleting():
                events.append("delete")

        first = asyncio.create_task(writer("w1", 0.05))
        await asyncio.sleep(0.01)
        deleting = asyncio.create_task(deleter())
        await asyncio.sleep(0.01)
        second = asyncio.create_task(writer("w2", 0))
        await asyncio.gather(first, deleting, second)
        return events

    assert asyncio.run(scenario()) == ["w1 in", "w1 out", "delete", "w2 in", "w2 out"]


def test_choose_outputs_is_pure_and_counts_the_cap_in_unique_bytes(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    output(out, "a", "a.png", MB, age=20)
    output(out, "b", "b.png", MB, age=10)
    inventory = scan_outputs(out, lambda name: name in {"a", "b"})
    assert inventory.bytes == 2 * MB and inventory.files == 4
    choice = choose_outputs(inventory, RetentionPolicy(outputs_max_bytes=MB), needed=set(),
                            readable=lambda rid: True, uploaded=set(), now=time.time())
    assert [c.request_id for c in choice.outputs] == ["a"] and choice.estimate == MB
    assert {Path(p.path).name for p in choice.outputs[0].files} == {"a.png"}
    assert len(choice.outputs[0].files) == 2  # the link and ComfyUI's original


def test_a_walk_opens_only_the_request_folders_that_changed_since_the_last(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    for rid in ("a", "b", "c"):
        output(out, rid, f"{rid}.png", 1000, age=60)
    output(out, "fresh", "fresh.png", 1000)  # changed a moment ago: walked again next time
    cache = FolderCache()
    first = scan_outputs(out, lambda name: len(name) > 0, cache)
    assert first.files == 8 and len(cache) == 3
    # A file slipped into "a" with its folder's time put back: the cached listing is used,
    # so the walk did not open "a" again. "b" changed as a folder does: walked, seen.
    before = os.stat(out / "a")
    (out / "a" / "sneaked.png").write_bytes(b"x" * 10)
    os.utime(out / "a", ns=(before.st_atime_ns, before.st_mtime_ns))
    (out / "b" / "b2.png").write_bytes(b"y" * 10)
    (out / "fresh" / "fresh2.png").write_bytes(b"z" * 10)
    for gone in (out / "c" / "c.png", out / "c.png"):
        gone.unlink()
    (out / "c").rmdir()
    second = scan_outputs(out, lambda name: len(name) > 0, cache)
    names = {rid: sorted(Path(f.path).name for f in r.files) for rid, r in second.requests.items()}
    assert names == {"a": ["a.png"], "b": ["b.png", "b2.png"], "fresh": ["fresh.png", "fresh2.png"]}
    assert len(cache) == 1  # "c" is forgotten; "b" and "fresh" changed within the settle time
    # Without the cache every folder is read.
    assert "sneaked.png" in {Path(f.path).name for f in
                             scan_outputs(out, lambda name: True).requests["a"].files}


@pytest.mark.parametrize("count, text", [(0, "0 B"), (999, "999 B"), (2_100_000_000, "2.1 GB"),
                                         (52_400_000, "52.4 MB")])
def test_format_bytes(count, text):
    assert format_bytes(count) == text


def test_a_node_that_cannot_write_is_a_disk_full_failure_that_says_where_and_what_to_do():
    full = PromptResult("p", PromptStatus.FAILED, [], ExecutionFailure(
        "9", "SaveImage", "OSError", "[Errno 28] No space left on device", []))
    outcome = outcomes.of_result(full, cancel_requested=False)
    assert outcome.failure is FailureKind.DISK_FULL and HTTP_FOR_FAILURE[outcome.failure] == 507
    told = outcomes.with_room(outcome, "output folder /data/output 100% full (0 B free)")
    assert told.message == (
        "disk full: ComfyUI could not write in node 9 (SaveImage): OSError: [Errno 28] No space "
        "left on device; output folder /data/output 100% full (0 B free); free space there, or "
        "let retention delete what finished requests left (retention.outputs, "
        "retention.outputs_max_gb, retention.inputs; docs/disk.md)")
    other = PromptResult("p", PromptStatus.FAILED, [], ExecutionFailure(
        "3", "KSampler", "RuntimeError", "CUDA out of memory", []))
    assert outcomes.of_result(other, cancel_requested=False).failure is FailureKind.EXECUTION
