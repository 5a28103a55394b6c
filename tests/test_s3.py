"""S3 uploads against a real moto server over HTTP on 127.0.0.1."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from api.wrapper.s3 import (
    RequestFieldError,
    S3Settings,
    S3Uploader,
    UploadItem,
    merge,
)
from tests.support.moto_server import ANY_KEY_ID, ANY_SECRET, MotoServer
from tests.support.net import free_port
from tests.support.timing import allowance


def bucket_name() -> str:
    return f"out-{uuid.uuid4().hex[:12]}"


def settings_for(server: MotoServer, bucket: str, key_id: str = ANY_KEY_ID, secret: str = ANY_SECRET) -> S3Settings:
    return S3Settings(
        access_key_id=key_id,
        secret_access_key=secret,
        bucket_name=bucket,
        endpoint_url=server.endpoint_url,
        region="us-east-1",
    )


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


async def fetch(url: str) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as session:
        # encoded=True: the presigned query must reach the server byte for byte.
        async with session.get(URL(url, encoded=True)) as response:
            return response.status, await response.read(), response.headers.get("Content-Type", "")


@pytest.fixture
async def uploader():
    up = S3Uploader(max_parallel=2, retries=1, connect_timeout=2, read_timeout=10)
    yield up
    await up.close()


@pytest.mark.real_processes
async def test_presigned_urls_download_the_same_bytes_with_content_type(moto_server, uploader, tmp_path):
    bucket = bucket_name()
    moto_server.create_bucket(bucket)
    png = write(tmp_path, "img_00001_.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    meta = write(tmp_path, "meta.json", b'{"seed": 1}')
    big = write(tmp_path, "clip.mp4", b"v" * (3 * 1024 * 1024))
    items = [
        UploadItem(png, png.name, "image/png"),
        UploadItem(meta, meta.name, "application/json"),
        UploadItem(big, big.name, "video/mp4"),
    ]

    outcomes = await uploader.upload(settings_for(moto_server, bucket), "req-1", items)

    assert [o.error for o in outcomes] == [None, None, None]
    for item, outcome in zip(items, outcomes):
        assert outcome.url is not None
        assert f"/{bucket}/req-1/{item.filename}" in outcome.url
        assert "X-Amz-Expires=604800" in outcome.url
        status, body, content_type = await fetch(outcome.url)
        assert status == 200
        assert body == item.local_path.read_bytes()
        assert content_type == item.mimetype
    head = moto_server.client().head_object(Bucket=bucket, Key="req-1/img_00001_.png")
    assert head["ContentType"] == "image/png"


@pytest.mark.real_processes
async def test_presign_expiry_is_configurable(moto_server, tmp_path):
    bucket = bucket_name()
    moto_server.create_bucket(bucket)
    path = write(tmp_path, "a.png", b"a")
    up = S3Uploader(presign_expiry=3600)
    try:
        [outcome] = await up.upload(settings_for(moto_server, bucket), "r", [UploadItem(path, "a.png", "image/png")])
    finally:
        await up.close()
    assert outcome.url is not None and "X-Amz-Expires=3600" in outcome.url
    with pytest.raises(ValueError):
        S3Uploader(presign_expiry=604801)


@pytest.mark.real_processes
async def test_many_files_keep_their_order_with_bounded_parallelism(moto_server, uploader, tmp_path):
    bucket = bucket_name()
    moto_server.create_bucket(bucket)
    # Sizes descending so the later (smaller) files would finish first if order were lost.
    items = [
        UploadItem(write(tmp_path, f"f{i}.bin", bytes([i]) * (200_000 - i * 30_000)), f"f{i}.bin", "application/octet-stream")
        for i in range(6)
    ]
    outcomes = await uploader.upload(settings_for(moto_server, bucket), "order", items)
    for item, outcome in zip(items, outcomes):
        assert outcome.url is not None and outcome.url.split("?")[0].endswith(f"/order/{item.filename}")
        _, body, _ = await fetch(outcome.url)
        assert body == item.local_path.read_bytes()


@pytest.mark.real_processes
async def test_missing_bucket_names_the_bucket_and_keeps_the_file(moto_server, uploader, tmp_path):
    path = write(tmp_path, "keep.png", b"data")
    [outcome] = await uploader.upload(
        settings_for(moto_server, "no-such-bucket-here"), "r2", [UploadItem(path, path.name, "image/png")]
    )
    assert outcome.url is None
    assert outcome.error == "bucket 'no-such-bucket-here' does not exist"
    assert path.read_bytes() == b"data"


@pytest.mark.real_processes
async def test_missing_local_file_is_reported(moto_server, uploader, tmp_path):
    bucket = bucket_name()
    moto_server.create_bucket(bucket)
    good = write(tmp_path, "good.png", b"g")
    outcomes = await uploader.upload(
        settings_for(moto_server, bucket),
        "r3",
        [UploadItem(tmp_path / "gone.png", "gone.png", "image/png"), UploadItem(good, "good.png", "image/png")],
    )
    assert outcomes[0].url is None and "gone.png" in (outcomes[0].error or "")
    assert "not found" in (outcomes[0].error or "")
    assert outcomes[1].url is not None


@pytest.mark.real_processes
async def test_credentials_are_checked_when_moto_auth_is_on(moto_server, uploader, tmp_path):
    bucket = bucket_name()
    moto_server.create_bucket(bucket)
    key = moto_server.create_iam_user(f"worker-{uuid.uuid4().hex[:6]}")
    path = write(tmp_path, "auth.png", b"auth")
    item = UploadItem(path, path.name, "image/png")
    with moto_server.iam_auth():
        [right] = await uploader.upload(
            settings_for(moto_server, bucket, key.access_key_id, key.secret_access_key), "ok", [item]
        )
        [wrong_secret] = await uploader.upload(
            settings_for(moto_server, bucket, key.access_key_id, "not-the-secret-xyz"), "bad", [item]
        )
        [unknown_key] = await uploader.upload(
            settings_for(moto_server, bucket, "AKIAUNKNOWNKEY000000", key.secret_access_key), "bad", [item]
        )
    assert right.error is None and right.url is not None
    assert wrong_secret.url is None
    assert wrong_secret.error is not None and wrong_secret.error.startswith("bad credentials (SignatureDoesNotMatch)")
    assert unknown_key.error is not None and unknown_key.error.startswith("bad credentials (InvalidAccessKeyId)")
    assert "not-the-secret-xyz" not in wrong_secret.error
    assert path.exists()


async def test_unreachable_endpoint_fails_fast_with_plain_words(tmp_path):
    port = free_port()  # nothing listens there
    path = write(tmp_path, "x.png", b"x")
    up = S3Uploader(retries=1, connect_timeout=1, read_timeout=2)
    settings = S3Settings("AKIAXXXXXXXXXXXXXXXX", "s3cr3t-value", "b", f"http://127.0.0.1:{port}", "us-east-1")
    started = time.monotonic()
    try:
        [outcome] = await up.upload(settings, "r", [UploadItem(path, path.name, "image/png")])
    finally:
        await up.close()
    assert time.monotonic() - started < allowance(6)
    assert outcome.error == f"S3 endpoint unreachable: http://127.0.0.1:{port}"
    assert path.exists()


async def test_not_configured_gives_an_error_per_file(tmp_path):
    path = write(tmp_path, "x.png", b"x")
    up = S3Uploader()
    try:
        outcomes = await up.upload(S3Settings(bucket_name="b"), "r", [UploadItem(path, "x.png", "image/png")] * 2)
    finally:
        await up.close()
    assert [o.error for o in outcomes] == ["S3 is not configured (missing access_key_id, secret_access_key)"] * 2


@pytest.mark.real_processes
async def test_request_block_overrides_environment_field_by_field(moto_server, uploader, tmp_path):
    env_bucket, request_bucket = bucket_name(), bucket_name()
    moto_server.create_bucket(env_bucket)
    moto_server.create_bucket(request_bucket)
    env = settings_for(moto_server, env_bucket)

    merged = merge(env, {"bucket_name": request_bucket, "secret_access_key": "", "region": None})
    assert merged.bucket_name == request_bucket
    assert merged.secret_access_key == env.secret_access_key  # empty in the request: env kept
    assert merged.access_key_id == env.access_key_id
    assert merged.endpoint_url == env.endpoint_url
    assert merged.region == "us-east-1"
    assert merge(env, None) == env
    assert merge(S3Settings(), {"access_key_id": "k", "secret_access_key": "s", "bucket_name": "b"}).enabled

    path = write(tmp_path, "o.png", b"over")
    [outcome] = await uploader.upload(merged, "ov", [UploadItem(path, path.name, "image/png")])
    assert outcome.url is not None and f"/{request_bucket}/ov/o.png" in outcome.url
    listed = moto_server.client().list_objects_v2(Bucket=env_bucket)
    assert listed.get("KeyCount", 0) == 0


@pytest.mark.parametrize(
    ("block", "field", "words"),
    [
        ({"bucket": "x"}, "s3", "unknown field(s) bucket"),
        ({"secret_access_key": 12345}, "s3.secret_access_key", "must be a string, not int"),
        ({"endpoint_url": "ftp://x"}, "s3.endpoint_url", "http:// or https://"),
        (["not", "an", "object"], "s3", "must be an object"),
    ],
)
def test_invalid_request_block_is_a_clear_error(block, field, words):
    with pytest.raises(RequestFieldError) as info:
        merge(S3Settings(), block)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert words in str(info.value)
    assert "12345" not in str(info.value)


@pytest.mark.real_processes
async def test_secret_never_appears_in_logs_reprs_or_errors(moto_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "SuperSecretValue-do-not-log-0123456789"
    bucket = bucket_name()
    moto_server.create_bucket(bucket)
    path = write(tmp_path, "s.png", b"s")
    item = UploadItem(path, path.name, "image/png")
    good = settings_for(moto_server, bucket, secret=secret)
    up = S3Uploader(retries=0, connect_timeout=1)
    try:
        outcomes = await up.upload(good, "s", [item])
        outcomes += await up.upload(settings_for(moto_server, "missing-bucket", secret=secret), "s", [item])
        down = S3Settings("AKIAXXXXXXXXXXXXXXXX", secret, "b", f"http://127.0.0.1:{free_port()}")
        outcomes += await up.upload(down, "s", [item])
    finally:
        await up.close()
    assert outcomes[0].url is not None
    assert outcomes[1].error and outcomes[2].error
    assert "missing-bucket" in caplog.text  # the failures were logged ...
    assert secret not in caplog.text  # ... without the secret
    assert all(secret not in (o.error or "") for o in outcomes)
    assert secret not in repr(good) and secret not in str(good)
    assert "<set>" in repr(good)
