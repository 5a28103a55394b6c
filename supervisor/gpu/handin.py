"""Was a GPU handed in to this container? What to tell the operator when not.

A container sees a GPU only when its runtime hands one in: docker's ``--gpus`` (the NVIDIA
Container Toolkit) or a CDI device in podman (``--device nvidia.com/gpu=all``). Either mounts the
driver's libraries (libnvidia-ml among them) and the ``/dev/nvidia*`` nodes. So inside a
container, "NVML missing" almost always means nothing was handed in, and "NVML present but no
device" means the libraries were mounted (or baked into the image) without a GPU. Outside a
container neither says anything about hand-in, and ``advice`` stays silent.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: The file name pynvml loads on Linux.
NVML_LIBRARY = "libnvidia-ml.so.1"
_CGROUP_HINTS = (("libpod", "podman"), ("docker", "docker"), ("kubepods", "kubernetes"),
                 ("containerd", "containerd"))


@dataclass(frozen=True)
class HandIn:
    runtime: str | None         # "docker", "podman", ...; None when not in a container
    nvml_library: bool          # the dynamic loader finds libnvidia-ml
    devices: tuple[str, ...]    # /dev/nvidia0, /dev/nvidia1, ...

    def to_dict(self) -> dict[str, object]:
        return {"container": self.runtime, "nvml_library": self.nvml_library,
                "devices": list(self.devices)}


def container_runtime(root: Path = Path("/"),
                      environ: Mapping[str, str] = os.environ) -> str | None:
    """The container runtime this process runs under, by the marks runtimes leave; or None."""
    if (root / "run/.containerenv").exists():
        return "podman"
    if (root / ".dockerenv").exists():
        return "docker"
    if environ.get("container"):  # podman and systemd-nspawn set it for PID 1's children
        return environ["container"]
    try:
        cgroup = (root / "proc/1/cgroup").read_text()
    except OSError:
        return None
    return next((name for hint, name in _CGROUP_HINTS if hint in cgroup), None)


def _nvml_loadable() -> bool:
    try:
        ctypes.CDLL(NVML_LIBRARY)  # what pynvml does; loading it starts nothing
    except OSError:
        return False
    return True


def look(root: Path = Path("/"), environ: Mapping[str, str] = os.environ,
         nvml_loadable: Callable[[], bool] = _nvml_loadable) -> HandIn:
    """What this process can see. Blocking (a loader search, a folder read): call it before the
    event loop starts or in a thread."""
    devices = tuple(sorted(str(p) for p in (root / "dev").glob("nvidia[0-9]*")))
    return HandIn(container_runtime(root, environ), nvml_loadable(), devices)


FLAGS = ("start it with `docker run --gpus all` (NVIDIA Container Toolkit) or "
         "`podman run --device nvidia.com/gpu=all` (CDI: run `nvidia-ctk cdi generate "
         "--output=/etc/cdi/nvidia.yaml` once on the host)")
NO_GPU = "to run without a GPU, set GPU_REQUIRED=false (gpu.required)"


def advice(seen: HandIn) -> str | None:
    """One sentence when this container got no GPU, naming the flag that fixes it; else None."""
    if seen.runtime is None or seen.devices:
        return None
    where = f"in a {seen.runtime} container"
    if not seen.nvml_library:
        return (f"{where} without NVML ({NVML_LIBRARY} is not in it): no GPU was handed in; "
                f"{FLAGS}; {NO_GPU}")
    return (f"{where} with NVML but no GPU device (no /dev/nvidia0): the driver's libraries are "
            "here but no GPU was handed in (is NVIDIA_VISIBLE_DEVICES void or none?); "
            f"{FLAGS}; {NO_GPU}")
