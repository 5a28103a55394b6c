"""Output files into the request's folder: hard links where they can be, copies where not, and
the same result either way."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from api.comfy import OutputFile
from api.wrapper.outputs import collect, link_outputs


def output(folder: Path, name: str, data: bytes = b"png", subfolder: str = "") -> OutputFile:
    (folder / subfolder).mkdir(parents=True, exist_ok=True)
    (folder / subfolder / name).write_bytes(data)
    return OutputFile(filename=name, subfolder=subfolder, type="output", node_id="9",
                      output_type="images", local_path=None, mimetype="image/png")


def test_outputs_are_hard_linked_into_the_request_folder_with_unique_names(tmp_path):
    outputs = [output(tmp_path, "a_00001_.png", b"one"), output(tmp_path, "a_00001_.png", b"two",
                                                                  subfolder="sub")]
    entries = link_outputs(outputs, tmp_path, "req-1")
    assert entries is not None
    assert [e["filename"] for e in entries] == ["a_00001_.png", "a_00001__1.png"]
    first, second = (Path(e["local_path"]) for e in entries)
    assert first.parent == (tmp_path / "req-1").resolve()
    assert first.stat().st_ino == (tmp_path / "a_00001_.png").stat().st_ino  # a link, no copy
    assert second.read_bytes() == b"two"
    # The same description as the thread path gives (which would then find the names taken).
    expected = collect(outputs, tmp_path, "req-2")
    assert [{k: v for k, v in e.items() if k != "local_path"} for e in entries] == \
        [{k: v for k, v in e.items() if k != "local_path"} for e in expected]


def test_a_missing_output_is_left_to_the_thread_path_untouched(tmp_path):
    outputs = [output(tmp_path, "here.png"), OutputFile(
        filename="gone.png", subfolder="", type="output", node_id="9", output_type="images",
        local_path=None, mimetype="image/png")]
    assert link_outputs(outputs, tmp_path, "req") is None
    assert not (tmp_path / "req").exists() or not any((tmp_path / "req").iterdir())
    entries = collect(outputs, tmp_path, "req")
    assert "error" in entries[1] and "COMFYUI_OUTPUT_DIR" in entries[1]["error"]


def test_an_output_on_another_file_system_is_copied(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to put ComfyUI's output folder on")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        source = output(Path(other), "x.png", b"bytes")
        outputs = [OutputFile(filename="x.png", subfolder="", type="output", node_id="9",
                              output_type="images", local_path=Path(other) / "x.png",
                              mimetype="image/png")]
        assert source.filename == "x.png"
        assert link_outputs(outputs, tmp_path, "req") is None
        (entry,) = collect(outputs, tmp_path, "req")
        copied = Path(entry["local_path"])
        assert copied.read_bytes() == b"bytes"
        assert copied.stat().st_ino != (Path(other) / "x.png").stat().st_ino


def test_a_folder_made_while_the_prompt_ran_takes_the_links(tmp_path):
    outputs = [output(tmp_path, "b_00001_.png", b"one"), output(tmp_path, "b_00001_.png", b"two",
                                                                  subfolder="sub")]
    (tmp_path / "req").mkdir()
    entries = link_outputs(outputs, tmp_path, "req", made=True)
    assert [e["filename"] for e in entries] == ["b_00001_.png", "b_00001__1.png"]
    assert [Path(e["local_path"]).read_bytes() for e in entries] == [b"one", b"two"]
    assert Path(entries[0]["local_path"]).parent == (tmp_path / "req").resolve()
