"""ComfyUI's start-up failures: the line of its output that says why it stopped, and the fix.

A ComfyUI that stops at start prints its reason and then, often, lines of advice, so its last
line is not the reason. These rules pick the line that is (the newest ComfyUI's
``ASSETS_STARTUP_FAILED: <kind>``, a port in use, argparse's refusal of a flag) and say what to
change, in this worker's settings. They are handed to the child that runs ComfyUI
(`supervisor.children.childlog.exit_cause` applies them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from api.comfy.flags import ComfyFlags

_ASSETS = re.compile(r"ASSETS_STARTUP_FAILED: ?(\w+)")
_PORT_NEW = re.compile(r"Port (\d+) is already in use")
_PORT_OLD = re.compile(r"address already in use|\[Errno 98\]", re.I)
_PORT_NUMBER = re.compile(r"\('[^']*', (\d+)\)")
_UNKNOWN_FLAG = re.compile(r"error: unrecognized arguments: (.+)$")
_BAD_ARGUMENT = re.compile(r"error: argument (--[\w-]+)")

OWN_DATABASE = ("give each instance its own database: {instance_folders} in comfyui.command does "
                "(or --database-url sqlite:///.../{instance}/comfyui.db)")


@dataclass(frozen=True)
class StartupFailure:
    """One rule: ``match(line)`` returns (the text to quote, the fix) when ``line`` says why
    ComfyUI stopped, else None."""

    pattern: re.Pattern[str]
    fix: Callable[[re.Match[str]], str]

    def __call__(self, line: str) -> tuple[str, str] | None:
        found = self.pattern.search(line)
        if found is None:
            return None
        return line[found.start():].strip() if self.pattern is _ASSETS else line.strip(), \
            self.fix(found)


def startup_failures(flags: ComfyFlags | None, assets: str) -> tuple[StartupFailure, ...]:
    """The rules for one ComfyUI, with fixes that fit what the worker knows of it: which flags
    it has (``flags``) and ``comfyui.assets``."""
    can_disable = flags is not None and flags.knows("--disable-assets")
    if assets == "off" and not can_disable:
        without = ("or run it with assets off: the worker passes --disable-assets (comfyui.assets "
                   "= \"off\") once it knows this ComfyUI has that flag: set comfyui.version "
                   "(COMFYUI_VERSION_OVERRIDE) to the version that runs")
    elif assets == "off":
        without = "or run it with assets off (comfyui.assets = \"off\", passes --disable-assets)"
    else:
        without = ("or set comfyui.assets = \"off\" (COMFYUI_ASSETS): the worker then passes "
                   "--disable-assets")

    def assets_fix(found: re.Match[str]) -> str:
        kind = found.group(1)
        fixes = {
            "missing_packages": "install sqlalchemy, alembic and blake3 into the Python that runs "
                                "ComfyUI (pip install -r requirements.txt in its venv), " + without,
            "in_use": "another ComfyUI holds this database's lock; " + OWN_DATABASE + ", or stop "
                      "the other ComfyUI, " + without,
            "locked": "the database is locked by another process; " + OWN_DATABASE + ", " + without,
            "not_writable": "ComfyUI cannot write its database or its folder: make its user "
                            "folder writable for the worker's user, or point --database-url "
                            "elsewhere, " + without,
            "corrupt": "the database file is damaged: move it aside (ComfyUI makes a new one), "
                       + without,
            "newer_revision": "the database was written by a newer ComfyUI: run that version, or "
                              "give this one its own database (--user-directory or "
                              "--database-url), " + without,
            "path_blocked": "ComfyUI refuses the database's path: point --database-url at a file "
                            "in a folder it may write, " + without,
            "unsupported_url": "ComfyUI accepts only sqlite:/// database URLs: fix --database-url "
                               "in comfyui.command, " + without,
        }
        return fixes.get(kind, "see ComfyUI's log for the database error, " + without)

    def port_fix(found: re.Match[str]) -> str:
        port = found.group(1) if found.re is _PORT_NEW else ""
        if not port:
            number = _PORT_NUMBER.search(found.string)
            port = number.group(1) if number else "its port"
        return (f"another program listens on port {port}: stop it, or give ComfyUI a free port "
                "(comfyui.url, COMFYUI_URL, and the --port in comfyui.command)")

    def unknown_flag_fix(found: re.Match[str]) -> str:
        return (f"this ComfyUI does not know {found.group(1).strip()}: remove it from "
                "comfyui.command, or, when the worker added it, set comfyui.version "
                "(COMFYUI_VERSION_OVERRIDE) to the version that runs")

    def bad_argument_fix(found: re.Match[str]) -> str:
        return (f"fix {found.group(1)} in comfyui.command (ComfyUI needs a folder given there to "
                "exist already)")

    return (StartupFailure(_ASSETS, assets_fix), StartupFailure(_PORT_NEW, port_fix),
            StartupFailure(_PORT_OLD, port_fix), StartupFailure(_UNKNOWN_FLAG, unknown_flag_fix),
            StartupFailure(_BAD_ARGUMENT, bad_argument_fix))
