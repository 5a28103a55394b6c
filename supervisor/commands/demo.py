"""The settings of `comfy-worker demo`: the simulator plays ComfyUI, nothing needs a GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def demo_environment(state: Path, port: int, token: str, gpus: int = 1) -> dict[str, str]:
    """Environment values for the demo; anything the operator already set wins.

    With `gpus` above one, the demo plays a multi-GPU host: that many fake GPUs (a GPU_FAKE_SOURCE
    file the operator can edit while it runs: make one hot) and one simulator + wrapper each."""
    comfy = state / "comfyui"
    env = {
        "WORKER_HOST": "127.0.0.1",
        "WORKER_PORT": str(port),
        "WORKER_AUTH_TOKEN": token,
        "WORKER_STATE_DIR": str(state / "state"),
        "WORKER_LOG_DIR": str(state / "logs"),
        "WORKER_ADMIN_SOCKET": str(state / "admin.sock"),
        "COMFYUI_COMMAND": json.dumps([sys.executable, "-m", "simulator", "--listen", "127.0.0.1",
                                       "--port", "18188", "--base-directory", str(comfy),
                                       "--step-seconds", "0.05"]),
        "COMFYUI_CWD": str(state),
        "COMFYUI_URL": "http://127.0.0.1:18188",
        "COMFYUI_INSTALL_PATH": str(comfy),
        "WRAPPER_URL": "http://127.0.0.1:18288",
        "GPU_REQUIRED": "false",
        "BENCHMARK_TEST_STEPS": "20",
        "BENCHMARK_RUNS": "2",
    }
    if gpus > 1:
        state.mkdir(parents=True, exist_ok=True)
        fake = state / "gpus.json"
        # A name no reference table knows: the simulated cards are judged against each other.
        fake.write_text(json.dumps({"gpus": [{"preset": "h100_sxm",
                                              "name": "Demo GPU (simulated)"}] * gpus},
                                   indent=1))
        env.update({
            "COMFYUI_COMMAND": json.dumps([sys.executable, "-m", "simulator", "--listen",
                                           "127.0.0.1", "--port", "{port}", "--base-directory",
                                           str(comfy), "{instance_folders}", "--device-type",
                                           "cuda", "--step-seconds", "0.05"]),
            "GPU_FAKE_SOURCE": str(fake), "GPU_REQUIRED": "true", "GPU_SAMPLE_INTERVAL": "1",
        })
    return env
