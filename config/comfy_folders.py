"""Where ComfyUI keeps its output, input and temp files, asked of its own command line.

ComfyUI lives where the operator put it. Its folders follow its command line: `--base-directory`
moves all of them, `--output-directory`, `--input-directory` and `--temp-directory` move one each
(ComfyUI keeps temp files in a `temp` folder *inside* `--temp-directory`). Without any of them the
folders sit in ComfyUI's own folder, `comfyui.install_path`. Assuming `<install_path>/output` instead made every request
on a host started with `--base-directory` fail with "file not on disk", so the worker reads the
command it starts, and an explicit `comfyui.output_dir` (etc.) still wins.

Each folder carries the reason it was chosen, so an error about a missing file can say which
setting to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

#: ComfyUI's own flags, mapped to the folder they move.
_FLAGS = {"--base-directory": "base", "--output-directory": "output",
          "--input-directory": "input", "--temp-directory": "temp"}


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

    # ComfyUI has no flag for its models folder: it is always models/ under the base folder
    # (extra_model_paths.yaml adds search places but never moves where files are expected).
    return ComfyFolders(base=base, output=folder("output"), input=folder("input"),
                        temp=folder("temp"), models=folder("models"))


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
