"""What an operator may ask of the running daemon over the admin socket.

Each action takes the socket's query (`instance=N` for one instance of a multi-GPU host, all by
default) and answers `{"ok": bool, "message": str}`; `comfy-worker restart-comfyui`, `drain`,
`resume` and `benchmark` print the message.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from supervisor.daemon.fleet import Fleet
from supervisor.daemon.health import WorkerFlags, WorkerHealth
from supervisor.instances.instance import Instance

Answer = dict[str, Any]
Action = Callable[[dict[str, str]], Awaitable[Answer]]


class AdminActions:
    def __init__(self, fleet: Fleet, health: WorkerHealth, flags: WorkerFlags):
        self.fleet = fleet
        self.health = health
        self.flags = flags

    def table(self) -> dict[str, Action]:
        """The admin socket's routes (POST /<name>)."""
        return {"restart/comfyui": self.restart_comfyui, "drain": self.drain,
                "resume": self.resume, "benchmark": self.rerun_benchmark}

    # --- which instances ------------------------------------------------------------------------
    def _chosen(self, params: dict[str, str]) -> list[Instance] | Answer:
        """The instances an action is for: `instance=N`, else all of them."""
        instances = self.fleet.instances
        raw = params.get("instance")
        if raw in (None, ""):
            return list(instances)
        if not raw.isdigit() or self.fleet.instance(int(raw)) is None:
            return {"ok": False,
                    "message": f"no instance {raw}: this host runs instances 0 to "
                               f"{len(instances) - 1}"}
        return [instances[int(raw)]]

    def _which(self, chosen: list[Instance]) -> str:
        instances = self.fleet.instances
        if len(instances) == 1:
            return ""
        if len(chosen) == len(instances):
            return " (all instances)"
        return " (" + ", ".join(i.label for i in chosen) + ")"

    # --- actions --------------------------------------------------------------------------------
    async def restart_comfyui(self, params: dict[str, str]) -> Answer:
        chosen = self._chosen(params)
        if isinstance(chosen, dict):
            return chosen
        await asyncio.gather(*(i.comfyui.restart("operator asked (comfy-worker restart-comfyui)")
                               for i in chosen))
        return {"ok": True, "message": "ComfyUI is restarting" + self._which(chosen)}

    async def drain(self, params: dict[str, str]) -> Answer:
        chosen = self._chosen(params)
        if isinstance(chosen, dict):
            return chosen
        if len(chosen) == len(self.fleet.instances):
            self.flags.draining = True
        for instance in chosen:
            instance.draining = True
        self.health.recompute()
        return {"ok": True, "message": "draining: no new work; the queue finishes"
                + self._which(chosen)}

    async def resume(self, params: dict[str, str]) -> Answer:
        chosen = self._chosen(params)
        if isinstance(chosen, dict):
            return chosen
        self.flags.draining = False
        for instance in chosen:
            instance.draining = False
        self.health.recompute()
        return {"ok": True, "message": "taking work again" + self._which(chosen)}

    async def rerun_benchmark(self, params: dict[str, str]) -> Answer:
        suite = self.fleet.benchmark
        if suite is None:
            return {"ok": False, "message": "the benchmark is disabled"}
        chosen = self._chosen(params)
        if isinstance(chosen, dict):
            return chosen
        answers = [suite.controllers[i.number].rerun() for i in chosen
                   if i.number in suite.controllers]
        self.health.recompute()
        refused = [a for a in answers if not a["ok"]]
        return refused[0] if refused else {"ok": True, "message": answers[0]["message"]
                                           + self._which(chosen)}
