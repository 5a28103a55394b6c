"""Logging for every comfy-worker process, configured once at the entry point.

Secrets from the settings (S3 keys, tokens, webhook secrets) are masked in every record, so a
stray f-string or an exception text that quotes one cannot leak it into a log file or journal.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Sequence

MASK = "********"


class SecretMasker(logging.Filter):
    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        # Very short values would mask unrelated text; they are not real secrets anyway.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def add(self, secret: str) -> None:
        if secret and len(secret) >= 4 and secret not in self.secrets:
            self.secrets.append(secret)
            self.secrets.sort(key=len, reverse=True)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = self.mask(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if masked != message:
            record.msg, record.args = masked, None
        return True


_masker = SecretMasker(())


def masker() -> SecretMasker:
    return _masker


#: The handler setup_logging installed, and the process name its lines carry.
_handler: logging.StreamHandler | None = None
_prefix = ""
#: (second, its text): asctime() formats each second once.
_second: tuple[int, str] = (-1, "")


def setup_logging(level: str = "INFO", secrets: Iterable[str] = (), name: str = "") -> None:
    global _handler, _prefix
    for secret in secrets:
        _masker.add(secret)
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"{name} " if name else ""
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    handler.addFilter(_masker)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _handler, _prefix = handler, prefix


def asctime(when: float) -> str:
    """`when` (time.time()) as logging's default %(asctime)s writes it: local time, milliseconds
    after a comma."""
    global _second
    whole = int(when)
    second, text = _second
    if second != whole:
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(whole))
        _second = (whole, text)
    return f"{text},{int((when - whole) * 1000):03d}"


def write_info_lines(logger: logging.Logger, messages: Sequence[str], when: float) -> bool:
    """Write `messages` as the INFO records of `logger` would read, each masked, all in one write
    to the stream of the handler that setup_logging installed, without a record each.

    For a stream of lines that arrive many a second (the children's output): formatting and
    writing a record per line cost the daemon more than forwarding a request. False when records
    do not go only there (setup_logging was not called, `logger` or the root has another
    handler or filter, as under pytest's caplog): the caller then logs them as records."""
    handler = _handler
    root = logging.getLogger()
    if handler is None or root.handlers != [handler] or logger.handlers or logger.filters \
            or not logger.propagate or logger.parent is not root or handler.filters != [_masker] \
            or handler.level > logging.INFO:
        return False
    if not messages or not logger.isEnabledFor(logging.INFO):
        return True
    head = f"{asctime(when)} INFO {_prefix}{logger.name}: "
    mask = _masker.mask if _masker.secrets else None
    text = "".join(f"{head}{mask(m) if mask else m}\n" for m in messages)
    handler.acquire()
    try:
        handler.stream.write(text)
        handler.stream.flush()
    except (OSError, ValueError):
        pass  # nowhere to say it: the daemon's own log is what failed
    finally:
        handler.release()
    return True
