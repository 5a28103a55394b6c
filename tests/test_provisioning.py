"""The provisioner on its own (no daemon): order, reasons, verdicts, a real local file server."""

from __future__ import annotations

import asyncio
import os
import re

from api.modelstore.download import Downloader
from api.modelstore.manifest import parse_entries
from api.modelstore.store import ModelStore
from supervisor.checks.provisioning import ItemState, Provisioner
from supervisor.state import Level
from tests.support.fileserver import FileServer

BIG = os.urandom(2 * 1024 * 1024)
SMALL = os.urandom(100_000)


async def test_before_ready_first_with_progress_then_background_whose_failure_is_no_verdict(
        tmp_path):
    with FileServer(files={"big.safetensors": BIG, "small.safetensors": SMALL},
                    chunk_delay=0.03) as server:
        entries = parse_entries([
            {"url": f"{server.url}/big.safetensors", "path": "checkpoints/big.safetensors"},
            {"url": f"{server.url}/small.safetensors", "path": "vae/small.safetensors"},
            {"url": f"{server.url}/absent.safetensors", "path": "loras/absent.safetensors",
             "when": "background"}], "models.files")
        store = ModelStore(tmp_path / "models", tmp_path / "state",
                           Downloader(retries=0, backoff_initial=0.01), environ={}, parallel=1)
        provisioner = Provisioner(store, entries, backoff_initial=0.05, backoff_max=0.1)
        reasons: list[str] = []
        provisioner.on_change = lambda: reasons.append(provisioner.reason())
        task = asyncio.create_task(provisioner.run())
        while not provisioner.ready:
            await asyncio.sleep(0.05)
            reasons.append(provisioner.reason())
        assert provisioner.verdict().level is Level.OK
        # One slot (parallel=1): whichever file got it first, big shows its progress in MB.
        assert any(re.match(r"downloading [12] of 2 models: big \d+(\.\d)? [KM]B/2\.1 MB", r)
                   for r in reasons), reasons
        assert not any("1-2 of 2" in r for r in reasons)  # one slot: never two at once
        assert provisioner.reason() == ""
        # The background file is missing at the source: it keeps failing, the worker is fine.
        for _ in range(100):
            if provisioner.items[2].failures >= 2:
                break
            await asyncio.sleep(0.05)
        background = provisioner.items[2]
        assert background.state is ItemState.RETRY_WAIT and "HTTP 404" in background.error
        assert provisioner.verdict().level is Level.OK
        assert provisioner.snapshot()["status"] == "background"
        server.files["absent.safetensors"] = SMALL
        await asyncio.wait_for(task, 10)
        assert provisioner.snapshot()["status"] == "ready" and provisioner.missing() == 0
        await store.downloader.close()


async def test_a_guessed_models_folder_is_said_in_every_reason_and_names_the_setting(tmp_path):
    """Provisioning runs before ComfyUI can be asked where its models are: a folder guessed
    from comfyui.install_path is said in /health's reasons, with the setting that fixes it."""
    with FileServer(files={}, chunk_delay=0) as server:
        entries = parse_entries([{"url": f"{server.url}/gone.safetensors",
                                  "path": "checkpoints/gone.safetensors"}], "models.files")
        store = ModelStore(tmp_path / "models", tmp_path / "state",
                           Downloader(retries=0, backoff_initial=0.01), environ={}, parallel=1)
        note = "into /opt/ComfyUI/models (comfyui.install_path, then models/), a guess: set " \
               "comfyui.models_dir (COMFYUI_MODELS_DIR) if ComfyUI reads its models elsewhere"
        provisioner = Provisioner(store, entries, backoff_initial=5, backoff_max=5,
                                  folder_note=note)
        assert provisioner.reason() == f"waiting for 1 of 1 models ({note})"
        task = asyncio.create_task(provisioner.run())
        for _ in range(100):
            if provisioner.verdict().level is Level.UNHEALTHY:
                break
            await asyncio.sleep(0.05)
        verdict = provisioner.verdict()
        assert verdict.level is Level.UNHEALTHY and "HTTP 404" in verdict.reason
        assert note in verdict.reason
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.downloader.close()
