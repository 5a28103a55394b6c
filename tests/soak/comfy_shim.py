"""Start ComfyUI (the simulator) unless a flag file says to crash at start.

The soak's "ComfyUI crashes at start for a while" fault: while the flag file exists, every start
of ComfyUI exits at once with code 3, as a ComfyUI with a broken custom node would; once the file
is gone, the real command runs (exec, so the daemon supervises it directly).

Usage: python -m tests.soak.comfy_shim FLAG_FILE COMMAND...
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    flag, command = sys.argv[1], sys.argv[2:]
    if os.path.exists(flag):
        sys.stderr.write("soak: simulated start-up crash (custom node import failed)\n")
        sys.stderr.flush()
        os._exit(3)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
