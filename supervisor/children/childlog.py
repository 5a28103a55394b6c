"""Capture a child's output: per-child rotating file, daemon log, in-memory tail.

Output is read in chunks (never ``readline``, whose 64 KiB limit raises on a long line)
and split here.  Carriage returns are treated the way a terminal treats them: only the
text after the last ``\\r`` of a line is kept, so tqdm progress bars (ComfyUI prints one
per sampling run) become one line per bar instead of megabytes of redraws.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import sys
import time
from collections import deque
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

from config.logsetup import asctime, write_info_lines

#: Longest line kept; the rest of an over-long line is cut (and marked).
MAX_LINE_CHARS = 8192
_READ_CHUNK = 65536
#: Longest cause quoted in an exit reason (one line of /health).
CAUSE_CHARS = 160
#: The last line of a Python traceback: ``SomeError: message`` (module path allowed).
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure|Fault)\b(:.*)?$")


#: Recognises the line that says why a child stopped: (the text to quote, the fix) or None.
#: The child's program knows its own (ComfyUI's are in api/comfy/failures.py).
FailureRule = Callable[[str], "tuple[str, str] | None"]


def exit_cause(lines: Sequence[str], limit: int = CAUSE_CHARS,
               known: Sequence[FailureRule] = ()) -> str:
    """The line of a dead child's output that most likely says why it died, or "".

    A line a ``known`` rule recognises wins (the last such line), quoted with the rule's fix:
    a program that stops at start often prints advice after its reason. Else a Python
    traceback's exception line (``FileNotFoundError: ...``), which may be followed by a few
    lines of noise. Otherwise the last non-blank line, which is where most programs put their
    fatal message. The quoted line is cut to ``limit`` characters.
    """
    meaningful = [line.strip() for line in lines if line.strip()]
    if not meaningful:
        return ""
    for line in reversed(meaningful):
        for rule in known:
            found = rule(line)
            if found is not None:
                quoted, fix = found
                return f"{_cut(quoted, limit)} ({fix})"
    chosen = meaningful[-1]
    if any(line.startswith("Traceback (most recent call last)") for line in meaningful):
        for line in reversed(meaningful):
            if _EXCEPTION_LINE.match(line):
                chosen = line
                break
    return _cut(chosen, limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class LineSplitter:
    """Turns a stream of byte chunks into text lines (undecodable bytes replaced)."""

    def __init__(self, max_line: int = MAX_LINE_CHARS) -> None:
        self._buf = bytearray()
        self._max = max_line

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        lines: list[str] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            raw = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            lines.append(self._finish(raw))
        if len(self._buf) > self._max:
            cr = self._buf.rfind(b"\r")
            if cr >= 0:
                # Everything before the last \r has been overwritten on a terminal.
                del self._buf[: cr + 1]
            if len(self._buf) > self._max:
                lines.append(self._finish(bytes(self._buf)))
                self._buf.clear()
        return lines

    def flush(self) -> list[str]:
        """The unterminated remainder at end of stream (empty list when none)."""
        if not self._buf:
            return []
        raw = bytes(self._buf)
        self._buf.clear()
        return [self._finish(raw)]

    def _finish(self, raw: bytes) -> str:
        raw = raw.rstrip(b"\r")
        cr = raw.rfind(b"\r")
        if cr >= 0:
            raw = raw[cr + 1 :]
        text = raw.decode("utf-8", errors="replace")
        if len(text) > self._max:
            text = text[: self._max] + " …[line cut]"
        return text


class ChildLog:
    """Where one child's lines go: a rotating file, the daemon's log, a tail buffer.

    The lines of one read (usually one, more in a burst) are handled together: one timestamp,
    one write to the file and one to the daemon's log stream (`config.logsetup.write_info_lines`,
    the same text a `child.<name>` INFO record would produce; records where that stream is not
    the only handler). The file is written here, not through a logging handler, so the child's
    raw output never propagates into the daemon's handlers twice, and its size is counted
    instead of asked of the file system per line. Writes are small and buffered by the OS, like
    any logging call made from the event loop.
    """

    def __init__(
        self,
        name: str,
        path: Path | None,
        *,
        max_bytes: int = 10 * 1024 * 1024,
        backups: int = 3,
        tail_lines: int = 200,
    ) -> None:
        self.name = name
        self.path = path
        #: monotonic time of the last output read (a redrawn progress bar counts): a heartbeat.
        self.last_output_at: float | None = None
        self._tail: deque[str] = deque(maxlen=max(1, tail_lines))
        #: Lines seen since this ChildLog was made; a run's own lines are those after its mark.
        self.lines_seen = 0
        self._daemon_log = logging.getLogger(f"child.{name}")
        self._tag = f"[{name}] "
        self._file: RotatingFile | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = RotatingFile(path, max_bytes=max_bytes, backups=backups)

    def line(self, text: str) -> None:
        """One line of the child's own output."""
        self.lines([text])

    def lines(self, texts: Sequence[str]) -> None:
        """Lines of the child's own output, in order: the tail, the daemon's log, the file."""
        if not texts:
            return
        self._tail.extend(texts)
        self.lines_seen += len(texts)
        now = time.time()
        tagged = [self._tag + text for text in texts]
        if not write_info_lines(self._daemon_log, tagged, now):
            for text in tagged:
                self._daemon_log.info("%s", text)
        if self._file is not None:
            stamp = asctime(now)
            self._file.write([f"{stamp} {text}\n" for text in texts])

    def marker(self, text: str) -> None:
        """A supervisor event (start, exit) written into the child's file only, so
        the file reads as a complete story of each run."""
        if self._file is not None:
            self._file.write([f"{asctime(time.time())} --- {text} ---\n"])

    def tail(self, n: int | None = None) -> list[str]:
        lines = list(self._tail)
        if n is None:
            return lines
        return lines[-n:] if n > 0 else []

    def since(self, mark: int) -> list[str]:
        """The kept lines written after ``lines_seen`` was ``mark`` (one run's output)."""
        return self.tail(min(self.lines_seen - mark, len(self._tail)))

    async def pump(self, stream: asyncio.StreamReader) -> None:
        """Read ``stream`` until EOF, logging each line; never raises on bad data."""
        splitter = LineSplitter()
        while True:
            chunk = await stream.read(_READ_CHUNK)
            if not chunk:
                break
            self.last_output_at = time.monotonic()
            self.lines(splitter.feed(chunk))
        self.lines(splitter.flush())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class RotatingFile:
    """A log file that rotates as `logging.handlers.RotatingFileHandler` does: before a line
    would take it past `max_bytes` it becomes NAME.1 (NAME.1 becomes NAME.2, ..., the one past
    `backups` goes); with no backups it starts over. Not a regular file (/dev/stdout, a
    pipe): never rotated.

    One write per batch of lines; the size is counted here. Opened on the first write. An error
    (a full disk, a removed folder) is reported once on stderr and the batch dropped; the next
    batch tries again, reopening the file."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: BinaryIO | None = None
        self._size = 0
        self._rotates = True
        self._failed = False

    def write(self, lines: Sequence[str]) -> None:
        try:
            file = self._file or self._open()
            batch: list[bytes] = []
            for line in lines:
                data = line.encode("utf-8", "replace")
                if self._rotates and self._size + len(data) > self.max_bytes > 0 and \
                        (self._size or batch):
                    file.write(b"".join(batch))
                    batch.clear()
                    file = self._rotate()
                batch.append(data)
                self._size += len(data)
            file.write(b"".join(batch))
        except OSError as exc:
            self.close()
            if not self._failed:
                self._failed = True
                sys.stderr.write(f"comfy-worker: cannot write {self.path}: {exc}\n")
        else:
            self._failed = False

    def _open(self) -> BinaryIO:
        # Unbuffered: one write() per batch, nothing held back in the daemon.
        file = open(self.path, "ab", buffering=0)
        info = os.fstat(file.fileno())
        self._rotates = stat.S_ISREG(info.st_mode)
        self._size = info.st_size
        self._file = file
        return file

    def _rotate(self) -> BinaryIO:
        self.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        return self._open()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
