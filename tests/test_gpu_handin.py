"""A container without a GPU handed in: which of the two cases it is, and the flag that fixes it."""

from __future__ import annotations

from pathlib import Path

from config import load_settings
from supervisor.daemon import preflight
from supervisor.gpu.handin import HandIn, advice, container_runtime, look


def _root(tmp_path: Path, *files: str) -> Path:
    for name in files:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return tmp_path


def test_runtime_from_the_marks_runtimes_leave(tmp_path):
    assert container_runtime(_root(tmp_path / "p", "run/.containerenv"), {}) == "podman"
    assert container_runtime(_root(tmp_path / "d", ".dockerenv"), {}) == "docker"
    k8s = _root(tmp_path / "k", "proc/1/cgroup")
    (k8s / "proc/1/cgroup").write_text("11:memory:/kubepods/burstable/pod1/abc\n")
    assert container_runtime(k8s, {}) == "kubernetes"
    bare = _root(tmp_path / "b", "proc/1/cgroup")
    (bare / "proc/1/cgroup").write_text("0::/init.scope\n")
    assert container_runtime(bare, {}) is None


def test_nvml_missing_names_both_flags_and_the_setting(tmp_path):
    seen = look(_root(tmp_path, ".dockerenv"), {}, nvml_loadable=lambda: False)
    assert seen == HandIn("docker", False, ())
    text = advice(seen)
    assert "without NVML" in text and "libnvidia-ml.so.1" in text
    assert "--gpus all" in text and "--device nvidia.com/gpu=all" in text
    assert "nvidia-ctk cdi generate" in text and "GPU_REQUIRED=false" in text


def test_nvml_present_without_a_device_is_told_apart(tmp_path):
    text = advice(look(_root(tmp_path, "run/.containerenv"), {}, nvml_loadable=lambda: True))
    assert "with NVML but no GPU device" in text and "in a podman container" in text
    assert "--device nvidia.com/gpu=all" in text


def test_silent_with_a_device_or_outside_a_container(tmp_path):
    handed = look(_root(tmp_path / "a", ".dockerenv", "dev/nvidia0", "dev/nvidiactl"), {},
                  nvml_loadable=lambda: True)
    assert handed.devices == (str(tmp_path / "a" / "dev" / "nvidia0"),)
    assert advice(handed) is None
    assert advice(look(tmp_path / "empty", {}, nvml_loadable=lambda: False)) is None


def test_preflight_asks_only_when_a_real_gpu_is_required(tmp_path):
    fake = tmp_path / "gpus.json"
    fake.write_text('{"gpus": []}')
    assert preflight.gpu_hand_in(load_settings(None, environ={"GPU_REQUIRED": "false"})) is None
    assert preflight.gpu_hand_in(load_settings(None, environ={"GPU_FAKE_SOURCE": str(fake)})) \
        is None
