"""The wrapper's view of ComfyUI's output folder, asked when it was only guessed.

With no comfyui.output_dir and no folder flag in comfyui.command, the settings put the output
folder under comfyui.install_path. That guess is wrong whenever comfyui.command is a script that
hides ComfyUI's ``--base-directory``, and outputs fetched through ``GET /view`` would then be
written into the ComfyUI checkout. So, before its first prompt, the wrapper asks:

1. the host, when the daemon started it (it passes its pid): the process in the daemon's tree
   that listens on ComfyUI's port, its command line and working folder (exact, relative paths
   included; supervisor/comfy_argv.py);
2. else ComfyUI's ``GET /system_stats``, whose ``system.argv`` is ComfyUI's real command line
   but carries no working folder: relative paths in it are taken from comfyui.install_path
   (where ComfyUI normally runs), and the log says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from config.comfy_folders import ComfyFolders, Folder, from_running, guessed

#: Set by the daemon in the environment of the wrapper it starts: the daemon's pid.
SUPERVISOR_PID_ENV = "COMFY_WORKER_SUPERVISOR_PID"

logger = logging.getLogger(__name__)


class OutputFolderGuide:
    """Holds the output folder; `learn` replaces a guess by what ComfyUI says, once."""

    def __init__(self, settings: Any, client: Any):
        folders = settings.comfyui_folders
        self.folder: Folder = folders.output
        self._client = client
        self._install_path: Path | None = settings.comfyui.install_path
        self._explicit = {kind: settings.get(f"comfyui.{kind}_dir")
                          for kind in ("output", "input", "temp", "models")}
        self._pending = guessed(folders)
        supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
        self._supervisor_pid = int(supervisor) if supervisor.isdigit() else None
        self._port: int | None = None
        if self._supervisor_pid is not None:
            # Only then: psutil is loaded when a daemon started this wrapper.
            from supervisor.ports import local_port

            self._port = local_port(settings.comfyui.url)

    async def learn(self, timeout: float = 10.0) -> Folder:
        """The output folder to use now. While it is a guess, ask ComfyUI (again at the next
        call when ComfyUI did not answer)."""
        if not self._pending:
            return self.folder
        if self._supervisor_pid is not None and self._port is not None:
            from supervisor.comfy_argv import running_command

            found = await asyncio.to_thread(running_command, self._port, self._supervisor_pid)
            if found is not None:
                self._pending = False
                return self._use(from_running(
                    found.argv, found.cwd, self._install_path, self._explicit,
                    source=f"ComfyUI's running command (pid {found.pid})"), "")
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
