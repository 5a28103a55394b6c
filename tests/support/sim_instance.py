"""Start the simulator as one instance of a multi-GPU worker in tests.

`python tests/support/sim_instance.py N <simulator args>`: runs `python -m simulator <args>` in this very
process (exec, so the daemon's port-ownership check sees its own child), adding `--slow-factor F`
when the environment's SIM_SLOW (`2=1.3,3=1.1`) names instance N: a GPU slower than its siblings.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    instance, args = sys.argv[1], sys.argv[2:]
    slow = dict(item.split("=", 1) for item in os.environ.get("SIM_SLOW", "").split(",") if item)
    if instance in slow:
        args += ["--slow-factor", slow[instance]]
    os.execv(sys.executable, [sys.executable, "-m", "simulator", *args])


if __name__ == "__main__":
    main()
