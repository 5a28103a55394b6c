"""The faults the soak injects, and the seeded schedule they follow.

Each fault is one coroutine that breaks something real (a signal to a real process, a server cut
off) and, where the break lasts, mends it after a while; it returns a note of what it saw. The
schedule is drawn from `random.Random(seed)`: the same seed and length give the same faults at
the same times, and every kind comes once before any comes twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from tests.soak.stack import TcpProxy, WebhookReceiver, Worker
from tests.support.stranger import Stranger

KINDS = ("kill_comfyui", "stop_comfyui", "kill_wrapper", "crash_at_start", "node_fails",
         "s3_down", "webhook_down", "daemon_restart", "stranger_on_port")


@dataclass(frozen=True)
class Planned:
    at: float
    kind: str


def plan(seed: int, seconds: float, gap: float = 8.0, kinds: tuple[str, ...] = KINDS
         ) -> list[Planned]:
    """Faults from 5 s in to 10 s before the end, about `gap` seconds apart."""
    rng = random.Random(seed)
    slots = max(1, int((seconds - 15) // gap))
    order: list[str] = []
    while len(order) < slots:
        batch = list(kinds)
        rng.shuffle(batch)
        order += batch
    return [Planned(round(5 + i * gap + rng.uniform(0, gap / 3), 2), kind)
            for i, kind in enumerate(order[:slots])]


@dataclass
class Injected:
    at: float
    kind: str
    note: str
    ok: bool = True


@dataclass
class Injector:
    worker: Worker
    s3: TcpProxy
    hooks: WebhookReceiver
    session: aiohttp.ClientSession
    done: list[Injected] = field(default_factory=list)
    stranger_prompts: int = 0
    #: (start, end) monotonic windows while the daemon was stopped on purpose
    daemon_down: list[tuple[float, float]] = field(default_factory=list)

    async def run(self, schedule: list[Planned], started: float) -> None:
        for planned in schedule:
            delay = started + planned.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            at = time.monotonic() - started
            try:
                note, ok = await getattr(self, planned.kind)()
            except Exception as exc:  # a fault that could not be injected is reported, not hidden
                note, ok = f"could not inject: {exc!r}", False
            self.done.append(Injected(round(at, 1), planned.kind, note, ok))

    # --- helpers ------------------------------------------------------------------------------
    async def _pid(self, name: str, timeout: float = 30.0, ready: bool = False) -> int | None:
        """The child's pid (with `ready`, once it is ready: a hang while starting is left to
        the start-up timeout, minutes by design, so a SIGSTOP then proves nothing quickly)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.worker.status() or {}
            child = status.get("children", {}).get(name, {})
            if child.get("pid") and (not ready or child.get("state") == "ready"):
                return child["pid"]
            await asyncio.sleep(0.2)
        return None

    async def _replaced(self, name: str, old: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = await self.worker.child_pid(name)
            if pid and pid != old:
                return True
            await asyncio.sleep(0.2)
        return False

    async def _knobs(self, **knobs: Any) -> None:
        async with self.session.post(self.worker.comfy_url + "/__sim__/knobs",
                                     data=json.dumps(knobs),
                                     timeout=aiohttp.ClientTimeout(total=5)) as response:
            await response.read()

    # --- the faults -----------------------------------------------------------------------------
    async def kill_comfyui(self) -> tuple[str, bool]:
        pid = await self._pid("comfyui")
        if pid is None:
            return "no ComfyUI running", False
        os.kill(pid, signal.SIGKILL)
        ok = await self._replaced("comfyui", pid, 30)
        return f"SIGKILL pid {pid}; {'restarted' if ok else 'NOT restarted in 30 s'}", ok

    async def stop_comfyui(self) -> tuple[str, bool]:
        pid = await self._pid("comfyui", ready=True)
        if pid is None:
            return "no ComfyUI running", False
        os.kill(pid, signal.SIGSTOP)
        ok = await self._replaced("comfyui", pid, 20)
        if not ok:
            os.kill(pid, signal.SIGCONT)
        return f"SIGSTOP pid {pid}; {'hang detected, replaced' if ok else 'NOT detected'}", ok

    async def kill_wrapper(self) -> tuple[str, bool]:
        pid = await self._pid("wrapper")
        if pid is None:
            return "no wrapper running", False
        os.kill(pid, signal.SIGKILL)
        ok = await self._replaced("wrapper", pid, 30)
        return f"SIGKILL wrapper pid {pid}; {'restarted' if ok else 'NOT restarted'}", ok

    async def crash_at_start(self) -> tuple[str, bool]:
        pid = await self._pid("comfyui")
        self.worker.crash_flag.touch()
        if pid:
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(4)
        self.worker.crash_flag.unlink()
        ok = (await self._pid("comfyui", 30)) is not None
        return f"ComfyUI crashed at every start for 4 s; {'back' if ok else 'NOT back'}", ok

    async def node_fails(self) -> tuple[str, bool]:
        await self._knobs(fail_node=["KSampler"])
        await asyncio.sleep(3)
        try:
            await self._knobs(fail_node=[])
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass  # ComfyUI restarted meanwhile: the new one has no failing node
        return "KSampler raised for 3 s", True

    async def s3_down(self) -> tuple[str, bool]:
        await self.s3.down()
        await asyncio.sleep(5)
        await self.s3.up()
        return "S3 refused connections for 5 s", True

    async def webhook_down(self) -> tuple[str, bool]:
        await self.hooks.down()
        await asyncio.sleep(5)
        await self.hooks.up()
        return "webhook receiver down for 5 s", True

    async def daemon_restart(self) -> tuple[str, bool]:
        began = time.monotonic()
        code = await asyncio.to_thread(self.worker.terminate)
        self.worker.start()  # as systemd would (Restart=always)
        ready = await self.worker.wait_ready(self.session, 90)
        self.daemon_down.append((began, time.monotonic()))
        return (f"SIGTERM: exit {code} after {time.monotonic() - began:.1f} s; restarted, "
                f"{'ready' if ready else 'NOT ready in 90 s'}"), code == 0 and ready

    async def stranger_on_port(self) -> tuple[str, bool]:
        pid = await self._pid("comfyui", ready=True)
        if pid is None:
            return "no ComfyUI running", False
        stranger = Stranger(self.worker.comfy_port)
        os.kill(pid, signal.SIGKILL)
        # It appears once the daemon has seen ComfyUI die (a leftover starting up, another
        # worker's ComfyUI): within those milliseconds a prompt already on its way may still
        # reach whatever answers (docs/operations.md#children-crashes-hangs-stalls-strangers),
        # which is not what this fault measures.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            child = (await self.worker.status() or {}).get("children", {}).get("comfyui", {})
            if child.get("state") != "ready" or child.get("pid") != pid:
                break
            await asyncio.sleep(0.01)
        held = await stranger.hold()
        held_from = time.time()
        await asyncio.sleep(4)
        held_until = time.time()
        await stranger.release()
        # Adopted: the daemon called a ComfyUI ready while the stranger was the one listening.
        adopted = held and await asyncio.to_thread(
            _ready_between, self.worker.folder / "daemon.log", held_from, held_until)
        self.stranger_prompts += stranger.prompts
        back = (await self._pid("comfyui", 30)) is not None
        note = (f"stranger {'held' if held else 'could not take'} port "
                f"{self.worker.comfy_port} 4 s; ComfyUI {'ADOPTED it' if adopted else 'never ready'}"
                f" meanwhile, {stranger.prompts} prompt(s) sent to it; ours "
                f"{'back' if back else 'NOT back'}")
        return note, not adopted and stranger.prompts == 0 and back


def _ready_between(log: Path, since: float, until: float) -> bool:
    """Whether the daemon's log has ComfyUI turning ready between two Unix times."""
    for line in log.read_text(errors="replace").splitlines():
        if "comfyui (pid" not in line or "-> ready" not in line:
            continue
        try:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if since <= at <= until:
            return True
    return False
