"""The download engine against a real local HTTP server and a moto S3 server.

Each case ends in a verified file at its place or a clear error — never a partial file where
ComfyUI would look (only the hidden `.name.part` beside it, kept for a resume)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from api.modelstore import download as download_module
from api.modelstore.download import Downloader, part_path
from api.modelstore.errors import (
    AuthRequired,
    DigestMismatch,
    DownloadError,
    NotEnoughSpace,
    SourceMissing,
)
from api.modelstore.manifest import parse_entries
from api.modelstore.progress import FileProgress
from api.modelstore.store import EntryState, ModelStore
from tests.support.fileserver import FileServer
from tests.support.moto_server import ANY_KEY_ID, ANY_SECRET

DATA = os.urandom(3 * 1024 * 1024 + 123)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server():
    with FileServer(files={"model.safetensors": DATA}) as running:
        yield running


def store_for(tmp_path: Path, environ=None, s3=None, **engine) -> ModelStore:
    options = dict(retries=2, backoff_initial=0.05, backoff_max=0.2, read_timeout=5)
    options.update(engine)
    return ModelStore(tmp_path / "models", tmp_path / "state", Downloader(**options),
                      environ=environ or {}, s3_defaults=s3, parallel=2)


def entry(url: str, sha256: str | None = SHA, **extra):
    table = {"url": url, "path": "checkpoints/model.safetensors", **extra}
    if sha256:
        table["sha256"] = sha256
    return parse_entries([table], "models.files")[0]


def visible_files(tmp_path: Path) -> list[str]:
    """What ComfyUI would list: files in the models folder that are not hidden."""
    root = tmp_path / "models"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith("."))


async def test_download_is_verified_and_atomic(tmp_path, server):
    store = store_for(tmp_path)
    progress = FileProgress("model")
    status = await store.ensure(entry(f"{server.url}/model.safetensors"), progress)
    await store.downloader.close()
    assert status.state is EntryState.VERIFIED and status.sha256 == SHA
    dest = tmp_path / "models/checkpoints/model.safetensors"
    assert dest.read_bytes() == DATA
    assert not part_path(dest).exists()
    assert progress.done == len(DATA) and progress.total == len(DATA)
    assert store.digests.known(dest) == SHA  # a restart will not hash it again


async def test_present_file_with_right_digest_is_not_fetched_again(tmp_path, server):
    store = store_for(tmp_path)
    await store.ensure(entry(f"{server.url}/model.safetensors"))
    count = len(server.seen)
    status = await store.ensure(entry(f"{server.url}/model.safetensors"))
    await store.downloader.close()
    assert status.state is EntryState.VERIFIED
    assert len(server.seen) == count


async def test_cut_connection_resumes_with_range(tmp_path, server):
    server.cut_after, server.cuts_left = 1024 * 1024 + 7, 2
    store = store_for(tmp_path)
    status = await store.ensure(entry(f"{server.url}/model.safetensors"))
    await store.downloader.close()
    assert status.state is EntryState.VERIFIED
    ranges = [s.range for s in server.seen]
    assert ranges[0] is None and ranges[1] and ranges[1].startswith("bytes=")
    assert int(ranges[1][6:-1]) > 0 and int(ranges[2][6:-1]) > int(ranges[1][6:-1])
    assert (tmp_path / "models/checkpoints/model.safetensors").read_bytes() == DATA


async def test_server_that_ignores_range_starts_over_and_still_verifies(tmp_path, server):
    server.cut_after, server.cuts_left, server.ignore_range = 500_000, 1, True
    store = store_for(tmp_path)
    status = await store.ensure(entry(f"{server.url}/model.safetensors"))
    await store.downloader.close()
    assert status.state is EntryState.VERIFIED
    assert server.seen[1].range is not None and server.seen[1].status == 200


async def test_connection_that_keeps_dying_ends_in_a_clear_error(tmp_path, server):
    server.cut_after, server.cuts_left = 0, 100
    store = store_for(tmp_path, retries=2)
    with pytest.raises(DownloadError) as caught:
        await store.ensure(entry(f"{server.url}/model.safetensors"))
    await store.downloader.close()
    assert "connection" in str(caught.value) and "model.safetensors" in str(caught.value)
    assert len(server.seen) == 3  # the first try and two retries
    assert visible_files(tmp_path) == []


async def test_wrong_digest_deletes_the_download_and_names_both_digests(tmp_path, server):
    store = store_for(tmp_path)
    wrong = "0" * 64
    with pytest.raises(DigestMismatch) as caught:
        await store.ensure(entry(f"{server.url}/model.safetensors", sha256=wrong))
    await store.downloader.close()
    assert wrong in str(caught.value) and SHA in str(caught.value)
    assert list((tmp_path / "models/checkpoints").iterdir()) == []


async def test_slow_server_completes_and_reports_its_rate(tmp_path, server):
    server.chunk_delay = 0.02
    store = store_for(tmp_path)
    progress = FileProgress("model")
    rates = []
    import asyncio

    async def watch():
        while True:
            await asyncio.sleep(0.1)
            rates.append(progress.rate)

    watcher = asyncio.create_task(watch())
    status = await store.ensure(entry(f"{server.url}/model.safetensors"), progress)
    watcher.cancel()
    await store.downloader.close()
    assert status.state is EntryState.VERIFIED
    assert max(rates) > 0
    assert " at " in progress.describe() or progress.done == len(DATA)


async def test_stalled_server_is_cut_by_the_read_timeout(tmp_path, server):
    server.chunk_delay = 3
    store = store_for(tmp_path, retries=0, read_timeout=0.5)
    with pytest.raises(DownloadError) as caught:
        await store.ensure(entry(f"{server.url}/model.safetensors"))
    await store.downloader.close()
    assert "no data for 0.5 s" in str(caught.value)
    assert visible_files(tmp_path) == []


async def test_401_without_token_names_the_fix_and_the_token_is_sent_when_set(tmp_path, server):
    server.token = "s3cr3t"
    url = f"{server.url}/model.safetensors"
    store = store_for(tmp_path)
    with pytest.raises(AuthRequired) as caught:
        await store.ensure(entry(url))
    assert "HTTP 401" in str(caught.value) and "auth_env" in str(caught.value)
    assert visible_files(tmp_path) == []
    store = store_for(tmp_path, environ={"MY_TOKEN": "s3cr3t"})
    status = await store.ensure(entry(url, auth_env="MY_TOKEN"))
    await store.downloader.close()
    assert status.state is EntryState.VERIFIED
    assert server.seen[-1].authorization == "Bearer s3cr3t"
    assert "s3cr3t" not in repr(status.to_dict())


async def test_404_is_a_clear_error(tmp_path, server):
    store = store_for(tmp_path)
    with pytest.raises(SourceMissing) as caught:
        await store.ensure(entry(f"{server.url}/nope.safetensors"))
    await store.downloader.close()
    assert "HTTP 404" in str(caught.value) and "/nope.safetensors" in str(caught.value)
    assert visible_files(tmp_path) == []


async def test_not_enough_disk_is_refused_before_writing(tmp_path, server, monkeypatch):
    monkeypatch.setattr(download_module, "DISK_RESERVE_BYTES", 1 << 62)
    store = store_for(tmp_path)
    with pytest.raises(NotEnoughSpace) as caught:
        await store.ensure(entry(f"{server.url}/model.safetensors"))
    await store.downloader.close()
    assert "free" in str(caught.value) and str(tmp_path / "models/checkpoints") in str(caught.value)
    assert visible_files(tmp_path) == []


async def test_huggingface_url_with_token_and_announced_digest(tmp_path, server):
    # HF_ENDPOINT points the hf:// scheme at the local server, as it would at a mirror.
    server.files["org/repo/resolve/v1/unet/model.safetensors"] = DATA
    server.token = "hf_abc"
    env = {"HF_ENDPOINT": server.url, "HF_TOKEN": "hf_abc"}
    store = store_for(tmp_path, environ=env)
    status = await store.ensure(entry("hf://org/repo/unet/model.safetensors@v1", sha256=None))
    assert status.state is EntryState.PRESENT and status.sha256 == SHA
    assert server.seen[-1].authorization == "Bearer hf_abc"
    # Hugging Face announces an LFS file's digest; a corrupted copy is refused even without one
    # in the manifest.
    (tmp_path / "models/checkpoints/model.safetensors").unlink()
    server.headers = {"X-Linked-Etag": '"' + "a" * 64 + '"'}
    with pytest.raises(DigestMismatch):
        await store.ensure(entry("hf://org/repo/unet/model.safetensors@v1", sha256=None))
    await store.downloader.close()


@pytest.mark.real_processes
async def test_s3_object_is_fetched_and_verified(tmp_path, moto_server):  # noqa: F811
    moto_server.create_bucket("models")
    moto_server.client().put_object(Bucket="models", Key="sd/model.safetensors", Body=DATA)
    s3 = SimpleNamespace(access_key_id=ANY_KEY_ID, secret_access_key=ANY_SECRET,
                         endpoint_url=moto_server.endpoint_url, region="us-east-1")
    store = store_for(tmp_path, s3=s3)
    progress = FileProgress("model")
    status = await store.ensure(entry("s3://models/sd/model.safetensors"), progress)
    assert status.state is EntryState.VERIFIED
    assert (tmp_path / "models/checkpoints/model.safetensors").read_bytes() == DATA
    assert progress.done == len(DATA)
    (tmp_path / "models/checkpoints/model.safetensors").unlink()
    with pytest.raises(DigestMismatch):
        await store.ensure(entry("s3://models/sd/model.safetensors", sha256="1" * 64))
    with pytest.raises(SourceMissing) as caught:
        await store.ensure(entry("s3://models/sd/absent.safetensors"))
    assert "s3://models/sd/absent.safetensors" in str(caught.value)
    assert visible_files(tmp_path) == []


async def test_credentials_are_not_sent_along_a_redirect_to_another_host(tmp_path, server):
    # 127.0.0.1 and localhost are different hosts to the engine, as huggingface.co and its CDN.
    server.redirects["model.safetensors"] = f"http://localhost:{server.port}/cdn/model"
    server.files["cdn/model"] = DATA
    store = store_for(tmp_path, environ={"TOK": "secret"})
    status = await store.ensure(entry(f"{server.url}/model.safetensors", auth_env="TOK"))
    await store.downloader.close()
    assert status.state is EntryState.VERIFIED
    assert [(s.path, s.authorization) for s in server.seen] == [
        ("model.safetensors", "Bearer secret"), ("cdn/model", None)]


async def test_a_part_file_from_an_earlier_run_is_resumed_when_a_digest_will_judge_it(tmp_path,
                                                                                      server):
    dest = tmp_path / "models/checkpoints/model.safetensors"
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(DATA[:1_000_000])
    store = store_for(tmp_path)
    status = await store.ensure(entry(f"{server.url}/model.safetensors"))
    assert status.state is EntryState.VERIFIED and server.seen[-1].range == "bytes=1000000-"
    assert status.fetched.resumed_from == 1_000_000
    # Without a digest an old part file could mix two versions of the source: start over.
    dest.unlink()
    part_path(dest).write_bytes(b"x" * 1000)
    status = await store.ensure(entry(f"{server.url}/model.safetensors", sha256=None))
    await store.downloader.close()
    assert server.seen[-1].range is None and dest.read_bytes() == DATA
