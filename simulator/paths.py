"""The simulator's folders and ComfyUI's rules for naming and finding files in them."""

from __future__ import annotations

import logging
import mimetypes
import os
import shutil
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Extensions ComfyUI's LoadImage offers in its list (it asks mimetypes, and seeds webp).
_IMAGE_EXTENSIONS_EXTRA = {"webp"}


@dataclass(frozen=True)
class Directories:
    """Absolute folders, laid out like ComfyUI's ``--base-directory``."""

    base: str
    output: str
    input: str
    temp: str
    user: str
    checkpoints: str
    # --models-directory (newest ComfyUI only): the operator's folder, not created or filled here.
    models_given: bool = False

    @classmethod
    def from_options(cls, base: str, output: str | None = None, input_dir: str | None = None,
                     temp: str | None = None, user: str | None = None,
                     models: str | None = None) -> "Directories":
        base = os.path.abspath(base)
        models_dir = os.path.abspath(models) if models else os.path.join(base, "models")
        return cls(
            base=base,
            output=os.path.abspath(output) if output else os.path.join(base, "output"),
            input=os.path.abspath(input_dir) if input_dir else os.path.join(base, "input"),
            # ComfyUI puts its temp files in a "temp" folder *inside* --temp-directory.
            temp=os.path.join(os.path.abspath(temp), "temp") if temp else os.path.join(base, "temp"),
            user=os.path.abspath(user) if user else os.path.join(base, "user"),
            checkpoints=os.path.join(models_dir, "checkpoints"),
            models_given=bool(models),
        )

    def prepare(self) -> None:
        """Create the folders and empty the temp folder, as ComfyUI does at start."""
        if os.path.exists(self.temp):
            shutil.rmtree(self.temp, ignore_errors=True)
        folders = [self.output, self.input, self.temp, self.user]
        if not self.models_given:
            folders.append(self.checkpoints)
        for path in folders:
            os.makedirs(path, exist_ok=True)

    def by_type(self, type_name: str | None) -> str | None:
        """The folder for a ``type`` query value; None for an unknown type."""
        return {"output": self.output, "temp": self.temp, "input": self.input}.get(type_name or "")

    def annotated(self, name: str) -> tuple[str, str | None]:
        """Split ComfyUI's ``name [output]`` annotation off a file name."""
        for suffix, folder in (("[output]", self.output), ("[input]", self.input), ("[temp]", self.temp)):
            if name.endswith(suffix):
                return name[:-len(suffix) - 1], folder
        return name, None

    def annotated_path(self, name: str) -> str:
        name, folder = self.annotated(name)
        return os.path.join(folder or self.input, name)

    def input_images(self) -> list[str]:
        """Sorted image files directly in the input folder (LoadImage's choices)."""
        try:
            names = [f for f in os.listdir(self.input) if os.path.isfile(os.path.join(self.input, f))]
        except FileNotFoundError:
            return []
        return sorted(f for f in names if is_image_name(f))

    def checkpoint_files(self) -> list[str]:
        """Checkpoint files placed in ``<models>/checkpoints`` (relative, sorted)."""
        found: list[str] = []
        for root, _dirs, files in os.walk(self.checkpoints, followlinks=True):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self.checkpoints)
                found.append(rel.replace(os.sep, "/"))
        return sorted(found)


def is_image_name(name: str) -> bool:
    ext = name.rsplit(".", 1)[-1].lower()
    if ext in _IMAGE_EXTENSIONS_EXTRA:
        return True
    mime, _ = mimetypes.guess_type(name, strict=False)
    return bool(mime) and mime.split("/")[0] == "image"


@dataclass(frozen=True)
class SaveTarget:
    folder: str
    filename: str
    counter: int
    subfolder: str
    prefix: str


def save_target(filename_prefix: str, output_dir: str, width: int = 0, height: int = 0,
                date_format: str | None = None, newer: bool = False) -> SaveTarget:
    """Where the next file for ``filename_prefix`` goes, following ComfyUI's naming.

    The prefix may hold a subfolder ("sub/name") and %width%/%height%/%year%... variables;
    the counter is one more than the highest ``<name>_NNNNN_`` already in the folder.
    ``date_format`` (the newest ComfyUI's --date-based-output) puts the file in a dated
    subfolder first. Raises ``Exception`` (ComfyUI's wording) when the prefix leaves the output
    folder; ``newer`` gives the newest ComfyUI's message, which lacks the commonpath line.
    """
    if "%" in filename_prefix:
        filename_prefix = _expand_variables(filename_prefix, width, height)
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    if date_format:
        dated = time.strftime(date_format, time.localtime())
        subfolder = os.path.join(dated, subfolder) if subfolder else dated
    folder = os.path.join(output_dir, subfolder)
    common = os.path.commonpath((output_dir, os.path.abspath(folder)))
    if common != output_dir:
        message = ("**** ERROR: Saving image outside the output folder is not allowed."
                   f"\n full_output_folder: {os.path.abspath(folder)}"
                   f"\n         output_dir: {output_dir}")
        if not newer:
            message += f"\n         commonpath: {common}"
        logger.error(message)
        # A bare Exception on purpose: clients read exception_type "Exception", as from ComfyUI.
        raise Exception(message)
    try:
        counter = _next_counter(os.listdir(folder), filename)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        counter = 1
    return SaveTarget(folder, filename, counter, subfolder, filename_prefix)


def _next_counter(existing: list[str], filename: str) -> int:
    best = 0
    n = len(filename)
    for name in existing:
        head = name[:n + 1]
        if os.path.normcase(head[:-1]) != os.path.normcase(filename) or head[-1:] != "_":
            continue
        try:
            digits = int(name[n + 1:].split("_")[0])
        except ValueError:
            digits = 0
        best = max(best, digits)
    return best + 1


def _expand_variables(text: str, width: int, height: int) -> str:
    now = time.localtime()
    for key, value in (("%width%", str(width)), ("%height%", str(height)), ("%year%", str(now.tm_year)),
                       ("%month%", f"{now.tm_mon:02d}"), ("%day%", f"{now.tm_mday:02d}"),
                       ("%hour%", f"{now.tm_hour:02d}"), ("%minute%", f"{now.tm_min:02d}"),
                       ("%second%", f"{now.tm_sec:02d}")):
        text = text.replace(key, value)
    return text
