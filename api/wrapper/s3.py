"""Upload a request's outputs to S3 (or an S3-compatible store) and hand back presigned GET URLs.

boto3 is synchronous, so every network call runs on the uploader's own thread pool, never on
the event loop. The pool's size is the bound on parallel uploads. Each failure becomes a short
sentence a client can act on ("bucket 'x' does not exist"); secrets never appear in messages,
logs or reprs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # boto3 costs ~10 MB of memory: it is imported only once S3 is used
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

from api.host.netcheck import redact_url

log = logging.getLogger(__name__)

# SigV4 presigned URLs are valid for at most seven days.
MAX_PRESIGN_EXPIRY = 604800

AddressingStyle = Literal["auto", "path", "virtual"]


class RequestFieldError(ValueError):
    """A field of the request body is invalid; ``field`` names it (``s3.bucket_name``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _mask(value: str) -> str:
    return "<set>" if value else "<unset>"


def _mask_key_id(value: str) -> str:
    # The key id is not the secret, but showing only its tail is enough to tell keys apart.
    if not value:
        return "<unset>"
    return f"...{value[-4:]}" if len(value) > 8 else "<set>"


@dataclass(frozen=True, repr=False)
class S3Settings:
    """Where and as whom to upload. Empty strings mean "not given"."""

    access_key_id: str = ""
    secret_access_key: str = ""
    bucket_name: str = ""
    endpoint_url: str = ""
    region: str = ""

    @property
    def enabled(self) -> bool:
        """Uploads happen only when key, secret and bucket are all known."""
        return bool(self.access_key_id and self.secret_access_key and self.bucket_name)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> S3Settings:
        """Read the ``S3_*`` variables of the contract from ``environ``."""
        return cls(
            access_key_id=environ.get("S3_ACCESS_KEY_ID", "").strip(),
            secret_access_key=environ.get("S3_SECRET_ACCESS_KEY", "").strip(),
            bucket_name=environ.get("S3_BUCKET_NAME", "").strip(),
            endpoint_url=environ.get("S3_ENDPOINT_URL", "").strip(),
            region=environ.get("S3_REGION", "").strip(),
        )

    def client_key(self) -> tuple[str, str, str, str]:
        """What a boto3 client depends on (the bucket is a per-call parameter)."""
        return (self.access_key_id, self.secret_access_key, self.endpoint_url, self.region)

    def __repr__(self) -> str:
        return (
            f"S3Settings(access_key_id={_mask_key_id(self.access_key_id)!r}, "
            f"secret_access_key={_mask(self.secret_access_key)!r}, "
            f"bucket_name={self.bucket_name!r}, endpoint_url={redact_url(self.endpoint_url)!r}, "
            f"region={self.region!r})"
        )


_S3_FIELDS = ("access_key_id", "secret_access_key", "bucket_name", "endpoint_url", "region")


def merge(env: S3Settings, request_block: Mapping[str, Any] | None) -> S3Settings:
    """The request's ``s3`` block over the environment's settings, field by field.

    A non-empty request value wins; an empty or absent one keeps the environment's value.
    Raises RequestFieldError for a block that is not an object, an unknown key or a
    non-string value.
    """
    if request_block is None:
        return env
    if not isinstance(request_block, Mapping):
        raise RequestFieldError("s3", "must be an object")
    unknown = sorted(str(k) for k in request_block if k not in _S3_FIELDS)
    if unknown:
        raise RequestFieldError(
            "s3", f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_S3_FIELDS)}"
        )
    overrides: dict[str, str] = {}
    for name in _S3_FIELDS:
        value = request_block.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            # Never echo the value: it may be a secret sent in the wrong shape.
            raise RequestFieldError(f"s3.{name}", f"must be a string, not {type(value).__name__}")
        value = value.strip()
        if value:
            overrides[name] = value
    endpoint = overrides.get("endpoint_url")
    if endpoint is not None and not endpoint.lower().startswith(("http://", "https://")):
        raise RequestFieldError("s3.endpoint_url", "must start with http:// or https://")
    return replace(env, **overrides) if overrides else env


@dataclass(frozen=True)
class UploadItem:
    """One local output file and how it should be stored."""

    local_path: Path
    filename: str
    mimetype: str


@dataclass(frozen=True)
class UploadOutcome:
    """Either a presigned GET URL or an error sentence (never both)."""

    url: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.url is not None


class S3Uploader:
    """Uploads files with boto3's managed transfer on a bounded thread pool.

    ``retries`` is the number of extra attempts botocore makes for transient failures
    (connection errors, timeouts, 5xx, throttling), with its exponential backoff.
    """

    def __init__(
        self,
        max_parallel: int = 4,
        retries: int = 3,
        presign_expiry: int = MAX_PRESIGN_EXPIRY,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        addressing_style: AddressingStyle | None = None,
        multipart_threshold: int = 64 * 1024 * 1024,
        client_cache_size: int = 16,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        if not 1 <= presign_expiry <= MAX_PRESIGN_EXPIRY:
            raise ValueError(f"presign_expiry must be between 1 and {MAX_PRESIGN_EXPIRY} seconds")
        self.max_parallel = max_parallel
        self.retries = retries
        self.presign_expiry = presign_expiry
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._addressing_style = addressing_style
        # Multipart parts of one file share a small pool; files themselves are bounded by
        # max_parallel, so the connection pool needs room for both.
        self._multipart_threshold = multipart_threshold
        self._transfer_config_cache: Any = None
        self._executor = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="s3-upload")
        self._clients: OrderedDict[tuple[str, str, str, str], BaseClient] = OrderedDict()
        self._client_cache_size = client_cache_size
        # Client creation on a shared path is not thread-safe in boto3; one lock serialises it.
        self._clients_lock = threading.Lock()
        self._closed = False

    async def upload(
        self, settings: S3Settings, request_id: str, files: list[UploadItem]
    ) -> list[UploadOutcome]:
        """Upload ``files`` under ``{request_id}/{filename}``; outcomes come back in the same order.

        Never raises for a failed upload: each failure is an outcome with ``error`` set, and the
        local file is left in place.
        """
        if self._closed:
            raise RuntimeError("S3Uploader is closed; create a new one")
        if not files:
            return []
        if not settings.enabled:
            missing = [
                name
                for name, value in (
                    ("access_key_id", settings.access_key_id),
                    ("secret_access_key", settings.secret_access_key),
                    ("bucket_name", settings.bucket_name),
                )
                if not value
            ]
            error = f"S3 is not configured (missing {', '.join(missing)})"
            return [UploadOutcome(error=error) for _ in files]
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(self._executor, self._upload_one, settings, request_id, item)
            for item in files
        ]
        return list(await asyncio.gather(*jobs))

    async def close(self) -> None:
        """Wait for uploads in progress, then release threads and clients."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        with self._clients_lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()

    # -- worker-thread side ------------------------------------------------------------------

    def _upload_one(self, settings: S3Settings, request_id: str, item: UploadItem) -> UploadOutcome:
        key = object_key(request_id, item.filename)
        bucket = settings.bucket_name
        try:
            client = self._client(settings)
            client.upload_file(
                str(item.local_path),
                bucket,
                key,
                ExtraArgs={"ContentType": item.mimetype or "application/octet-stream"},
                Config=self._transfer_config,
            )
            url = client.generate_presigned_url(
                "get_object",
                Params={"Bucket": bucket, "Key": key},
                ExpiresIn=self.presign_expiry,
            )
        except Exception as exc:  # every failure becomes an outcome; nothing escapes the batch
            error = describe_error(exc, settings, item)
            log.warning("S3 upload of %s to s3://%s/%s failed: %s", item.local_path, bucket, key, error)
            return UploadOutcome(error=error)
        log.info("uploaded %s to s3://%s/%s", item.local_path, bucket, key)
        return UploadOutcome(url=url)

    def _client(self, settings: S3Settings) -> BaseClient:
        cache_key = settings.client_key()
        with self._clients_lock:
            client = self._clients.get(cache_key)
            if client is not None:
                self._clients.move_to_end(cache_key)
                return client
            client = self._make_client(settings)
            self._clients[cache_key] = client
            while len(self._clients) > self._client_cache_size:
                _, evicted = self._clients.popitem(last=False)
                evicted.close()
            return client

    @property
    def _transfer_config(self) -> Any:
        if self._transfer_config_cache is None:
            from boto3.s3.transfer import TransferConfig

            self._transfer_config_cache = TransferConfig(
                multipart_threshold=self._multipart_threshold, max_concurrency=4,
                use_threads=True)
        return self._transfer_config_cache

    def _make_client(self, settings: S3Settings) -> BaseClient:
        # boto3 (~10 MB) is loaded with the first upload, not at start (see the imports above).
        import boto3
        from botocore.config import Config

        style = self._addressing_style
        if style is None:
            # Custom endpoints (MinIO, R2, B2, Wasabi...) are reached reliably by path;
            # virtual-host addressing needs wildcard DNS that self-hosted stores rarely have.
            style = "path" if settings.endpoint_url else "auto"
        config = Config(
            signature_version="s3v4",
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            retries={"mode": "standard", "max_attempts": self.retries + 1},
            max_pool_connections=self.max_parallel * self._transfer_config.max_request_concurrency,
            s3={"addressing_style": style},
            # Newer botocore adds CRC checksums to every upload; several S3-compatible stores
            # reject those headers, so only send checksums where the API requires them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of its own: no profile, no shared state between threads.
        session = boto3.session.Session(
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            region_name=settings.region or None,
        )
        return session.client("s3", endpoint_url=settings.endpoint_url or None, config=config)


def object_key(request_id: str, filename: str) -> str:
    """The object key of one output: ``{request_id}/{filename}``."""
    return f"{request_id}/{filename.lstrip('/')}"


_BAD_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "InvalidToken",
}


def _client_error(exc: BaseException) -> ClientError | None:
    """boto3 wraps ClientError in S3UploadFailedError (implicitly chained); find it."""
    from botocore.exceptions import ClientError
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ClientError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def describe_error(exc: BaseException, settings: S3Settings, item: UploadItem) -> str:
    """One plain sentence for a failed upload. Never includes the secret."""
    from botocore.exceptions import (
        BotoCoreError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    bucket = settings.bucket_name
    endpoint = redact_url(settings.endpoint_url) if settings.endpoint_url else "the default AWS endpoint"
    if isinstance(exc, FileNotFoundError):
        return f"local file not found: {item.local_path}"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return f"S3 endpoint unreachable: {endpoint}"
    if isinstance(exc, ReadTimeoutError):
        return f"S3 endpoint timed out: {endpoint}"
    if isinstance(exc, NoCredentialsError):
        return "S3 credentials are missing"
    client_error = _client_error(exc)
    if client_error is not None:
        error = client_error.response.get("Error", {})
        code = str(error.get("Code", "")) or "unknown"
        status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _BAD_CREDENTIAL_CODES:
            return f"bad credentials ({code}): check the S3 access key id and secret"
        if code == "NoSuchBucket" or (code == "404" and status == 404):
            return f"bucket '{bucket}' does not exist"
        if code in ("AccessDenied", "AllAccessDisabled", "403"):
            return f"access denied to bucket '{bucket}' ({code})"
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            return f"bucket '{bucket}' is in another region ({code}); set the S3 region"
        message = str(error.get("Message", "")).strip()
        detail = f": {message}" if message else ""
        return f"S3 rejected the upload ({code}){detail}"
    if isinstance(exc, BotoCoreError):
        return f"S3 upload failed: {type(exc).__name__}"
    if isinstance(exc, OSError):
        return f"cannot read local file {item.local_path}: {exc.strerror or exc}"
    return f"S3 upload failed: {type(exc).__name__}"
