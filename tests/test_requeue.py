"""A restart of ComfyUI fails only the prompt it was running (issue 11, defect 5).

Prompts the wrapper had already handed to ComfyUI's own queue died with the old ComfyUI; they
must run on the new one, in order, not come back as 502.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from tests.procs import get_json, start_daemon, wait_until


def text2image(steps: int, request_id: str) -> dict:
    return {"input": {"request_id": request_id, "modifier": "Text2Image",
                      "modifications": {"steps": steps, "width": 64, "height": 64}}}


def test_prompts_queued_in_comfyui_survive_its_restart_in_order(tmp_path):
    with start_daemon(tmp_path, "--step-seconds", "0.1") as worker:
        answers: dict[str, tuple] = {}
        finished: list[str] = []

        def call(name: str, steps: int) -> None:
            answers[name] = worker.generate(text2image(steps, name), timeout=120)
            finished.append(name)

        threads = [threading.Thread(target=call, args=("running", 60))]
        threads[0].start()
        time.sleep(1.0)
        for name in ("queued-1", "queued-2"):
            threads.append(threading.Thread(target=call, args=(name, 3)))
            threads[-1].start()
            time.sleep(0.3)
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
