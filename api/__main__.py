"""`python -m api [--port N] [--host H]`: the API wrapper alone, as the daemon starts it.

The same server as `comfy-worker api`, without loading the rest of the command line (the health
report, the GPU check, the client...). A multi-GPU host runs one wrapper per GPU, and every
module a wrapper does not need costs memory once per instance.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from api.wrapper.app import serve
from config import Settings, SettingsError, load_settings
from config.logsetup import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=None, help="Port (default: api.port).")
    parser.add_argument("--host", default=None, help="Address (default: api.host).")
    parser.add_argument("--config", default=None,
                        help="Settings file (default: $COMFY_WORKER_CONFIG).")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"comfy-worker api: {exc}", file=sys.stderr)
        return 2
    return run(settings, args.port, args.host)


def run(settings: Settings, port: int | None, host: str | None) -> int:
    """Serve until stopped (`comfy-worker api` comes here too); the exit status."""
    setup_logging(settings.worker.log_level, settings.secrets(), name="[wrapper]")
    try:
        asyncio.run(serve(settings, port=port, host=host))
    except OSError as exc:
        print(f"comfy-worker api: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
