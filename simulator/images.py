"""Values that flow between simulated nodes, and the files they are read from or written to.

Images are described, not stored: an ``ImageBatch`` is a size, a batch count and one solid
colour. That is enough to write a real PNG of the right size when a node saves it, and keeps
a 4096x4096 request from costing memory. PNG files are written and parsed here with
``zlib`` and ``struct`` only, so the simulator needs no imaging library.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from simulator.errors import UnidentifiedImageError

RGB = tuple[int, int, int]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Ancillary, private, safe to copy: PNG readers skip it (the --image-bytes padding).
PAD_CHUNK = b"siMp"
# ComfyUI's SaveImage writes with compress_level 4; PreviewImage with 1.
SAVE_COMPRESS_LEVEL = 4
PREVIEW_COMPRESS_LEVEL = 1
# IDAT chunks are flushed once this much compressed data is pending, so a huge image is
# streamed to disk instead of being built in memory.
_IDAT_FLUSH_BYTES = 1 << 20


@dataclass(frozen=True)
class ImageBatch:
    """A batch of solid-colour images (ComfyUI's IMAGE type)."""

    width: int
    height: int
    batch: int = 1
    rgb: RGB = (0, 0, 0)
    has_alpha: bool = False

    def __str__(self) -> str:
        r, g, b = self.rgb
        return f"IMAGE[batch={self.batch}, {self.width}x{self.height}, #{r:02x}{g:02x}{b:02x}]"


@dataclass(frozen=True)
class Mask:
    """A batch of masks (ComfyUI's MASK type)."""

    width: int
    height: int
    batch: int = 1

    def __str__(self) -> str:
        return f"MASK[batch={self.batch}, {self.width}x{self.height}]"


@dataclass(frozen=True)
class Latent:
    """A latent batch (ComfyUI's LATENT type); sizes are in pixels, as the user gave them."""

    width: int
    height: int
    batch: int = 1
    rgb: RGB = (0, 0, 0)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The tensor shape ComfyUI would hold: [batch, 4, height // 8, width // 8]."""
        return (self.batch, 4, self.height // 8, self.width // 8)

    def __str__(self) -> str:
        return f"LATENT[shape={list(self.shape)}]"


@dataclass(frozen=True)
class ModelHandle:
    """What a checkpoint loader hands on: a name, standing in for MODEL, CLIP or VAE."""

    kind: str
    ckpt_name: str

    def __str__(self) -> str:
        return f"{self.kind}({self.ckpt_name})"


@dataclass(frozen=True)
class Conditioning:
    """Encoded text (ComfyUI's CONDITIONING type)."""

    text: str

    def __str__(self) -> str:
        return f"CONDITIONING({self.text[:40]!r})"


@dataclass(frozen=True)
class ImageFileInfo:
    """What the simulator learns from an input image file."""

    width: int
    height: int
    rgb: RGB
    has_alpha: bool
    frames: int = 1


def invert(rgb: RGB) -> RGB:
    return (255 - rgb[0], 255 - rgb[1], 255 - rgb[2])


def colour_from_int(color: int) -> RGB:
    """EmptyImage's ``color`` input is 0xRRGGBB."""
    return ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def write_png(path: str, width: int, height: int, rgb: RGB, text: dict[str, str] | None = None,
              compress_level: int = SAVE_COMPRESS_LEVEL, min_bytes: int = 0) -> int:
    """Write a solid-colour 8-bit RGB PNG with optional tEXt chunks; return its size in bytes.

    `min_bytes` pads the file to at least that size with a private ancillary chunk of random
    bytes (readers skip it), so that it takes as much disk as a real image would.
    Blocking file I/O: call it through ``asyncio.to_thread`` from async code.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    with open(path, "wb") as out:
        out.write(PNG_SIGNATURE)
        out.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        for key, value in (text or {}).items():
            out.write(_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1")))
        _write_idat(out, width, height, rgb, compress_level)
        missing = min_bytes - out.tell() - 2 * 12  # the padding chunk's and IEND's framing
        if missing > 0:
            out.write(_chunk(PAD_CHUNK, os.urandom(missing)))
        out.write(_chunk(b"IEND", b""))
        return out.tell()


def _write_idat(out: BinaryIO, width: int, height: int, rgb: RGB, compress_level: int) -> None:
    # Every scanline is filter byte 0 followed by the same pixels, so one row is built once.
    row = b"\x00" + bytes(rgb) * width
    compressor = zlib.compressobj(compress_level)
    pending = bytearray()
    for _ in range(height):
        pending += compressor.compress(row)
        if len(pending) >= _IDAT_FLUSH_BYTES:
            out.write(_chunk(b"IDAT", bytes(pending)))
            pending.clear()
    pending += compressor.flush()
    out.write(_chunk(b"IDAT", bytes(pending)))


def read_png_text(path: str) -> dict[str, str]:
    """The tEXt chunks of a PNG (used by tests to check the embedded prompt)."""
    found: dict[str, str] = {}
    for kind, data in _iter_png_chunks(_read_head(path, None)):
        if kind == b"tEXt":
            key, _, value = data.partition(b"\x00")
            found[key.decode("latin-1")] = value.decode("latin-1")
    return found


def _read_head(path: str, limit: int | None) -> bytes:
    with open(path, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def _iter_png_chunks(blob: bytes):
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(blob):
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        kind = blob[pos + 4:pos + 8]
        data = blob[pos + 8:pos + 8 + length]
        yield kind, data
        if kind == b"IEND":
            return
        pos += 12 + length


def read_image_info(path: str) -> ImageFileInfo:
    """Size (and, for PNG, the first pixel's colour) of an input image.

    Raises ``UnidentifiedImageError`` with Pillow's wording for anything else, as LoadImage
    would. Blocking: call through ``asyncio.to_thread``.
    """
    head = _read_head(path, None)
    if head.startswith(PNG_SIGNATURE):
        return _png_info(head)
    if head[:2] == b"\xff\xd8":
        info = _jpeg_info(head)
        if info is not None:
            return info
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        return ImageFileInfo(width, height, (128, 128, 128), has_alpha=False)
    raise UnidentifiedImageError(f"cannot identify image file {path!r}")


def _png_info(blob: bytes) -> ImageFileInfo:
    width = height = 0
    depth = colour_type = -1
    palette = b""
    has_trns = False
    idat = bytearray()
    for kind, data in _iter_png_chunks(blob):
        if kind == b"IHDR":
            width, height, depth, colour_type = struct.unpack(">IIBB", data[:10])
        elif kind == b"PLTE":
            palette = data
        elif kind == b"tRNS":
            has_trns = True
        elif kind == b"IDAT":
            idat += data
    if width <= 0 or height <= 0:
        raise UnidentifiedImageError("cannot identify image file (PNG without IHDR)")
    has_alpha = colour_type in (4, 6) or has_trns
    return ImageFileInfo(width, height, _png_first_pixel(bytes(idat), depth, colour_type, palette), has_alpha)


def _png_first_pixel(idat: bytes, depth: int, colour_type: int, palette: bytes) -> RGB:
    # On the first scanline every PNG filter leaves the first pixel's bytes unchanged (its
    # left and upper neighbours count as zero), so no unfiltering is needed.
    if depth != 8 or not idat:
        return (128, 128, 128)
    try:
        raw = zlib.decompressobj().decompress(idat, 8)
    except zlib.error:
        return (128, 128, 128)
    px = raw[1:]
    if colour_type in (2, 6) and len(px) >= 3:
        return (px[0], px[1], px[2])
    if colour_type in (0, 4) and len(px) >= 1:
        return (px[0], px[0], px[0])
    if colour_type == 3 and len(px) >= 1 and len(palette) >= 3 * (px[0] + 1):
        i = 3 * px[0]
        return (palette[i], palette[i + 1], palette[i + 2])
    return (128, 128, 128)


def _jpeg_info(blob: bytes) -> ImageFileInfo | None:
    pos = 2
    while pos + 4 <= len(blob):
        if blob[pos] != 0xFF:
            return None
        marker = blob[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", blob[pos + 2:pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", blob[pos + 5:pos + 9])
            return ImageFileInfo(width, height, (128, 128, 128), has_alpha=False)
        pos += 2 + length
    return None


def write_latent(path: str, latent: Latent, metadata: dict[str, str] | None) -> int:
    """Write a ``.latent`` file the way SaveLatent does: a safetensors file holding
    ``latent_tensor`` (float32 zeros of the latent's shape) and ``latent_format_version_0``.

    Blocking: call through ``asyncio.to_thread``.
    """
    shape = list(latent.shape)
    nbytes = 4 * shape[0] * shape[1] * shape[2] * shape[3]
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    header["latent_format_version_0"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    header["latent_tensor"] = {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        out.truncate(8 + len(encoded) + nbytes)  # zeros, without holding them in memory
    return os.path.getsize(path)
