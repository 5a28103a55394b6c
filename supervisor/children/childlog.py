"""Capture a child's output: per-child rotating file, daemon log, in-memory tail.

Output is read in chunks (never ``readline``, whose 64 KiB limit raises on a long line)
and split here.  Carriage returns are treated the way a terminal treats them: only the
text after the last ``\\r`` of a line is kept, so tqdm progress bars (ComfyUI prints one
per sampling run) become one line per bar instead of megabytes of redraws.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import re
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

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

    The file handler is used directly (not through a named logger) so the child's raw
    output never propagates into the daemon's handlers twice.  File writes are small
    and buffered by the OS, like any logging call made from the event loop.
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
        self._file: logging.handlers.RotatingFileHandler | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = logging.handlers.RotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
            )
            self._file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))

    def line(self, text: str) -> None:
        """One line of the child's own output."""
        self._tail.append(text)
        self.lines_seen += 1
        self._daemon_log.info("[%s] %s", self.name, text)
        self._write(text)

    def marker(self, text: str) -> None:
        """A supervisor event (start, exit) written into the child's file only, so
        the file reads as a complete story of each run."""
        self._write(f"--- {text} ---")

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
            for text in splitter.feed(chunk):
                self.line(text)
        for text in splitter.flush():
            self.line(text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _write(self, text: str) -> None:
        if self._file is None:
            return
        record = logging.LogRecord(
            name=f"child.{self.name}", level=logging.INFO, pathname="", lineno=0,
            msg=text, args=None, exc_info=None,
        )
        # handle() takes the handler's lock and reports write errors via handleError
        # (to stderr) instead of raising into the reader task.
        self._file.handle(record)
