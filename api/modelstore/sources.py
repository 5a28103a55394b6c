"""Where a model URL really points, and which credentials go with it.

- `http(s)://` is fetched as is; an entry's `auth_env` names the environment variable whose
  value goes into `auth_header` (a bare token in `Authorization` becomes `Bearer <token>`).
- `hf://org/repo/path/file@revision` becomes Hugging Face's resolve URL
  (`$HF_ENDPOINT/org/repo/resolve/revision/path/file`, revision `main` by default), and
  `HF_TOKEN`, when set, goes to the Hugging Face host only. huggingface.co resolve URLs get the
  token too. We fetch them with our own engine rather than huggingface_hub's: its downloader
  keeps its own cache layout (blobs and links) outside the models folder, where our temporary
  file, digest check and atomic rename would not apply; the resolve URL is the documented,
  stable way in, and its `X-Linked-Etag` header gives the SHA-256 of LFS files for free.
- `s3://bucket/key` goes through boto3, with the `[s3]` settings or the entry's own endpoint and
  key variables.

Secrets never appear in a `shown` URL: that is what logs, reasons and errors print.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import quote, urlsplit

from api.modelstore.errors import ManifestError
from api.modelstore.manifest import ModelEntry

DEFAULT_HF_ENDPOINT = "https://huggingface.co"


def redact(url: str) -> str:
    """The URL without user info, query or fragment (they may carry tokens)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable url>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass(frozen=True)
class HttpSource:
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    #: The host the headers may be sent to; a redirect elsewhere (a CDN) goes without them.
    auth_host: str = ""

    @property
    def shown(self) -> str:
        return redact(self.url)


@dataclass(frozen=True)
class S3Source:
    bucket: str
    key: str
    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""

    @property
    def shown(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


Source = HttpSource | S3Source


def hf_resolve_url(url: str, endpoint: str) -> str:
    """hf://org/repo/path/to/file@rev -> <endpoint>/org/repo/resolve/rev/path/to/file."""
    rest = url[len("hf://"):]
    revision = "main"
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 3 or not revision:
        raise ManifestError(f"{url}: expected hf://org/repo/path/file[@revision]")
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{quote(revision, safe='')}/{path}"


def _auth_value(header: str, value: str) -> str:
    if header.lower() == "authorization" and " " not in value.strip():
        return f"Bearer {value.strip()}"
    return value.strip()


def resolve(entry: ModelEntry, environ: Mapping[str, str], s3_defaults: Any = None) -> Source:
    """The source of one entry; raises ManifestError when a named variable is not set."""
    url = entry.url
    lowered = url.lower()
    if lowered.startswith("s3://"):
        return _s3_source(entry, environ, s3_defaults)
    hf_endpoint = environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT
    if lowered.startswith("hf://"):
        url = hf_resolve_url(url, hf_endpoint)
    headers: dict[str, str] = {}
    host = urlsplit(url).hostname or ""
    if entry.auth_env:
        value = environ.get(entry.auth_env)
        if not value:
            raise ManifestError(f"{entry.origin}.auth_env: the environment variable "
                                f"{entry.auth_env} is not set (it holds the {entry.auth_header} "
                                f"for {redact(url)})")
        headers[entry.auth_header] = _auth_value(entry.auth_header, value)
    elif host == urlsplit(hf_endpoint).hostname and environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {environ['HF_TOKEN'].strip()}"
    return HttpSource(url, headers, auth_host=host if headers else "")


def _s3_source(entry: ModelEntry, environ: Mapping[str, str], defaults: Any) -> S3Source:
    parts = urlsplit(entry.url)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket or not key:
        raise ManifestError(f"{entry.origin}.url: expected s3://bucket/key, got {entry.url!r}")
    key_id = secret = ""
    if entry.access_key_env or entry.secret_key_env:
        for name in (entry.access_key_env, entry.secret_key_env):
            if not name or not environ.get(name):
                raise ManifestError(f"{entry.origin}: access_key_env and secret_key_env must both "
                                    f"name set environment variables ({name or 'missing'} is not)")
        key_id, secret = environ[entry.access_key_env], environ[entry.secret_key_env]
    elif entry.endpoint_url:
        raise ManifestError(f"{entry.origin}: an entry with its own endpoint_url must bring its "
                            "own keys (access_key_env, secret_key_env)")
    elif defaults is not None:
        key_id, secret = defaults.access_key_id, defaults.secret_access_key
    endpoint = entry.endpoint_url or (defaults.endpoint_url if defaults is not None else "")
    region = entry.region or (defaults.region if defaults is not None else "")
    return S3Source(bucket, key, endpoint, region, key_id, secret)
