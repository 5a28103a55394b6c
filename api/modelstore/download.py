"""The download engine: one model file from its source to its place, verified, or not at all.

The file is streamed into `.<name>.part` beside its destination (same filesystem, so the final
rename is atomic), hashed while streaming, synced to disk, and renamed into place only when its
size and SHA-256 match. A wrong digest deletes the part file and says expected and actual. A cut
connection resumes with an HTTP `Range` request (with `If-Range`, so a source that changed in
between is sent whole) after a backoff; the part file survives a restart and is resumed too when
the manifest gives a digest (its bytes are hashed again first). Free space is checked against the
announced size before a byte is written. The part file is locked (flock), so two processes — the
daemon and `comfy-worker models pull` — never write the same file.

Memory stays flat: received chunks are gathered up to `BUFFER_BYTES` and written and hashed in a
worker thread while the next batch is read; at most two batches exist at once. File work never
runs on the event loop. S3 objects go through boto3's managed (parallel, retrying) transfer into
the same locked part file, and are hashed after it.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, BinaryIO, Callable
from urllib.parse import urljoin, urlsplit

import aiohttp

from api.modelstore.digests import HASH_CHUNK
from api.modelstore.errors import (
    AuthRequired,
    DigestMismatch,
    DownloadError,
    NotEnoughSpace,
    SourceMissing,
)
from api.modelstore.progress import FileProgress, human_bytes
from api.modelstore.sources import HttpSource, S3Source, Source, redact

logger = logging.getLogger(__name__)

BUFFER_BYTES = 8 * 1024 * 1024
READ_BUFSIZE = 4 * 1024 * 1024
MAX_REDIRECTS = 5
PROGRESS_RESETS_RETRIES = 1024 * 1024
#: Space left free on the filesystem beyond the file itself.
DISK_RESERVE_BYTES = 256 * 1024 * 1024
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    sha256: str
    seconds: float
    resumed_from: int = 0


def part_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.part"


class _Transfer:
    """What is on disk so far: the open part file, its hash and its length."""

    def __init__(self, handle: BinaryIO, shown: str):
        self.handle = handle
        self.shown = shown
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.total: int | None = None
        self.announced_sha256: str | None = None
        self.before_write: BeforeWrite | None = None
        self.validator: str | None = None   # the source's strong ETag or Last-Modified

    # These run in a worker thread.
    def hash_existing(self) -> int:
        self.handle.seek(0)
        while True:
            chunk = self.handle.read(HASH_CHUNK)
            if not chunk:
                break
            self.hasher.update(chunk)
            self.offset += len(chunk)
        return self.offset

    def restart(self) -> None:
        self.handle.seek(0)
        self.handle.truncate(0)
        self.hasher = hashlib.sha256()
        self.offset = 0

    def write(self, chunks: list[bytes]) -> int:
        """Write and hash a batch of received chunks; returns the bytes.

        The batch is joined here, in the worker thread, so that the write and the hash each
        release the GIL once per batch: per chunk, this thread would wait for the event loop's
        thread at every reacquisition and crawl (measured: a third of the speed)."""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            self.handle.write(data)
        except OSError as exc:
            raise NotEnoughSpace(self.shown, f"writing failed: {exc.strerror}") from None
        self.hasher.update(data)
        return len(data)


def _open_part(part: Path, shown: str) -> BinaryIO:
    part.parent.mkdir(parents=True, exist_ok=True)
    # Read-write, not append: boto3 writes the parts of an S3 object at their own offsets.
    handle = os.fdopen(os.open(part, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DownloadError(shown, f"another process is downloading {part.name} right now") \
            from None
    return handle


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_space(folder: Path, needed: int | None, shown: str) -> None:
    """Refuse a download that would fill the disk (needed: bytes still to write)."""
    if not needed:
        return
    free = shutil.disk_usage(folder).free
    if needed + DISK_RESERVE_BYTES > free:
        raise NotEnoughSpace(shown, f"needs {human_bytes(needed)} but {folder} has only "
                                    f"{human_bytes(free)} free (keeping "
                                    f"{human_bytes(DISK_RESERVE_BYTES)} spare)")


TargetCheck = Callable[[str], Awaitable[None]]
#: Called with the bytes still to write once the size is known, before any is written; it may
#: make room (evict) or refuse by raising DownloadError.
BeforeWrite = Callable[[int | None], Awaitable[None]]


class Downloader:
    """Fetches one source into one destination path. Share one per process (one HTTP session)."""

    def __init__(self, *, retries: int = 4, backoff_initial: float = 2.0,
                 backoff_max: float = 60.0, read_timeout: float = 60.0,
                 connect_timeout: float = 30.0, session: aiohttp.ClientSession | None = None,
                 check_target: TargetCheck | None = None):
        self.retries = retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.check_target = check_target
        self._session = session
        self._own_session = session is None

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(read_bufsize=READ_BUFSIZE,
                                                  auto_decompress=False)
        return self._session

    async def fetch(self, source: Source, dest: Path, *, sha256: str | None = None,
                    progress: FileProgress | None = None,
                    before_write: BeforeWrite | None = None) -> Fetched:
        """Download `source` to `dest`; raises DownloadError (a subclass says which kind)."""
        progress = progress or FileProgress(dest.stem)
        part = part_path(dest)
        started = time.monotonic()
        handle = await asyncio.to_thread(_open_part, part, source.shown)
        transfer = _Transfer(handle, source.shown)
        transfer.before_write = before_write
        try:
            if isinstance(source, S3Source):
                await self._fetch_s3(source, transfer, part, progress)
                resumed = 0
            else:
                # A part file left by an earlier run is resumed only when a digest will judge
                # the result: without one, a changed source would go unnoticed in the mix.
                if sha256:
                    resumed = await asyncio.to_thread(transfer.hash_existing)
                else:
                    await asyncio.to_thread(transfer.restart)
                    resumed = 0
                progress.reset(resumed)
                if resumed:
                    logger.info("%s: resuming at %s", source.shown, human_bytes(resumed))
                await self._fetch_http(source, transfer, dest, progress)
            actual = transfer.hasher.hexdigest()
            expected = sha256 or transfer.announced_sha256
            await asyncio.to_thread(self._finalize, transfer, part, dest, expected, actual,
                                    source.shown)
        finally:
            await asyncio.to_thread(handle.close)
        seconds = time.monotonic() - started
        logger.info("%s -> %s: %s in %.1f s, sha256 %s", source.shown, dest,
                    human_bytes(transfer.offset), seconds, actual)
        return Fetched(dest, transfer.offset, actual, seconds, resumed)

    @staticmethod
    def _finalize(transfer: _Transfer, part: Path, dest: Path, expected: str | None,
                  actual: str, shown: str) -> None:
        handle = transfer.handle
        handle.flush()
        os.fsync(handle.fileno())
        if transfer.total is not None and transfer.offset != transfer.total:
            raise DownloadError(shown, f"got {transfer.offset} bytes of {transfer.total}")
        if expected and actual != expected:
            part.unlink(missing_ok=True)
            raise DigestMismatch(shown, expected, actual)
        os.replace(part, dest)
        _fsync_dir(dest.parent)

    # --- HTTP -----------------------------------------------------------------------------------
    async def _fetch_http(self, source: HttpSource, transfer: _Transfer, dest: Path,
                          progress: FileProgress) -> None:
        failures = 0
        while True:
            before = transfer.offset
            try:
                await self._http_once(source, transfer, dest, progress)
                return
            except DownloadError as exc:
                error = exc
            except asyncio.TimeoutError:
                error = DownloadError(source.shown, f"no data for {self.read_timeout:g} s "
                                                    f"at {human_bytes(transfer.offset)}")
            except (aiohttp.ClientError, ConnectionError) as exc:
                error = DownloadError(source.shown, f"connection failed at "
                                                    f"{human_bytes(transfer.offset)} "
                                                    f"({exc.__class__.__name__}: {exc})")
            if not error.retryable:
                raise error
            # An attempt that moved the file on by a real amount starts the count afresh.
            failures = 0 if transfer.offset - before >= PROGRESS_RESETS_RETRIES else failures + 1
            if failures > self.retries:
                raise error
            delay = min(self.backoff_max, self.backoff_initial * 2 ** max(0, failures - 1))
            logger.warning("%s; retrying in %.1f s", error, delay)
            await asyncio.sleep(delay)

    async def _http_once(self, source: HttpSource, transfer: _Transfer, dest: Path,
                         progress: FileProgress) -> None:
        url = source.url
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                        sock_read=self.read_timeout)
        for _hop in range(MAX_REDIRECTS + 1):
            if self.check_target is not None:
                await self.check_target(url)
            same_host = (urlsplit(url).hostname or "") == source.auth_host
            headers = dict(source.headers) if same_host else {}
            if transfer.offset:
                headers["Range"] = f"bytes={transfer.offset}-"
                if transfer.validator:  # the source changed since: the server sends it whole
                    headers["If-Range"] = transfer.validator
            async with self._http().get(url, headers=headers, allow_redirects=False,
                                        timeout=timeout) as response:
                self._note_linked_digest(response, transfer)
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    url = urljoin(url, response.headers["Location"])
                    continue
                if not await self._accept(response, source, transfer, dest, progress):
                    return  # already complete
                await self._stream(response, transfer, progress)
                if transfer.total is not None and transfer.offset < transfer.total:
                    raise DownloadError(source.shown, f"the connection ended at "
                                                      f"{human_bytes(transfer.offset)} of "
                                                      f"{human_bytes(transfer.total)}")
                return
        raise DownloadError(source.shown, f"more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _note_linked_digest(response: aiohttp.ClientResponse, transfer: _Transfer) -> None:
        """Hugging Face names an LFS file's SHA-256 in X-Linked-Etag on its resolve answer."""
        linked = response.headers.get("X-Linked-Etag", "").strip().strip('"').lower()
        if linked.startswith("w/"):
            linked = linked[2:].strip('"')
        if _SHA256.match(linked):
            transfer.announced_sha256 = linked

    async def _accept(self, response: aiohttp.ClientResponse, source: HttpSource,
                      transfer: _Transfer, dest: Path, progress: FileProgress) -> bool:
        """Judge the status; set the total; False when the part file is already complete."""
        status = response.status
        shown = redact(str(response.url)) if str(response.url) != source.url else source.shown
        if status in (401, 403):
            hint = ("the credentials sent were refused" if source.headers else
                    "no credentials were sent: set the entry's auth_env (or HF_TOKEN for "
                    "Hugging Face)")
            raise AuthRequired(shown, f"HTTP {status}: {hint}", status=status)
        if status in (404, 410):
            raise SourceMissing(shown, f"HTTP {status}: not found at the source", status=status)
        if status == 416:
            found = _unsatisfied_total(response.headers.get("Content-Range", ""))
            if found is not None and found == transfer.offset:
                transfer.total = found
                return False
            await asyncio.to_thread(transfer.restart)
            progress.reset(0)
            raise DownloadError(shown, "HTTP 416: the part file does not fit the source; "
                                       "starting over", status=status)
        if status == 429 or status >= 500:
            raise DownloadError(shown, f"HTTP {status}", status=status)
        if status == 200:
            if transfer.offset:
                logger.info("%s: the server ignored the Range request; starting over", shown)
                await asyncio.to_thread(transfer.restart)
                progress.reset(0)
            transfer.total = response.content_length
        elif status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != transfer.offset:
                await asyncio.to_thread(transfer.restart)
                progress.reset(0)
                raise DownloadError(shown, "the server answered a different range; starting over")
            transfer.total = int(match.group(3)) if match.group(3) != "*" else None
        else:
            error = DownloadError(shown, f"HTTP {status}", status=status)
            error.retryable = False
            raise error
        etag = response.headers.get("ETag", "")
        transfer.validator = etag if etag and not etag.startswith("W/") else \
            response.headers.get("Last-Modified") or transfer.validator
        progress.total = transfer.total
        needed = transfer.total - transfer.offset if transfer.total is not None else None
        if transfer.before_write is not None:
            await transfer.before_write(needed)
        check_space(dest.parent, needed, shown)
        return True

    async def _stream(self, response: aiohttp.ClientResponse, transfer: _Transfer,
                      progress: FileProgress) -> None:
        """Read into buffers; write and hash each in a thread while the next one is read."""
        pending: asyncio.Future | None = None
        buffer: list[bytes] = []
        buffered = 0

        async def settle() -> None:
            nonlocal pending
            if pending is not None:
                written = await pending
                pending = None
                transfer.offset += written

        try:
            async for chunk in response.content.iter_any():
                buffer.append(chunk)
                buffered += len(chunk)
                progress.advance(len(chunk))
                if buffered >= BUFFER_BYTES:
                    await settle()
                    pending = asyncio.ensure_future(asyncio.to_thread(transfer.write, buffer))
                    buffer, buffered = [], 0
        finally:
            # Keep every byte received, even on a cut: the resume starts after them.
            await settle()
            if buffer:
                pending = asyncio.ensure_future(asyncio.to_thread(transfer.write, buffer))
                await settle()

    # --- S3 -------------------------------------------------------------------------------------
    async def _fetch_s3(self, source: S3Source, transfer: _Transfer, part: Path,
                        progress: FileProgress) -> None:
        await asyncio.to_thread(self._s3_blocking, source, transfer, part, progress)

    def _s3_blocking(self, source: S3Source, transfer: _Transfer, part: Path,
                     progress: FileProgress) -> None:
        # boto3 costs ~10 MB of memory: loaded only when a model comes from S3.
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client(
            "s3", endpoint_url=source.endpoint_url or None, region_name=source.region or None,
            aws_access_key_id=source.access_key_id or None,
            aws_secret_access_key=source.secret_access_key or None,
            config=Config(retries={"max_attempts": self.retries + 1, "mode": "standard"},
                          connect_timeout=self.connect_timeout, read_timeout=self.read_timeout))
        try:
            head = client.head_object(Bucket=source.bucket, Key=source.key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NoSuchBucket") or status == 404:
                raise SourceMissing(source.shown, "not found in the bucket", status=404) from None
            if status in (401, 403):
                raise AuthRequired(source.shown, f"access denied ({code}): check the [s3] keys "
                                                 "or the entry's access_key_env",
                                   status=status) from None
            raise DownloadError(source.shown, f"S3 error {code}", status=status) from None
        except BotoCoreError as exc:
            raise DownloadError(source.shown, f"S3 unreachable ({exc})") from None
        total = int(head.get("ContentLength", 0))
        transfer.restart()
        progress.reset(0)
        progress.total = transfer.total = total
        check_space(part.parent, total, source.shown)
        config = TransferConfig(multipart_threshold=64 * 1024 * 1024,
                                multipart_chunksize=64 * 1024 * 1024, max_concurrency=8)
        try:
            client.download_fileobj(source.bucket, source.key, transfer.handle,
                                    Callback=progress.advance, Config=config)
        except (ClientError, BotoCoreError) as exc:
            raise DownloadError(source.shown, f"S3 download failed ({exc})") from None
        transfer.handle.flush()
        transfer.hasher = hashlib.sha256()
        transfer.offset = 0
        transfer.hash_existing()


def _unsatisfied_total(value: str) -> int | None:
    """The total of a 416 answer's `Content-Range: bytes */N`."""
    match = re.match(r"^bytes\s+\*/(\d+)$", value.strip())
    return int(match.group(1)) if match else None
