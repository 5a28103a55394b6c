"""The result store: persisted, bounded in memory, expired by age and count."""

from __future__ import annotations

import json
import os
import time

from api.wrapper.store import ResultStore


def record(request_id: str, status: str = "completed") -> dict:
    return {"id": request_id, "status": status, "message": "m", "output": []}


async def test_old_results_are_read_back_from_disk_and_memory_stays_bounded(tmp_path):
    store = ResultStore(tmp_path, ttl=3600, max_items=1000, memory_items=5)
    for n in range(50):
        await store.save(record(f"r{n}"))
    assert len(store) == 50
    assert len(store._bodies) == 5
    assert (await store.get("r0"))["id"] == "r0"   # from its file
    assert (await store.get("r49"))["id"] == "r49"  # from memory


async def test_count_limit_drops_the_oldest_with_their_files(tmp_path):
    store = ResultStore(tmp_path, ttl=3600, max_items=10)
    for n in range(15):
        await store.save(record(f"r{n}"))
    assert len(store) == 10
    assert await store.get("r0") is None and not (tmp_path / "r0.json").exists()
    assert await store.get("r14") is not None


async def test_results_older_than_the_ttl_are_gone(tmp_path):
    store = ResultStore(tmp_path, ttl=0.2, max_items=10)
    await store.save(record("old"))
    time.sleep(0.3)
    assert await store.get("old") is None


async def test_a_restart_recovers_results_and_marks_unfinished_ones(tmp_path):
    (tmp_path / "done.json").write_text(json.dumps(record("done")))
    (tmp_path / "running.json").write_text(json.dumps(record("running", "generating")))
    past = time.time() - 5
    os.utime(tmp_path / "done.json", (past, past))
    store = ResultStore(tmp_path, ttl=3600, max_items=10, memory_items=1)
    assert store.load() == 2
    running = await store.get("running")
    assert running["status"] == "failed" and "restarted" in running["message"]
    assert running["_http_status"] == 502
    assert json.loads((tmp_path / "running.json").read_text())["status"] == "failed"
    assert (await store.get("done"))["status"] == "completed"
