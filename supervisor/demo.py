"""The settings of `comfy-worker demo`: the simulator plays ComfyUI, nothing needs a GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def demo_environment(state: Path, port: int, token: str) -> dict[str, str]:
    """Environment values for the demo; anything the operator already set wins."""
    comfy = state / "comfyui"
    return {
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
