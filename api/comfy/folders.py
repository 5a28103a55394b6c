"""Where ComfyUI keeps its files: the one module that knows the rules.

Every caller — the daemon's instances, the wrapper, the provisioner, the benchmark, the model
cache — asks here, in this order: an explicit setting (``comfyui.<kind>_dir``), ComfyUI's
command line as configured, ComfyUI's command line as it really runs (its process, or its
``GET /system_stats`` argv), and last a guess under ``comfyui.install_path`` that says it is one.

ComfyUI lives where the operator put it. Its folders follow its command line: `--base-directory`
moves all of them, `--output-directory`, `--input-directory`, `--temp-directory`,
`--user-directory` and (newer ComfyUI) `--models-directory` move one each (ComfyUI keeps temp files
in a `temp` folder *inside* `--temp-directory`). Without any of them the folders sit in ComfyUI's
own folder, `comfyui.install_path`. Its SQLite database follows `--database-url`, else it is
`comfyui.db` in the user folder (ComfyUI 0.3.64: always under the install folder's `user/`). Assuming `<install_path>/output` instead made every request
on a host started with `--base-directory` fail with "file not on disk", so the worker reads the
command it starts, and an explicit `comfyui.output_dir` (etc.) still wins.

Each folder carries the reason it was chosen, so an error about a missing file can say which
setting to change.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from config import Settings

#: ComfyUI's own flags, mapped to the folder they move.
_FLAGS = {"--base-directory": "base", "--output-directory": "output",
          "--input-directory": "input", "--temp-directory": "temp",
          "--models-directory": "models", "--user-directory": "user",
          "--database-url": "database"}


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Folder:
    path: Path
    why: str  # "from --base-directory in comfyui.command", "comfyui.output_dir", ...

    def describe(self) -> str:
        return f"{self.path} ({self.why})"


@dataclass(frozen=True)
class ComfyFolders:
    base: Folder
    output: Folder
    input: Folder
    temp: Folder
    models: Folder
    user: Folder
    #: ``--database-url`` as written (relative paths resolved), "" when not given.
    database_url: str = ""

    def database(self, follows_user_folder: bool, install_path: Path | None) -> Path | None:
        """Where ComfyUI's SQLite database lives; None when it is kept in memory.

        ``follows_user_folder``: the newest ComfyUI (the one with `--disable-assets`) keeps it
        at ``<user folder>/comfyui.db`` by default; 0.3.64 under ``<install_path>/user``."""
        url = self.database_url
        if url:
            if not url.startswith("sqlite:///"):
                return None
            path = url[len("sqlite:///"):]
            return None if path in ("", ":memory:") else Path(path)
        if follows_user_folder:
            return self.user.path / "comfyui.db"
        return Path(install_path or ".") / "user" / "comfyui.db"


def command_flags(command: Sequence[str]) -> dict[str, str]:
    """ComfyUI's folder flags found in ``command`` (``--flag value`` or ``--flag=value``)."""
    found: dict[str, str] = {}
    args = list(command)
    for index, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name not in _FLAGS:
            continue
        if not eq:
            if index + 1 >= len(args):
                continue
            value = args[index + 1]
        found[_FLAGS[name]] = value
    return found


def discover(command: Sequence[str], cwd: Path | None, install_path: Path | None,
             explicit: dict[str, Path | None] | None = None,
             source: str = "comfyui.command") -> ComfyFolders:
    """ComfyUI's folders: explicit settings first, then its command line, then its install path.

    ``explicit`` maps "output"/"input"/"temp"/"models" to the value of ``comfyui.<kind>_dir`` (None when
    not set). Relative paths on the command line are taken from ``cwd`` (ComfyUI's working
    folder), as ComfyUI itself would. ``source`` names where ``command`` came from, for the
    reasons ("comfyui.command", "ComfyUI's running command (pid 123)").
    """
    explicit = explicit or {}
    flags = command_flags(command)
    where = cwd or Path.cwd()

    def absolute(value: str) -> Path:
        path = Path(value).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else where / path))

    if "base" in flags:
        base = Folder(absolute(flags["base"]), f"from --base-directory in {source}")
    else:
        base = Folder(Path(install_path or "."), "comfyui.install_path")

    def folder(kind: str) -> Folder:
        setting = explicit.get(kind)
        if setting is not None and str(setting) not in ("", "."):
            return Folder(Path(setting), f"comfyui.{kind}_dir")
        if kind in flags:
            path = absolute(flags[kind])
            if kind == "temp":
                path = path / "temp"
            return Folder(path, f"from --{kind}-directory in {source}")
        return Folder(base.path / kind, f"{base.why}, then {kind}/")

    # extra_model_paths.yaml adds search places for models but never moves where files are
    # expected; only --models-directory (newer ComfyUI) or --base-directory do.
    database = flags.get("database", "")
    if database.startswith("sqlite:///") and database[len("sqlite:///"):] not in ("", ":memory:"):
        database = "sqlite:///" + str(absolute(database[len("sqlite:///"):]))
    return ComfyFolders(base=base, output=folder("output"), input=folder("input"),
                        temp=folder("temp"), models=folder("models"), user=folder("user"),
                        database_url=database)


def guessed(folders: ComfyFolders) -> bool:
    """True when the output folder is only a guess: no explicit comfyui.output_dir and no folder
    flag in the configured command, so it was put under comfyui.install_path. A wrapper script
    (``comfyui-cmd.sh BASE PORT``) hides ComfyUI's flags this way; ComfyUI's running command
    then tells the truth (`from_running`)."""
    return folders.output.why.startswith(GUESS)


#: How a guessed folder's reason starts.
GUESS = "comfyui.install_path"


def from_running(argv: Sequence[str], cwd: Path | None, install_path: Path | None,
                 explicit: dict[str, Path | None] | None, source: str) -> ComfyFolders | None:
    """ComfyUI's folders read from its real command line ``argv`` (run in ``cwd``), or None when
    that names no folder flag (the guess under install_path is then right). Explicit settings
    still win, kind by kind."""
    if not command_flags(argv):
        return None
    return discover(argv, cwd, install_path, explicit, source=source)


def from_settings(settings: "Settings") -> ComfyFolders:
    """ComfyUI's folders as the settings say: explicit values, else the configured command."""
    return discover(settings.comfyui.command, settings.comfyui.cwd, settings.comfyui.install_path,
                    explicit_settings(settings))


def explicit_settings(settings: "Settings") -> dict[str, Path | None]:
    """The operator's ``comfyui.<kind>_dir`` values (None where not set)."""
    return {kind: settings.get(f"comfyui.{kind}_dir") for kind in KINDS}


#: The folders an operator can set one by one.
KINDS = ("output", "input", "temp", "models")


def running_folders(port: int, root_pid: int, install_path: Path | None,
                    explicit: dict[str, Path | None]) -> ComfyFolders | None:
    """ComfyUI's folders according to the command of the process in ``root_pid``'s tree that
    listens on ``port``, or None when that says nothing more than the guess (no folder flags, or
    the process is not readable). Blocking (psutil reads /proc): call it through
    ``asyncio.to_thread``."""
    # psutil is loaded only where a daemon runs ComfyUI, not in a wrapper started on its own.
    from api.host.ports import listener_command

    found = listener_command(port, root_pid)
    if found is None:
        return None
    return from_running(found.argv, found.cwd, install_path, explicit,
                        source=f"ComfyUI's running command (pid {found.pid})")


#: Set by the daemon in the environment of the wrapper it starts: the daemon's pid.
SUPERVISOR_PID_ENV = "COMFY_WORKER_SUPERVISOR_PID"



class OutputFolderGuide:
    """The wrapper's output folder; `learn` replaces a guess by what ComfyUI says, once.

    The wrapper's view of ComfyUI's output folder, asked when it was only guessed.
    
    With no comfyui.output_dir and no folder flag in comfyui.command, the settings put the output
    folder under comfyui.install_path. That guess is wrong whenever comfyui.command is a script that
    hides ComfyUI's ``--base-directory``, and outputs fetched through ``GET /view`` would then be
    written into the ComfyUI checkout. So, before its first prompt, the wrapper asks:
    
    1. the host, when the daemon started it (it passes its pid): the process in the daemon's tree
       that listens on ComfyUI's port, its command line and working folder (exact, relative paths
       included; api/host/processes.py);
    2. else ComfyUI's ``GET /system_stats``, whose ``system.argv`` is ComfyUI's real command line
       but carries no working folder: relative paths in it are taken from comfyui.install_path
       (where ComfyUI normally runs), and the log says so.
    """

    def __init__(self, settings: Any, client: Any):
        folders = from_settings(settings)
        self.folder: Folder = folders.output
        self._client = client
        self._install_path: Path | None = settings.comfyui.install_path
        self._explicit = explicit_settings(settings)
        self._pending = guessed(folders)
        supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
        self._supervisor_pid = int(supervisor) if supervisor.isdigit() else None
        self._port: int | None = None
        if self._supervisor_pid is not None:
            # Only then: psutil is loaded when a daemon started this wrapper.
            from api.host.ports import local_port

            self._port = local_port(settings.comfyui.url)

    async def learn(self, timeout: float = 10.0) -> Folder:
        """The output folder to use now. While it is a guess, ask ComfyUI (again at the next
        call when ComfyUI did not answer)."""
        if not self._pending:
            return self.folder
        if self._supervisor_pid is not None and self._port is not None:
            found = await asyncio.to_thread(running_folders, self._port, self._supervisor_pid,
                                            self._install_path, self._explicit)
            if found is not None:
                self._pending = False
                return self._use(found, "")
        try:
            stats = await self._client.system_stats(timeout=timeout)
        except Exception as exc:  # ComfyUI down: the next prompt asks again
            logger.debug("GET /system_stats for ComfyUI's folders failed: %s", exc)
            return self.folder
        argv = (stats.raw.get("system") or {}).get("argv")
        self._pending = False
        if not isinstance(argv, list):
            logger.info("ComfyUI's GET /system_stats reports no argv; keeping the output folder "
                        "%s", self.folder.describe())
            return self.folder
        found = from_running([str(a) for a in argv], self._install_path, self._install_path,
                             self._explicit, source="ComfyUI's GET /system_stats argv")
        return self._use(found, " (relative paths in that argv are taken from "
                                "comfyui.install_path: /system_stats tells no working folder)")

    def _use(self, found: ComfyFolders | None, note: str) -> Folder:
        if found is None or found.output.path == self.folder.path:
            return self.folder
        logger.info("ComfyUI's output folder is %s, not %s%s", found.output.describe(),
                    self.folder.describe(), note)
        self.folder = found.output
        self._client.output_dir = found.output.path.absolute()
        return self.folder
