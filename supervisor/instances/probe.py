"""Before any ComfyUI starts: ask it which command-line flags it accepts.

ComfyUI's argparse ends the process with exit status 2 on a flag it does not know, so the
worker asks first: it runs comfyui.command (instance 0's, as the operator wrote it) with
``--help``, once per daemon start, and reads the flags from the usage it prints. That costs
0.06–0.09 s on ComfyUI 0.3.64 (it prints the usage before any heavy import) and 0.3–0.5 s on the
simulator; it needs no GPU and no port.

Where it cannot be asked — the program is missing, a start script swallows ``--help`` (and
starts ComfyUI instead: it is stopped after ``HELP_TIMEOUT``), or what it prints is not
ComfyUI's usage — the version its checkout states (``comfyui_version.py`` in comfyui.cwd or
comfyui.install_path: under a millisecond to read, but a version, not its flags) picks a known
version's flags; without one, 0.3.64's flags are assumed. Either way the log says so, and a
warning, also shown in /health, names the setting that says which ComfyUI runs
(``comfyui.version``); with that setting nothing is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import time
from pathlib import Path

from api.comfy.flags import ComfyFlags, assumed, for_version, parse_help, version_file
from config import Settings
from supervisor.children.child import dies_with_parent
from supervisor.instances.plan import GpuSlot, help_command
from supervisor.sdnotify import strip_notify_env

logger = logging.getLogger(__name__)

#: ComfyUI 0.3.64 answers --help in under 0.1 s; a script that starts ComfyUI instead is
#: stopped after this long.
HELP_TIMEOUT = 15.0
#: Output kept from the --help run (a usage is a few KiB).
_MAX_OUTPUT = 256 * 1024


async def learn_flags(settings: Settings, gpu: GpuSlot = GpuSlot(), *,
                      timeout: float = HELP_TIMEOUT) -> ComfyFlags:
    """The flags this host's ComfyUI accepts (see the module's doc). Never raises."""
    version = settings.comfyui.version
    if version != "auto":
        flags = for_version(version, "comfyui.version")
        logger.info("ComfyUI's flags: %s, not asked", flags.source)
        return flags
    plan = help_command(settings, gpu)
    argv = [*plan.command, "--help"]
    shown = shlex.join(argv)
    began = time.monotonic()
    try:
        code, text = await _run(argv, plan.env, plan.cwd, timeout)
    except asyncio.TimeoutError:  # before OSError: it is one since Python 3.11
        return await _fallback(settings, f"`{shown}` did not end within {timeout:g} s: a start "
                               "script that does not pass --help on?")
    except OSError as exc:
        return await _fallback(settings, f"`{shown}` could not run: {exc}")
    elapsed = time.monotonic() - began
    known = parse_help(text)
    if not known:
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
        return await _fallback(settings, f"`{shown}` printed no ComfyUI usage (exit {code}"
                               + (f"; last line: {last.strip()[:120]}" if last else "") + ")")
    flags = ComfyFlags(known, f"asked: `{shown}` ({elapsed:.2f} s)", True)
    logger.info("ComfyUI's flags: %d, asked with `%s` in %.2f s; --disable-assets: %s, "
                "--models-directory: %s", len(known), shown, elapsed,
                "yes" if flags.knows("--disable-assets") else "no",
                "yes" if flags.knows("--models-directory") else "no")
    return flags


async def _fallback(settings: Settings, reason: str) -> ComfyFlags:
    """Asking failed: the version the checkout states (comfyui_version.py in comfyui.cwd or
    install_path), else 0.3.64's flags, with a warning naming the setting."""
    c = settings.comfyui
    found = await asyncio.to_thread(version_file, [c.cwd, c.install_path])
    if found is not None:
        version, path = found
        flags = for_version(version, f"{path} says {version}")
        flags = dataclasses.replace(flags, warning=(
            f"could not ask ComfyUI which flags it accepts ({reason}); using {flags.source}: "
            "set comfyui.version (COMFYUI_VERSION_OVERRIDE) if another version runs"))
        logger.warning("%s", flags.warning)
        return flags
    flags = assumed(reason)
    logger.warning("%s", flags.warning)
    return flags


async def _run(argv: list[str], env: dict[str, str], cwd: Path | None,
               timeout: float) -> tuple[int, str]:
    """Run ``argv`` in its own process group (killed whole on timeout) and return its exit
    status and output (stdout and stderr together)."""
    environ = dict(os.environ)
    environ.setdefault("PYTHONUNBUFFERED", "1")
    environ.update(env)
    strip_notify_env(environ)
    proc = await asyncio.create_subprocess_exec(
        *dies_with_parent(argv), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=str(cwd) if cwd else None, env=environ, start_new_session=True)
    try:
        output = await asyncio.wait_for(_read(proc), timeout)
        code = await asyncio.wait_for(proc.wait(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    finally:
        # A member of its group that outlived it (a script's ComfyUI) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return code, output


async def _read(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await proc.stdout.read(65536)
        if not chunk:
            break
        if size < _MAX_OUTPUT:
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")
