"""How many instances run, on which GPU, and with which command lines: decided before any starts.

ComfyUI runs one prompt at a time on one device, so a host with N GPUs runs N *instances* (a
ComfyUI and a wrapper each). Everything that differs between them comes from here, as plain data:
the GPU an instance is pinned to (by UUID: indexes can reorder across boots), its two ports
(comfyui.url's and wrapper.url's port + the instance number) and its command lines, env and
working folders with the placeholders filled in.

Placeholders are replaced only where written as one of the names in `PLACEHOLDERS`; any other
brace is left alone, so a command written before templates existed means what it meant.
`{instance_folders}` is special: it stands for a whole argument and becomes ComfyUI's flags for
this instance's own output, input, temp and user folders and database (nothing when only one
instance runs), so two ComfyUIs never write into each other's files while models stay shared.

A command without any placeholder cannot run twice on one host (the port would collide), so such
a configuration runs one instance, as it always did, and says which setting would use the rest.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

from api.comfy.folders import ComfyFolders, discover

logger = logging.getLogger(__name__)

#: Every placeholder, with what it becomes (the README's table is written from this).
PLACEHOLDERS: dict[str, str] = {
    "instance": "the instance number: 0, 1, ... in GPU order",
    "port": "the port of the child the template belongs to (ComfyUI's in comfyui.*, the "
            "wrapper's in wrapper.*)",
    "comfyui_port": "this instance's ComfyUI port: comfyui.url's port + instance",
    "comfyui_url": "this instance's ComfyUI URL",
    "wrapper_port": "this instance's wrapper port: wrapper.url's port + instance",
    "wrapper_url": "this instance's wrapper URL",
    "gpu_index": "the GPU's NVML index (empty without a GPU)",
    "gpu_uuid": "the GPU's UUID, as CUDA_VISIBLE_DEVICES gets it (empty without a GPU)",
    "gpu_name": "the GPU's model name (empty without a GPU)",
    "state_dir": "this instance's own folder under worker.state_dir (worker.state_dir itself "
                 "with one instance)",
    "instance_folders": "a whole argument of comfyui.command: ComfyUI's flags for this "
                        "instance's own output, input, temp and user folders and SQLite database "
                        "(nothing with one instance)",
}
_PATTERN = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
#: ComfyUI flags whose folder (or file) must be an instance's own.
_PRIVATE_FLAGS = ("--output-directory", "--input-directory", "--temp-directory",
                  "--user-directory", "--database-url")


class PlanError(Exception):
    """The GPUs asked for cannot be given instances; the message names the setting to change."""


@dataclass(frozen=True)
class GpuSlot:
    """The GPU an instance runs on; all None for the single instance of a host without one."""

    index: int | None = None
    uuid: str | None = None
    name: str | None = None

    def describe(self) -> str:
        if self.index is None:
            return "no GPU"
        return f"GPU {self.index}" + (f": {self.name}" if self.name else "")


@dataclass(frozen=True)
class ChildPlan:
    command: list[str]
    env: dict[str, str]
    cwd: Path | None


@dataclass(frozen=True)
class InstancePlan:
    """Everything one instance needs to start, placeholders filled in."""

    number: int
    count: int                 # instances on this host
    gpu: GpuSlot
    comfyui_url: str
    wrapper_url: str
    comfyui: ChildPlan
    wrapper: ChildPlan
    folders: ComfyFolders      # this instance's ComfyUI folders (as the wrapper must find them)
    state_dir: Path
    pinned: bool               # CUDA_VISIBLE_DEVICES set to this GPU
    values: dict[str, str] = field(default_factory=dict)
    #: Folders to make before ComfyUI starts ({instance_folders}: ComfyUI refuses a
    #: --user-directory that does not exist).
    make_dirs: tuple[Path, ...] = ()

    @property
    def suffix(self) -> str:
        """Added to names (log files) to tell instances apart; empty with one instance."""
        return "" if self.count == 1 else f"-{self.number}"

    def label(self) -> str:
        return f"instance {self.number} ({self.gpu.describe()})"


def uses_placeholders(settings: Any) -> bool:
    """Whether comfyui.command is a template (one with at least one placeholder)."""
    return any(_PATTERN.search(arg) for arg in settings.comfyui.command)


def fixed_prefix(command: Sequence[str]) -> list[str]:
    """The words of a command before its first placeholder: what every instance's shares."""
    out = []
    for arg in command:
        if _PATTERN.search(arg):
            break
        out.append(arg)
    return out


def render(text: str, values: dict[str, str]) -> str:
    return _PATTERN.sub(lambda m: values[m.group(1)], text)


def _shift(url: str, offset: int) -> str:
    parts = urlsplit(url)
    port = (parts.port or (443 if parts.scheme == "https" else 80)) + offset
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return urlunsplit((parts.scheme, f"{host}:{port}", parts.path, parts.query, parts.fragment))


def select_gpus(selection: Any, gpus: Sequence[Any], *, templated: bool) -> list[GpuSlot]:
    """The GPUs that get an instance, in instance order.

    ``gpus``: GpuRecord-shaped objects (index, uuid, name, available) NVML reported.
    ``templated``: whether comfyui.command has placeholders; without them one instance runs.
    """
    usable = [g for g in gpus if getattr(g, "available", True) and g.uuid]
    if selection == "all":
        chosen = usable
    else:
        by_index = {str(g.index): g for g in usable}
        by_uuid = {g.uuid.lower(): g for g in usable}
        chosen = []
        for wanted in selection:
            found = by_index.get(wanted) if wanted.isdigit() else by_uuid.get(wanted.lower())
            if found is None:
                have = ", ".join(f"{g.index} {g.uuid}" for g in usable) or "none"
                raise PlanError(f"comfyui.gpus (COMFYUI_GPUS) asks for GPU {wanted}, which NVML "
                                f"does not report as usable (GPUs found: {have})")
            chosen.append(found)
    slots = [GpuSlot(g.index, g.uuid, g.name) for g in chosen]
    if not templated:
        if selection != "all" and len(slots) > 1:
            raise PlanError("comfyui.gpus (COMFYUI_GPUS) lists several GPUs but comfyui.command "
                            "has no placeholders, so every instance would listen on the same "
                            "port: write --port {port} (and {instance_folders}) in comfyui.command")
        return [slots[0] if selection != "all" and slots else GpuSlot()]
    return slots or [GpuSlot()]


def _instance_root(base: Path, number: int) -> Path:
    return base / "instances" / str(number)


def _instance_folder_flags(base: Path, number: int) -> list[str]:
    root = _instance_root(base, number)
    return ["--output-directory", str(root / "output"), "--input-directory", str(root / "input"),
            "--temp-directory", str(root), "--user-directory", str(root / "user"),
            "--database-url", f"sqlite:///{root / 'user' / 'comfyui.db'}"]


def _render_child(command: Iterable[str], env: dict[str, str], cwd: Path | None,
                  values: dict[str, str], folder_flags: list[str]) -> ChildPlan:
    rendered: list[str] = []
    for arg in command:
        if arg == "{instance_folders}":
            rendered += folder_flags
        else:
            rendered.append(render(arg, values))
    return ChildPlan(rendered, {k: render(v, values) for k, v in env.items()},
                     Path(render(str(cwd), values)) if cwd else None)


def plan_instances(settings: Any, slots: Sequence[GpuSlot]) -> list[InstancePlan]:
    c, w = settings.comfyui, settings.wrapper
    count = len(slots)
    templated = uses_placeholders(settings)
    plans = []
    for number, gpu in enumerate(slots):
        comfy_url, wrapper_url = _shift(c.url, number), _shift(w.url, number)
        state_dir = Path(settings.worker.state_dir)
        if count > 1:
            state_dir = state_dir / "instances" / str(number)
        values = {"instance": str(number),
                  "comfyui_port": str(urlsplit(comfy_url).port),
                  "comfyui_url": comfy_url,
                  "wrapper_port": str(urlsplit(wrapper_url).port),
                  "wrapper_url": wrapper_url,
                  "gpu_index": "" if gpu.index is None else str(gpu.index),
                  "gpu_uuid": gpu.uuid or "", "gpu_name": gpu.name or "",
                  "state_dir": str(state_dir), "instance_folders": ""}
        plain = [a for a in c.command if a != "{instance_folders}"]
        base = discover([render(a, {**values, "port": values["comfyui_port"]}) for a in plain],
                        c.cwd, c.install_path).base.path
        flags = _instance_folder_flags(base, number) if count > 1 else []
        root = _instance_root(base, number)
        make = tuple(root / sub for sub in ("output", "input", "temp", "user")) \
            if count > 1 and "{instance_folders}" in c.command else ()
        comfy = _render_child(c.command, dict(c.env), c.cwd,
                              {**values, "port": values["comfyui_port"]}, flags)
        pinned = templated and gpu.uuid is not None
        if pinned:
            comfy.env.setdefault("CUDA_VISIBLE_DEVICES", gpu.uuid)
        folders = discover(comfy.command, comfy.cwd, c.install_path,
                           {kind: settings.get(f"comfyui.{kind}_dir")
                            for kind in ("output", "input", "temp", "models")})
        wrapper = _render_child(w.command, dict(w.env), w.cwd,
                                {**values, "port": values["wrapper_port"]}, [])
        plans.append(InstancePlan(number, count, gpu, comfy_url, wrapper_url, comfy, wrapper,
                                  folders, state_dir, pinned, values, make))
    return plans


def _flag_values(command: Sequence[str]) -> dict[str, str]:
    found = {}
    for index, arg in enumerate(command):
        name, eq, value = arg.partition("=")
        if name in _PRIVATE_FLAGS or name == "--port":
            if not eq:
                value = command[index + 1] if index + 1 < len(command) else ""
            found[name] = value
    return found


def collisions(settings: Any) -> list[str]:
    """Warnings for `config check`: what two instances of this configuration would share.

    Judged on instances 0 and 1 with two made-up GPUs, so it works without NVML."""
    if not uses_placeholders(settings):
        return []
    fake = [GpuSlot(0, "GPU-check-0", "check"), GpuSlot(1, "GPU-check-1", "check")]
    first, second = plan_instances(settings, fake)
    problems = []
    a, b = _flag_values(first.comfyui.command), _flag_values(second.comfyui.command)
    if a.get("--port") and a.get("--port") == b.get("--port"):
        problems.append(f"comfyui.command: every instance would listen on port {a['--port']}; "
                        "write --port {port}")
    for kind in ("output", "input", "temp"):
        one, two = getattr(first.folders, kind), getattr(second.folders, kind)
        if one.path == two.path:
            problems.append(f"comfyui.command: instances would share the {kind} folder "
                            f"{one.describe()}; add {{instance_folders}} to comfyui.command or "
                            "put {instance} in that path")
    for flag in ("--user-directory", "--database-url"):
        if flag not in a and "{instance_folders}" not in settings.comfyui.command:
            what = "user folder" if flag == "--user-directory" else "SQLite database"
            problems.append(f"comfyui.command: instances would share ComfyUI's {what} (no "
                            f"{flag}); add {{instance_folders}} to comfyui.command")
        elif flag in a and a[flag] == b.get(flag):
            problems.append(f"comfyui.command: instances would share {flag} {a[flag]}; put "
                            "{instance} in it")
    if settings.wrapper.command:
        wa, wb = _flag_values(first.wrapper.command), _flag_values(second.wrapper.command)
        if first.wrapper.command == second.wrapper.command and \
                first.wrapper.env == second.wrapper.env:
            problems.append("wrapper.command: every instance's wrapper would start the same way "
                            "(same port, same ComfyUI); use {port} and {comfyui_url}")
        elif wa.get("--port") and wa.get("--port") == wb.get("--port"):
            problems.append(f"wrapper.command: every wrapper would listen on port {wa['--port']}; "
                            "write {port}")
    return problems
