"""Output files: give each request its own folder and describe every file in the result.

ComfyUI writes into its output folder (and subfolders). Each file of a request is hard-linked into
``<output dir>/<request_id>/`` (copied where a link is impossible): the request gets stable paths
without name collisions, and the original name stays where ComfyUI expects it, so a later prompt
served from ComfyUI's cache still finds its file.
"""

from __future__ import annotations

import base64
import functools
import logging
import mimetypes
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _unique(folder: Path, name: str, taken: set[str]) -> str:
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    candidate, n = name, 1
    while candidate in taken or (folder / candidate).exists():
        candidate = f"{stem}_{n}.{ext}" if ext else f"{stem}_{n}"
        n += 1
    taken.add(candidate)
    return candidate


def missing(outputs: list[Any], output_dir: Path) -> list[int]:
    """Blocking: indexes of the outputs that are not on disk where ComfyUI's folder says."""
    return [index for index, item in enumerate(outputs)
            if not _source(item, output_dir).is_file()]


#: Most output files `link_outputs` links on the event loop; more go to a thread.
INLINE_LINKS = 8


def link_outputs(outputs: list[Any], output_dir: Path, request_id: str, *, made: bool = False
                 ) -> list[dict[str, Any]] | None:
    """The usual case, done where it is asked: every output is a file on the request folder's
    own file system, so each is one hard link (no data is read or written: a few metadata
    calls of fixed size). None when that is not so (a file missing or on another device, more
    than INLINE_LINKS files, a link refused): `collect` then does it all in a thread.

    A trip to a thread costs two wake-ups; on a busy 2-core host that was most of what the
    wrapper added to a small request (see tests/perf/wrapper_latency.py). In the usual case
    the folder is new, so nothing in it is asked for: one mkdir and one link per file, the
    link itself saying whether the file is there and on the same device. `made`: the caller
    made the folder (empty) while the prompt ran (`OutputDelivery.prepare`), so not even the
    mkdir is left."""
    if len(outputs) > INLINE_LINKS:
        return None
    if not outputs:
        return []
    folder = output_dir / request_id
    fresh = made  # made by us: empty, and not a link to somewhere else
    if not made:
        try:
            os.mkdir(folder)
            fresh = True
        except FileExistsError:
            pass
        except OSError:
            return None
    try:
        real = _real_folder(output_dir) / request_id if fresh else folder.resolve()
    except OSError:
        return None
    taken: set[str] = set()
    made: list[Path] = []
    described = []
    for item in outputs:
        name = item.filename if fresh and item.filename not in taken else \
            _unique(folder, item.filename, taken)
        taken.add(name)
        try:
            os.link(_source(item, output_dir), folder / name)
        except OSError:
            for path in made:  # all or nothing: `collect` starts from a clean folder
                path.unlink(missing_ok=True)
            return None
        made.append(folder / name)
        described.append({**_describe(item), "filename": name, "local_path": str(real / name)})
    return described


@functools.lru_cache(maxsize=8)
def _real_folder(output_dir: Path) -> Path:
    """ComfyUI's output folder with its links resolved, once per folder and process (a
    request folder made in it is no link, so its real path is this one's plus its name)."""
    return output_dir.resolve()


def _describe(item: Any) -> dict[str, Any]:
    return {"filename": item.filename, "local_path": None, "type": item.type,
            "subfolder": item.subfolder, "node_id": item.node_id,
            "output_type": item.output_type,
            "mimetype": item.mimetype or mimetypes.guess_type(item.filename)[0]
            or "application/octet-stream"}


def _source(item: Any, output_dir: Path) -> Path:
    return Path(item.local_path) if item.local_path else output_dir / item.subfolder / item.filename


def collect(outputs: list[Any], output_dir: Path, request_id: str,
            fetched: dict[int, bytes | str] | None = None,
            folder_why: str = "comfyui.output_dir") -> list[dict[str, Any]]:
    """Blocking (file system): run it in a thread. `outputs` are the client's OutputFile objects.

    `fetched` holds, for outputs that were not on disk, their bytes from ComfyUI's `GET /view`
    (written into the request's folder) or why that failed (the entry then gets an `error` that
    names the path tried and the setting to set). `folder_why` says where the output folder came
    from, for that message.
    """
    fetched = fetched or {}
    folder = output_dir / request_id
    taken: set[str] = set()
    described: list[dict[str, Any]] = []
    for index, item in enumerate(outputs):
        entry = _describe(item)
        source = _source(item, output_dir)
        if not source.is_file():
            got = fetched.get(index)
            if not isinstance(got, bytes):
                entry["local_path"] = str(source)
                entry["error"] = (
                    f"ComfyUI reported this file but it is not at {source} (output folder "
                    f"{output_dir}, {folder_why}), and GET /view could not fetch it "
                    f"({got or 'not tried'}); set comfyui.output_dir (COMFYUI_OUTPUT_DIR) to the "
                    f"folder ComfyUI writes to")
                described.append(entry)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            name = _unique(folder, item.filename, taken)
            target = folder / name
            _write_whole(target, got)
            entry["filename"] = name
            entry["local_path"] = str(target.resolve())
            entry["fetched_via_view"] = True
            described.append(entry)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        name = _unique(folder, item.filename, taken)
        target = folder / name
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
        entry["filename"] = name
        entry["local_path"] = str(target.resolve())
        described.append(entry)
    return described


def _write_whole(target: Path, data: bytes) -> None:
    """Write to a temporary name and rename: a reader never sees half a file."""
    partial = target.with_name(f".{target.name}.partial")
    with open(partial, "wb") as handle:
        handle.write(data)
    os.replace(partial, target)


def inline_base64(entries: list[dict[str, Any]], max_bytes: int) -> None:
    """Blocking: add `data` to each file entry, or `error` when it is over the cap (never truncated)."""
    for entry in entries:
        path = entry.get("local_path")
        if not path or entry.get("error"):
            continue
        try:
            size = os.path.getsize(path)
            if size > max_bytes:
                entry["error"] = (f"not inlined as base64: {size} bytes is over the "
                                  f"{max_bytes} byte limit (api.base64_max_bytes)")
                continue
            with open(path, "rb") as handle:
                entry["data"] = base64.b64encode(handle.read()).decode("ascii")
        except OSError as exc:
            entry["error"] = f"not inlined as base64: {exc.strerror}"
