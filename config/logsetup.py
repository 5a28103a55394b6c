"""Logging for every comfy-worker process, configured once at the entry point.

Secrets from the settings (S3 keys, tokens, webhook secrets) are masked in every record, so a
stray f-string or an exception text that quotes one cannot leak it into a log file or journal.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable

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


def setup_logging(level: str = "INFO", secrets: Iterable[str] = (), name: str = "") -> None:
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
