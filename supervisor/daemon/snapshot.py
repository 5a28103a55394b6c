"""One snapshot of the worker, built from its parts; the public /health view is a projection of it.

`Snapshots.build()` is what the admin socket serves (`comfy-worker health` renders it as a table
or JSON). `public_view(snapshot)` keeps what the world may see on the public port — states,
reasons, counts, the benchmark's figures — and drops pids, paths, logs, the GPU's detail and the
event log. Nothing is built twice: the public view never asks a part anything.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from supervisor.checks.disk import DiskGuard
from supervisor.checks.provisioning import Provisioner
from supervisor.daemon.fleet import Fleet
from supervisor.daemon.health import WorkerFlags, WorkerHealth
from supervisor.gpu.monitor import GpuMonitor
from supervisor.reporting.metrics import WorkerMetrics

#: The benchmark's fields the public view keeps (worker level; an instance has no expectation).
PUBLIC_BENCHMARK = ("status", "reason", "seconds", "its", "expected_seconds", "max_perf", "causes")
PUBLIC_INSTANCE_BENCHMARK = ("status", "reason", "seconds", "its", "max_perf", "causes")
PUBLIC_CHILD = ("state", "reason", "restarts")
PUBLIC_GPU = ("index", "uuid", "name", "verdict")
PUBLIC_MODELS = ("status", "reason", "done_bytes", "total_bytes", "failures")
PUBLIC_FILESYSTEM = ("holds", "level", "percent_full", "free_bytes", "size_bytes")


class Snapshots:
    """Builds the worker's snapshot from its parts, each asked once."""

    def __init__(self, *, health: WorkerHealth, flags: WorkerFlags, fleet: Fleet,
                 metrics: WorkerMetrics, max_waiting: int, auth: str,
                 gpu: GpuMonitor | None = None, provisioner: Provisioner | None = None,
                 disk: DiskGuard | None = None, started_at: float | None = None):
        self.health = health
        self.flags = flags
        self.fleet = fleet
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.auth = auth
        self.gpu = gpu
        self.provisioner = provisioner
        self.disk = disk
        self.started_at = time.time() if started_at is None else started_at

    def build(self) -> dict[str, Any]:
        tracker, router = self.health.tracker, self.fleet.router
        first = self.fleet.first
        latest = self.gpu.latest() if self.gpu else None
        instances = [i.snapshot(latest, router.load(i.number)) for i in self.fleet.instances]
        return {
            "worker": {"state": tracker.state.value, "reason": tracker.reason,
                       "since": tracker.since, "pid": os.getpid(),
                       "uptime_s": round(time.time() - self.started_at, 1),
                       "draining": self.flags.draining,
                       "history": list(tracker.history)[-20:],
                       # What a long run must keep flat (docs/disk.md): this process's tasks.
                       "asyncio_tasks": len(asyncio.all_tasks())},
            # The first instance's, as on a one-GPU host; every instance is under "instances".
            "children": instances[0]["children"] if instances else {},
            "instances": instances,
            "queue": {"in_flight": router.in_flight, "waiting": router.waiting,
                      "max_waiting": self.max_waiting,
                      "comfyui": instances[0]["comfyui"] if instances else {},
                      "wrapper": first.wrapper_detail if first else {},
                      "served": self._served()},
            "gpu": self.gpu.snapshot() if self.gpu else {"status": "not monitored"},
            "benchmark": instances[0]["benchmark"] if instances else {"status": "disabled"},
            "max_perf": self.health.max_perf(),
            "models": self.provisioner.snapshot() if self.provisioner else {"status": "none"},
            "disk": self.disk.snapshot() if self.disk else {"level": "ok", "filesystems": []},
            "events": self.fleet.events[-30:],
            "auth": self.auth,
        }

    def public(self) -> dict[str, Any]:
        """What /health shows the world (see `public_view`)."""
        return public_view(self.build())

    def _served(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for metric in self.metrics.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    counts[sample.labels["status"]] = sample.value
        return counts


def _pick(body: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: body.get(k) for k in keys}


def _children(children: dict[str, Any]) -> dict[str, Any]:
    return {kind: _pick(child, PUBLIC_CHILD) for kind, child in children.items()}


def public_instance(snapshot: dict[str, Any]) -> dict[str, Any]:
    """An instance's public view: states and reasons, no pids, paths or logs."""
    flags = snapshot["comfyui_flags"]
    return {
        "instance": snapshot["instance"], "state": snapshot["state"],
        "reason": snapshot["reason"],
        "gpu": _pick(snapshot["gpu"], PUBLIC_GPU),
        "children": _children(snapshot["children"]),
        "benchmark": _pick(snapshot["benchmark"], PUBLIC_INSTANCE_BENCHMARK),
        "comfyui_version": snapshot["comfyui_version"],
        "comfyui_flags": flags["note"] if flags else None,   # how they are known, no paths
        "assets": snapshot["assets"]["mode"],                 # not the database's path
        "in_flight": snapshot["in_flight"], "served": snapshot["served"],
    }


def public_view(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The worker's public view, projected from its snapshot."""
    models = snapshot["models"]
    gpu = snapshot["gpu"]
    return {
        "children": _children(snapshot["children"]),
        "instances": [public_instance(i) for i in snapshot["instances"]],
        "gpu": {"verdict": gpu.get("verdict")},
        "benchmark": _pick(snapshot["benchmark"], PUBLIC_BENCHMARK),
        "max_perf": snapshot["max_perf"],
        "queue": _pick(snapshot["queue"], ("in_flight", "waiting")),
        "models": models if models == {"status": "none"} else _pick(models, PUBLIC_MODELS),
        "disk": {"level": snapshot["disk"]["level"],
                 "filesystems": [_pick(fs, PUBLIC_FILESYSTEM)
                                 for fs in snapshot["disk"]["filesystems"]]},
    }
