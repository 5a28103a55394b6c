"""Check that a run really produced the image it was asked for.

An HTTP 200 (or a "completed" status) is not proof: the file must exist, be a complete PNG and
have the requested size in its IHDR chunk.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from benchmark.errors import OutputInvalid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# signature (8) + IHDR length (4) + type (4) + width (4) + height (4)
_HEAD_BYTES = 24
# The IEND chunk: zero length, type, fixed CRC. A file cut short while being written lacks it.
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


@dataclass(frozen=True)
class PngInfo:
    path: Path
    width: int
    height: int
    size_bytes: int


def check_png(path: str | os.PathLike[str] | None, width: int, height: int) -> PngInfo:
    """Raise :class:`OutputInvalid` unless ``path`` is a complete ``width``x``height`` PNG.

    Blocking (reads the file): call it through ``asyncio.to_thread`` from async code.
    """
    if not path:
        raise OutputInvalid("the run reported no local path for its image")
    target = Path(path)
    try:
        size = target.stat().st_size
        with open(target, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
            if size >= len(_IEND):
                handle.seek(size - len(_IEND))
                tail = handle.read(len(_IEND))
            else:
                tail = b""
    except FileNotFoundError:
        raise OutputInvalid(f"output image {target} does not exist") from None
    except OSError as exc:
        raise OutputInvalid(f"output image {target} cannot be read: {exc.strerror or exc}") from None
    return _judge(target, str(target), head, tail, size, width, height)


def check_png_data(data: bytes, where: str, width: int, height: int) -> PngInfo:
    """As :func:`check_png`, for an image fetched over HTTP (``where`` names where from)."""
    return _judge(Path(where), where, data[:_HEAD_BYTES], data[-len(_IEND):], len(data),
                  width, height)


def _judge(path: Path, target: str, head: bytes, tail: bytes, size: int, width: int,
           height: int) -> PngInfo:
    if size == 0:
        raise OutputInvalid(f"output image {target} is empty")
    if not head.startswith(PNG_SIGNATURE):
        raise OutputInvalid(f"output image {target} is not a PNG")
    if len(head) < _HEAD_BYTES or head[12:16] != b"IHDR":
        raise OutputInvalid(f"output image {target} has no IHDR header")
    got_width, got_height = struct.unpack(">II", head[16:24])
    if (got_width, got_height) != (width, height):
        raise OutputInvalid(f"output image {target} is {got_width}x{got_height}, "
                            f"expected {width}x{height}")
    if tail != _IEND:
        raise OutputInvalid(f"output image {target} is truncated (no IEND chunk)")
    return PngInfo(path, got_width, got_height, size)
