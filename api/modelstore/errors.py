"""What can go wrong with a model file, as exceptions that carry their own plain-words message.

`retryable` tells the engine whether trying again may help (a cut connection, a 503) or not
(a 401, a wrong digest). A missing file (404) is final for one download, but the daemon's
provisioning keeps asking later: the operator may be uploading it right now.
"""

from __future__ import annotations


class ManifestError(ValueError):
    """A manifest entry that cannot be used; the message names the entry and the field."""


class DownloadError(Exception):
    """A download that did not end in a verified file. `shown_url` carries no credentials."""

    retryable = True

    def __init__(self, shown_url: str, detail: str, *, status: int | None = None):
        self.shown_url = shown_url
        self.detail = detail
        self.status = status
        super().__init__(f"{shown_url}: {detail}")


class SourceMissing(DownloadError):
    retryable = False


class AuthRequired(DownloadError):
    retryable = False


class DigestMismatch(DownloadError):
    retryable = False

    def __init__(self, shown_url: str, expected: str, actual: str):
        self.expected = expected
        self.actual = actual
        super().__init__(shown_url, f"SHA-256 mismatch: expected {expected}, got {actual}; "
                                    "the download was deleted")


class NotEnoughSpace(DownloadError):
    retryable = False
