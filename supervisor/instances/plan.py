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

What the worker adds to ComfyUI's command line depends on which flags this ComfyUI has
(`api.comfy.flags`, asked before launch): a flag it does not know is never passed. Where it has
them, `--disable-assets` (comfyui.assets = "off") and `--models-directory` (an explicit
comfyui.models_dir) are added to every instance's command. Two instances on one SQLite database
cannot both start with the newest ComfyUI (the second stops with `ASSETS_STARTUP_FAILED: in_use`),
so a plan that would share one is refused (`refusals`), by `config check` and at start alike.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

from api.comfy.failures import OWN_DATABASE
from api.comfy.flags import ComfyFlags, for_version
from api.comfy.folders import ComfyFolders, discover

logger = logging.getLogger(__name__)

#: Every placeholder, with what it becomes (the table in docs/multi-gpu.md says the same).
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


class AssetsMode(str, Enum):
    """Whether an instance's ComfyUI runs its assets database (scans, output walks, a lock)."""

    OFF = "off"          # --disable-assets passed (or written in comfyui.command)
    ON = "on"            # the newest ComfyUI's default, comfyui.assets = "on"
    NONE = "none"        # this ComfyUI has no assets system (0.3.64)
    UNKNOWN = "unknown"  # its flags were assumed: ComfyUI itself says after start (/features)


@dataclass(frozen=True)
class Assets:
    mode: AssetsMode
    why: str
    #: The instance's SQLite database (None: in memory, or not known).
    database: Path | None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "why": self.why,
                "database": str(self.database) if self.database else None}


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
    #: The flags this ComfyUI accepts, and how that is known.
    flags: ComfyFlags | None = None
    assets: Assets = Assets(AssetsMode.UNKNOWN, "not planned", None)
    #: comfyui.install_path (where ComfyUI 0.3.64 keeps its database).
    install_path: Path | None = None

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


#: The folder flags of {instance_folders}, each with the folder (under the instance's root) it
#: names; all of them are in 0.3.64, and a ComfyUI that lacked one would not be given it.
_FOLDER_FLAGS = (("--output-directory", "output"), ("--input-directory", "input"),
                 ("--temp-directory", ""), ("--user-directory", "user"))


def _instance_folder_flags(base: Path, number: int, flags: ComfyFlags | None) -> list[str]:
    root = _instance_root(base, number)
    out: list[str] = []
    for flag, sub in _FOLDER_FLAGS:
        if flags is None or flags.knows(flag):
            out += [flag, str(root / sub) if sub else str(root)]
    if flags is None or flags.knows("--database-url"):
        out += ["--database-url", f"sqlite:///{root / 'user' / 'comfyui.db'}"]
    return out


def _worker_flags(settings: Any, flags: ComfyFlags | None,
                  command: Sequence[str]) -> tuple[list[str], list[Path]]:
    """What the worker adds to ComfyUI's command line beyond its folders, and the folders that
    must exist for it: only flags this ComfyUI has, and none the command already gives."""
    if flags is None:
        return [], []
    names = {arg.partition("=")[0] for arg in command}
    added: list[str] = []
    make: list[Path] = []
    if settings.comfyui.assets == "off" and flags.knows("--disable-assets") and \
            not names & {"--disable-assets", "--enable-assets"}:
        added.append("--disable-assets")
    models = settings.get("comfyui.models_dir")
    if models is not None and str(models) not in ("", ".") and \
            flags.knows("--models-directory") and "--models-directory" not in names:
        # ComfyUI refuses a --models-directory that does not exist.
        added += ["--models-directory", str(models)]
        make.append(Path(models))
    return added, make


def _assets(settings: Any, flags: ComfyFlags | None, written: Sequence[str],
            added: Sequence[str], folders: ComfyFolders) -> Assets:
    """Whether this instance runs ComfyUI's assets database, why, and where that database is.
    ``written``: comfyui.command as the operator wrote it; ``added``: the worker's flags."""
    names = {arg.partition("=")[0] for arg in written}
    install = settings.comfyui.install_path
    if flags is None or flags.guessed:
        database = folders.database(True, install) if folders.database_url else None
        return Assets(AssetsMode.UNKNOWN, "ComfyUI's flags were not known before it started; "
                      "a newer ComfyUI runs its assets database unless --disable-assets",
                      database)
    database = folders.database(flags.assets_era, install)
    if not flags.assets_era:
        return Assets(AssetsMode.NONE, "this ComfyUI has no assets system (no --disable-assets)",
                      database)
    if "--disable-assets" in added:
        return Assets(AssetsMode.OFF, "comfyui.assets = \"off\": --disable-assets passed",
                      database)
    if "--disable-assets" in names:
        return Assets(AssetsMode.OFF, "--disable-assets in comfyui.command", database)
    if "--enable-assets" in names:
        return Assets(AssetsMode.ON, "--enable-assets in comfyui.command", database)
    return Assets(AssetsMode.ON, "comfyui.assets = \"on\" (ComfyUI's default)", database)


def _render_child(command: Iterable[str], env: dict[str, str], cwd: Path | None,
                  values: dict[str, str], folder_flags: list[str],
                  added: Sequence[str] = ()) -> ChildPlan:
    """The command with its placeholders filled; ``added`` goes where {instance_folders} is
    (after its folder flags), else at the end."""
    rendered: list[str] = []
    placed = False
    for arg in command:
        if arg == "{instance_folders}":
            rendered += [*folder_flags, *added]
            placed = True
        else:
            rendered.append(render(arg, values))
    if not placed:
        rendered += added
    return ChildPlan(rendered, {k: render(v, values) for k, v in env.items()},
                     Path(render(str(cwd), values)) if cwd else None)


def _values(settings: Any, number: int, count: int, gpu: GpuSlot) -> dict[str, str]:
    comfy_url, wrapper_url = _shift(settings.comfyui.url, number), _shift(settings.wrapper.url,
                                                                         number)
    state_dir = Path(settings.worker.state_dir)
    if count > 1:
        state_dir = state_dir / "instances" / str(number)
    return {"instance": str(number),
            "comfyui_port": str(urlsplit(comfy_url).port),
            "comfyui_url": comfy_url,
            "wrapper_port": str(urlsplit(wrapper_url).port),
            "wrapper_url": wrapper_url,
            "gpu_index": "" if gpu.index is None else str(gpu.index),
            "gpu_uuid": gpu.uuid or "", "gpu_name": gpu.name or "",
            "state_dir": str(state_dir), "instance_folders": ""}


def help_command(settings: Any, gpu: GpuSlot = GpuSlot()) -> ChildPlan:
    """Instance 0's ComfyUI command as the operator wrote it (placeholders filled, nothing of
    the worker's added): what is asked for ``--help`` before any instance starts."""
    values = _values(settings, 0, 1, gpu)
    c = settings.comfyui
    return _render_child([a for a in c.command if a != "{instance_folders}"], dict(c.env), c.cwd,
                         {**values, "port": values["comfyui_port"]}, [])


def plan_instances(settings: Any, slots: Sequence[GpuSlot],
                   flags: ComfyFlags | None = None) -> list[InstancePlan]:
    """Every instance's plan. ``flags``: what this ComfyUI accepts (None: not known, so the
    worker adds only {instance_folders}' flags, which every ComfyUI since 0.3.64 has)."""
    c, w = settings.comfyui, settings.wrapper
    count = len(slots)
    templated = uses_placeholders(settings)
    plans = []
    for number, gpu in enumerate(slots):
        values = _values(settings, number, count, gpu)
        comfy_url, wrapper_url = values["comfyui_url"], values["wrapper_url"]
        state_dir = Path(values["state_dir"])
        plain = [a for a in c.command if a != "{instance_folders}"]
        base = discover([render(a, {**values, "port": values["comfyui_port"]}) for a in plain],
                        c.cwd, c.install_path).base.path
        folder_flags = _instance_folder_flags(base, number, flags) if count > 1 else []
        root = _instance_root(base, number)
        make = [root / sub for sub in ("output", "input", "temp", "user")] \
            if count > 1 and "{instance_folders}" in c.command else []
        added, must_exist = _worker_flags(settings, flags, plain)
        comfy = _render_child(c.command, dict(c.env), c.cwd,
                              {**values, "port": values["comfyui_port"]}, folder_flags, added)
        pinned = templated and gpu.uuid is not None
        if pinned:
            comfy.env.setdefault("CUDA_VISIBLE_DEVICES", gpu.uuid)
        folders = discover(comfy.command, comfy.cwd, c.install_path,
                           {kind: settings.get(f"comfyui.{kind}_dir")
                            for kind in ("output", "input", "temp", "models")})
        wrapper = _render_child(w.command, dict(w.env), w.cwd,
                                {**values, "port": values["wrapper_port"]}, [])
        plans.append(InstancePlan(number, count, gpu, comfy_url, wrapper_url, comfy, wrapper,
                                  folders, state_dir, pinned, values,
                                  tuple([*make, *must_exist]), flags,
                                  _assets(settings, flags, plain, added, folders),
                                  c.install_path))
    return plans


def plan_checked(settings: Any, slots: Sequence[GpuSlot],
                 flags: ComfyFlags | None) -> list[InstancePlan]:
    """`plan_instances`, refused (PlanError, with `refusals`' words) when instances would
    share a database: the daemon's start."""
    plans = plan_instances(settings, slots, flags)
    problems = refusals(plans, flags)
    if problems:
        raise PlanError("; ".join(problems))
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


def _database_rules(flags: ComfyFlags | None) -> tuple[bool, ...]:
    """Where ComfyUI keeps its database when no --database-url is given: in its user folder
    (True: the newest ComfyUI) or under its install folder (False: 0.3.64). Not known: both."""
    if flags is None or flags.guessed:
        return (True, False)
    return (flags.assets_era,)


def refusals(plans: Sequence[InstancePlan], flags: ComfyFlags | None = None) -> list[str]:
    """What stops this plan from running: two instances on one SQLite database (the newest
    ComfyUI locks it; the second one stops at start with ``ASSETS_STARTUP_FAILED: in_use``).
    The same words in `config check` and at the daemon's start."""
    problems: list[str] = []
    for follows_user in _database_rules(flags):
        owners: dict[Path, InstancePlan] = {}
        for plan in plans:
            folders = plan.folders
            database = folders.database(follows_user, plan.install_path)
            if database is None:
                continue
            first = owners.setdefault(database, plan)
            if first is plan:
                continue
            if folders.database_url:
                why = "the same --database-url"
            elif follows_user:
                why = f"comfyui.db in the shared user folder {folders.user.describe()}"
            else:
                why = ("ComfyUI 0.3.64 keeps it under comfyui.install_path/user whatever "
                       "--user-directory says")
            problem = (f"comfyui.command: instances {first.number} and {plan.number} would share "
                       f"ComfyUI's SQLite database {database} ({why}); a second ComfyUI on one "
                       f"database stops at start (ASSETS_STARTUP_FAILED: in_use): "
                       f"{OWN_DATABASE}")
            if problem not in problems:
                problems.append(problem)
            break
    return problems


def _check_plans(settings: Any) -> list[InstancePlan] | None:
    """Instances 0 and 1 on two made-up GPUs, so a plan is judged without NVML; None when only
    one instance can run (the command is not a template, or comfyui.gpus names one GPU):
    nothing can collide."""
    selection = settings.comfyui.gpus
    if not uses_placeholders(settings) or (selection != "all" and len(selection) < 2):
        return None
    fake = [GpuSlot(0, "GPU-check-0", "check"), GpuSlot(1, "GPU-check-1", "check")]
    return plan_instances(settings, fake, _known_without_asking(settings))


def _known_without_asking(settings: Any) -> ComfyFlags | None:
    version = settings.comfyui.version
    return None if version == "auto" else for_version(version, "comfyui.version")


def config_refusals(settings: Any) -> list[str]:
    """`config check`'s errors: what `refusals` would stop at start on a host with several
    GPUs. With comfyui.version "auto" the file alone does not say which ComfyUI runs, so a
    database shared under either version's rule is refused."""
    plans = _check_plans(settings)
    return [] if plans is None else refusals(plans, _known_without_asking(settings))


def collisions(settings: Any) -> list[str]:
    """Warnings for `config check`: what else two instances of this configuration would share.

    Judged on instances 0 and 1 with two made-up GPUs, so it works without NVML."""
    plans = _check_plans(settings)
    if plans is None:
        return []
    first, second = plans
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
    if first.folders.user.path == second.folders.user.path:
        problems.append(f"comfyui.command: instances would share ComfyUI's user folder "
                        f"{first.folders.user.describe()}; add {{instance_folders}} to "
                        "comfyui.command or put {instance} in --user-directory")
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
