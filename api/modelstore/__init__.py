"""The model store: model files on the node, fetched so that a half-written file is never seen.

One host has one store: ComfyUI's models folder, plus a record of verified digests and a cache of
request-URL models under the worker's state folder. Both the daemon (start-up manifest) and the
API wrapper (model URLs in requests) use the same download engine, so every file that lands in the
models folder went through the same checks: streamed to a temporary file beside its destination,
hashed while streaming, synced, and renamed into place only when its size and SHA-256 match.

Modules: `manifest` (what should be there), `sources` (where a URL really points and with which
credentials), `download` (the engine), `digests` (verified digests remembered across restarts),
`store` (present? verified? fetch it), `cache` (the URL-keyed LRU cache), `progress` (numbers and
their words).
"""

from api.modelstore.errors import (
    AuthRequired,
    DigestMismatch,
    DownloadError,
    ManifestError,
    NotEnoughSpace,
    SourceMissing,
)
from api.modelstore.manifest import ModelEntry, When, load_manifest, parse_entries
from api.modelstore.progress import FileProgress, human_bytes

__all__ = [
    "AuthRequired", "DigestMismatch", "DownloadError", "FileProgress", "ManifestError",
    "ModelEntry", "NotEnoughSpace", "SourceMissing", "When", "human_bytes", "load_manifest",
    "parse_entries",
]
