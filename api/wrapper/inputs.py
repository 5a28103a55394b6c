"""Input images: fetch a URL or decode base64, then hand the bytes to ComfyUI's /upload/image.

An image value may be an http(s) URL (size, time and content-type limits apply), a ``data:`` URI,
plain base64, or the name of a file already in ComfyUI's input folder (left as it is).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

import aiohttp

from api.host.netcheck import TargetError, check_url, redact_url

_DATA_URI_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[^,]*)?;base64,(?P<data>.*)$",
                          re.DOTALL)
_URL_RE = re.compile(r"^https?://\S+$", re.IGNORECASE)
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")

# Magic numbers of the image formats ComfyUI's LoadImage reads, and their extensions.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png", "image/png"),
    (b"\xff\xd8\xff", "jpg", "image/jpeg"),
    (b"GIF87a", "gif", "image/gif"),
    (b"GIF89a", "gif", "image/gif"),
    (b"BM", "bmp", "image/bmp"),
)


class InputError(Exception):
    """An input that cannot be used; the message is meant for the client."""


@dataclass(frozen=True)
class InputImage:
    data: bytes
    extension: str
    mimetype: str


def sniff(data: bytes) -> tuple[str, str] | None:
    for magic, ext, mime in _SIGNATURES:
        if data.startswith(magic):
            return ext, mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    return None


def looks_like_image_reference(value: Any) -> bool:
    """True for values that name an image to fetch or decode (a URL or a data URI)."""
    return isinstance(value, str) and bool(_URL_RE.match(value) or value.startswith("data:"))


def classify(value: str) -> str:
    """'url', 'data', 'base64' or 'filename'."""
    if _URL_RE.match(value):
        return "url"
    if value.startswith("data:"):
        return "data"
    if len(value) > 256 and _BASE64_RE.match(value[:4096]):
        return "base64"
    return "filename"


def _decode_base64(text: str, max_bytes: int) -> bytes:
    if len(text) * 3 // 4 > max_bytes + 3:
        raise InputError(f"the image is larger than the {max_bytes} byte limit")
    cleaned = "".join(text.split())
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("not valid base64") from None


class InputFetcher:
    def __init__(self, session: aiohttp.ClientSession, max_bytes: int, timeout: float,
                 allow_private: bool):
        self.session = session
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.allow_private = allow_private

    async def load(self, value: str) -> InputImage:
        kind = classify(value)
        if kind == "url":
            data = await self._download(value)
        elif kind == "data":
            match = _DATA_URI_RE.match(value)
            if not match:
                raise InputError("a data: URI must be base64, like data:image/png;base64,...")
            data = _decode_base64(match.group("data"), self.max_bytes)
        else:
            data = _decode_base64(value, self.max_bytes)
        if len(data) > self.max_bytes:
            raise InputError(f"the image is {len(data)} bytes, over the {self.max_bytes} byte limit")
        kind_of = sniff(data)
        if kind_of is None:
            raise InputError("not a PNG, JPEG, WEBP, GIF or BMP image")
        return InputImage(data, kind_of[0], kind_of[1])

    async def _download(self, url: str) -> bytes:
        shown = redact_url(url)
        try:
            await check_url(url, self.allow_private)
        except TargetError as exc:
            raise InputError(f"{shown}: {exc}") from None
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self.session.get(url, timeout=timeout, allow_redirects=True,
                                        max_redirects=5) as response:
                if response.status != 200:
                    raise InputError(f"{shown}: the server answered HTTP {response.status}")
                ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
                    raise InputError(f"{shown}: content type {ctype} is not an image")
                declared = response.content_length
                if declared is not None and declared > self.max_bytes:
                    raise InputError(f"{shown}: {declared} bytes is over the {self.max_bytes} "
                                     "byte limit")
                chunks, size = [], 0
                async for chunk in response.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InputError(f"{shown}: larger than the {self.max_bytes} byte limit")
                    chunks.append(chunk)
                return b"".join(chunks)
        except InputError:
            raise
        except asyncio.TimeoutError:
            raise InputError(f"{shown}: no complete answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise InputError(f"{shown}: download failed ({exc.__class__.__name__}: {exc})") from None
