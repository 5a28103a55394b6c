"""A restart of ComfyUI fails only the prompt it was running (issue 11, defect 5).

Prompts the wrapper had already handed to ComfyUI's own queue died with the old ComfyUI; they
must run on the new one, in order, not come back as 502.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from tests.support.net import eventually
from tests.support.procs import get_json, post_json, start_daemon, wait_until
from tests.support.stranger import Stranger

pytestmark = pytest.mark.e2e


def text2image(steps: int, request_id: str) -> dict:
    return {"input": {"request_id": request_id, "modifier": "Text2Image",
                      "modifications": {"steps": steps, "width": 64, "height": 64}}}


def admitted(worker) -> int:
    queue = worker.status()["queue"]
    return queue["in_flight"] + queue["waiting"]


async def seen_dead(worker, pid: int) -> None:
    """Until the daemon has seen ComfyUI `pid` die: it signals its wrapper at that moment. (A
    fixed sleep is a guess that a busy machine breaks.)"""
    def dead() -> bool:
        child = worker.status()["children"]["comfyui"]
        return child["state"] != "ready" or child["pid"] != pid
    await eventually(lambda: asyncio.to_thread(dead), 10, "the daemon to see ComfyUI die")


def test_prompts_queued_in_comfyui_survive_its_restart_in_order(tmp_path):
    with start_daemon(tmp_path, "--step-seconds", "0.1") as worker:
        answers: dict[str, tuple] = {}
        finished: list[str] = []

        def call(name: str, steps: int) -> None:
            answers[name] = worker.generate(text2image(steps, name), timeout=120)
            finished.append(name)

        threads: list[threading.Thread] = []
        for count, (name, steps) in enumerate((("running", 60), ("queued-1", 3), ("queued-2", 3)), 1):
            threads.append(threading.Thread(target=call, args=(name, steps)))
            threads[-1].start()
            # One at a time, each admitted before the next is sent: their order is the sending order.
            wait_until(lambda: admitted(worker) >= count, 20, f"{name} admitted")
            if name == "running":
                wait_until(lambda: get_json(worker.comfy_url + "/queue")[1].get("queue_running"),
                           20, "the first prompt running in ComfyUI")
        # The wrapper has handed the next prompt to ComfyUI's own queue behind the running one.
        wait_until(lambda: len(get_json(worker.comfy_url + "/queue")[1].get("queue_pending") or [])
                   >= 1, 10, "a prompt waiting in ComfyUI's queue")
        os.kill(worker.child_pid("comfyui"), signal.SIGKILL)
        for thread in threads:
            thread.join(120)
        status, body = answers["running"]
        assert status == 502 and "ComfyUI" in (body.get("error") or body.get("message", ""))
        for name in ("queued-1", "queued-2"):
            status, body = answers[name]
            assert status == 200 and body["status"] == "completed", (name, body)
        assert finished.index("queued-1") < finished.index("queued-2")
        assert "submitting it again on the restarted ComfyUI" in worker.log()


@pytest.mark.slow
async def test_queued_prompts_never_go_to_a_stranger_that_took_comfyuis_port(tmp_path):

    # ComfyUI comes back 3 s after the kill: by then the wrapper has noticed the loss and waits
    # to submit the queued prompt again, and the stranger holds the port.
    with start_daemon(tmp_path, "--step-seconds", "0.1", extra_env={
            "SUPERVISOR_BACKOFF_INITIAL": "3", "SUPERVISOR_BACKOFF_MAX": "3",
            "SUPERVISOR_FAILED_COOLDOWN": "2"}) as worker:
        running = asyncio.create_task(asyncio.to_thread(
            worker.generate, text2image(60, "running"), 120))
        await eventually(lambda: asyncio.to_thread(
            lambda: get_json(worker.comfy_url + "/queue")[1].get("queue_running")), 20,
            "the first prompt running in ComfyUI")
        queued = asyncio.create_task(asyncio.to_thread(
            worker.generate, text2image(3, "queued"), 120))
        await eventually(lambda: asyncio.to_thread(lambda: admitted(worker) >= 2), 20,
                         "the second admitted")
        await asyncio.sleep(0.3)  # handed to the wrapper, which queues it behind the running one
        pid = await asyncio.to_thread(worker.child_pid, "comfyui")
        stranger = Stranger(int(worker.comfy_url.rsplit(":", 1)[1]))
        os.kill(pid, signal.SIGKILL)
        await seen_dead(worker, pid)
        assert await stranger.hold()
        await asyncio.sleep(6.0)  # it answers /queue and /system_stats like a ComfyUI
        await stranger.release()
        status, body = await running
        assert status == 502
        status, body = await queued
        assert status == 200 and body["status"] == "completed", body
        assert stranger.prompts == 0


async def test_an_idle_wrapper_is_told_comfyui_died_and_never_feeds_a_stranger(tmp_path):
    """Nothing was in flight when ComfyUI died, so the wrapper saw no error itself: the daemon's
    signal is what keeps the next prompt from the stranger now on ComfyUI's port."""

    with start_daemon(tmp_path, "--step-seconds", "0.05", extra_env={
            "SUPERVISOR_BACKOFF_INITIAL": "3", "SUPERVISOR_BACKOFF_MAX": "3"}) as worker:
        pid = await asyncio.to_thread(worker.child_pid, "comfyui")
        stranger = Stranger(int(worker.comfy_url.rsplit(":", 1)[1]))
        os.kill(pid, signal.SIGKILL)
        await seen_dead(worker, pid)  # ours comes back in 3 s
        assert await stranger.hold()
        # Straight to the wrapper: the public port would hold the request until ComfyUI is back.
        answer = asyncio.create_task(asyncio.to_thread(
            post_json, worker.wrapper_url + "/generate/sync", text2image(2, "after"), None, 60))
        await asyncio.sleep(2.0)
        await stranger.release()
        status, body = await answer
        assert stranger.prompts == 0
        assert status == 200 and body["status"] == "completed", body
