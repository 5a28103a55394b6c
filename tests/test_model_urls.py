"""Model URLs in requests: the URL-keyed cache (shared downloads, LRU under a cap, pins) and the
wrapper end to end against the simulator and a local file server."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from api.modelstore.cache import CacheFull, UrlCache
from api.modelstore.download import Downloader
from api.modelstore.sources import HttpSource
from api.wrapper.model_urls import DEFAULT_MODEL_INPUTS, ModelUrlPolicy, find_model_urls
from simulator.testing import start_simulator
from tests.support.comfy_modes import API_VERSIONS
from tests.support.fileserver import FileServer
from tests.support.procs import post_json, start_wrapper

MB = 1_000_000
FILES = {f"{n}.safetensors": os.urandom(MB) for n in "abcde"}


def make_cache(tmp_path: Path, cap: int) -> UrlCache:
    return UrlCache(tmp_path / "cache", tmp_path / "models",
                    Downloader(retries=0, backoff_initial=0.05), cap)


async def test_concurrent_requests_for_one_url_share_one_download(tmp_path):
    with FileServer(files=dict(FILES), chunk_delay=0.01) as server:
        cache = make_cache(tmp_path, 10 * MB)
        source = HttpSource(f"{server.url}/a.safetensors")
        first, second = await asyncio.gather(cache.acquire(source, "checkpoints"),
                                             cache.acquire(source, "checkpoints"))
        await cache.downloader.close()
    assert len(server.seen) == 1 and cache.downloads == 1
    assert first.name == second.name and first.name.startswith("url-cache/")
    link = tmp_path / "models/checkpoints" / first.name
    assert link.is_symlink() and link.read_bytes() == FILES["a.safetensors"]
    assert first.entry.pins == 2


async def test_lru_eviction_under_the_cap_never_removes_a_file_in_use(tmp_path):
    with FileServer(files=dict(FILES)) as server:
        cache = make_cache(tmp_path, int(2.5 * MB))

        async def take(name):
            return await cache.acquire(HttpSource(f"{server.url}/{name}.safetensors"), "loras")

        held = await take("a")          # a request holds a: the oldest, but in use
        cache.release(await take("b"))
        cache.release(await take("c"))  # 3 MB > 2.5 MB: b goes (a is pinned)
        assert sorted(e.name for e in cache.entries.values()) == ["a.safetensors",
                                                                  "c.safetensors"]
        d = await take("d")             # c goes, a stays
        assert sorted(e.name for e in cache.entries.values()) == ["a.safetensors",
                                                                  "d.safetensors"]
        assert (tmp_path / "models/loras" / held.name).read_bytes() == FILES["a.safetensors"]
        links = sorted(p.name for p in (tmp_path / "models/loras/url-cache").iterdir())
        assert len(links) == 2 and all(n.endswith(("a.safetensors", "d.safetensors"))
                                       for n in links)
        assert cache.used_bytes <= 2.5 * MB
        # Everything left is in use: a new file is refused rather than evicting one.
        with pytest.raises(CacheFull) as caught:
            await take("e")
        assert "models.cache_max_gb" in str(caught.value)
        assert (tmp_path / "models/loras" / held.name).exists()
        cache.release(held)
        cache.release(d)
        await take("e")                 # now the least recently used (a) may go
        assert "a.safetensors" not in {e.name for e in cache.entries.values()}
        # A restart finds the cache as it was.
        again = make_cache(tmp_path, int(2.5 * MB))
        await again.load()
        assert {e.name for e in again.entries.values()} == {e.name for e in cache.entries.values()}
        await cache.downloader.close()


async def test_a_file_larger_than_the_cache_is_refused_before_it_is_written(tmp_path):
    with FileServer(files=dict(FILES)) as server:
        cache = make_cache(tmp_path, MB // 2)
        with pytest.raises(CacheFull) as caught:
            await cache.acquire(HttpSource(f"{server.url}/a.safetensors"), "vae")
        await cache.downloader.close()
    assert "more than the whole model cache" in str(caught.value)
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


def test_policy_refuses_urls_when_off_and_hosts_not_allowed():
    graph = {"4": {"class_type": "CheckpointLoaderSimple",
                   "inputs": {"ckpt_name": "https://models.example.com/a.safetensors"}},
             "5": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "https://x.org/v"}},
             "6": {"class_type": "LoadImage", "inputs": {"image": "https://x.org/i.png"}}}
    refs = find_model_urls(graph, DEFAULT_MODEL_INPUTS)
    assert [(r.node_id, r.folder) for r in refs] == [("4", "checkpoints"), ("5", "clip_vision")]
    off = ModelUrlPolicy(False, [], False).problems(refs)
    assert "models.allow_request_urls" in off["node 4 input 'ckpt_name'"]
    on = ModelUrlPolicy(True, [".example.com"], False).problems(refs)
    assert list(on) == ["node 5 input 'clip_name'"] and "models.allowed_hosts" in on[
        "node 5 input 'clip_name'"]


# --- through the wrapper ---------------------------------------------------------------------------
def text2image(ckpt: str | None = None) -> dict:
    mods = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3}
    if ckpt:
        mods["ckpt_name"] = ckpt
    return {"input": {"modifier": "Text2Image", "modifications": mods}}


@pytest.fixture(scope="module", params=API_VERSIONS,
                ids=[f"comfyui-{v}" for v in API_VERSIONS])
def api_version(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def stack(tmp_path_factory, api_version):
    tmp = tmp_path_factory.mktemp("modelurls")
    with FileServer(files=dict(FILES)) as files, \
            start_simulator(tmp, "--step-seconds", "0.01", api_version=api_version) as sim:
        env = dict(COMFYUI_MODELS_DIR=str(sim.base_dir / "models"),
                   MODELS_ALLOW_REQUEST_URLS="true", MODELS_ALLOWED_HOSTS="127.0.0.1",
                   MODELS_CACHE_MAX_GB="1")
        with start_wrapper(tmp, sim.url, sim.output_dir, MODELS_ALLOW_PRIVATE_HOSTS="true",
                           **env) as wrapper, \
                start_wrapper(tmp, sim.url, sim.output_dir, state_dir=tmp / "strict",
                              MODELS_ALLOW_PRIVATE_HOSTS="false", **env) as strict:
            yield files, sim, wrapper, strict


@pytest.mark.real_processes
def test_two_requests_for_one_model_url_download_it_once(stack):
    files, sim, wrapper, _ = stack
    files.chunk_delay = 0.02
    url = f"{files.url}/b.safetensors"
    answers = []

    def send():
        answers.append(post_json(wrapper.url + "/generate/sync", text2image(url)))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    files.chunk_delay = 0
    assert [a[0] for a in answers] == [200, 200], answers
    assert [s.path for s in files.seen].count("b.safetensors") == 1
    assert max(a[1]["timings"]["model_download_ms"] for a in answers) >= 100
    linked = list((sim.base_dir / "models/checkpoints/url-cache").glob("*-b.safetensors"))
    assert len(linked) == 1 and linked[0].is_symlink()
    with urllib.request.urlopen(wrapper.url + "/metrics", timeout=5) as answer:
        metrics = answer.read().decode()
    assert "comfy_worker_model_cache_downloads_total 1.0" in metrics
    # Cached now: a third request does not download again.
    status, body = post_json(wrapper.url + "/generate/sync", text2image(url))
    assert status == 200 and body["timings"]["model_download_ms"] < 1000
    assert [s.path for s in files.seen].count("b.safetensors") == 1


@pytest.mark.real_processes
def test_a_request_waiting_for_a_download_lets_others_run_first(stack):
    files, _sim, wrapper, _ = stack
    files.chunk_delay = 0.1  # about 1.6 s for the file
    finished = {}

    def send(name, body):
        status, answer = post_json(wrapper.url + "/generate/sync", body)
        finished[name] = (time.monotonic(), status)

    slow = threading.Thread(target=send, args=("download", text2image(f"{files.url}/c.safetensors")))
    slow.start()
    time.sleep(0.3)
    quick = threading.Thread(target=send, args=("plain", text2image()))
    quick.start()
    quick.join(60)
    slow.join(60)
    files.chunk_delay = 0
    assert finished["plain"][1] == 200 and finished["download"][1] == 200
    assert finished["plain"][0] < finished["download"][0]


@pytest.mark.real_processes
def test_host_not_on_the_allowlist_is_400(stack):
    _files, _sim, wrapper, _ = stack
    status, body = post_json(wrapper.url + "/generate/sync",
                             text2image("https://models.example.com/x.safetensors"))
    assert status == 400
    assert "models.allowed_hosts" in str(body)


@pytest.mark.real_processes
def test_private_address_is_400(stack):
    files, _sim, _wrapper, strict = stack
    status, body = post_json(strict.url + "/generate/sync",
                             text2image(f"{files.url}/d.safetensors"))
    assert status == 400, body
    assert "loopback" in str(body)
    assert "d.safetensors" not in [s.path for s in files.seen]
