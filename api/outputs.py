"""Output files: give each request its own folder and describe every file in the result.

ComfyUI writes into its output folder (and subfolders). Each file of a request is hard-linked into
``<output dir>/<request_id>/`` (copied where a link is impossible): the request gets stable paths
without name collisions, and the original name stays where ComfyUI expects it, so a later prompt
served from ComfyUI's cache still finds its file.
"""

from __future__ import annotations

import base64
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


def collect(outputs: list[Any], output_dir: Path, request_id: str) -> list[dict[str, Any]]:
    """Blocking (file system): run it in a thread. `outputs` are the client's OutputFile objects."""
    folder = output_dir / request_id
    taken: set[str] = set()
    described: list[dict[str, Any]] = []
    for item in outputs:
        entry: dict[str, Any] = {
            "filename": item.filename, "local_path": None, "type": item.type,
            "subfolder": item.subfolder, "node_id": item.node_id,
            "output_type": item.output_type,
            "mimetype": item.mimetype or mimetypes.guess_type(item.filename)[0]
            or "application/octet-stream",
        }
        source = Path(item.local_path) if item.local_path else \
            output_dir / item.subfolder / item.filename
        if not source.is_file():
            entry["local_path"] = str(source)
            entry["error"] = "ComfyUI reported this file but it is not on disk"
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
