"""The `comfy-worker` commands: what an operator types, apart from the daemon's parts.

`cli.py` is the entry point (`comfy-worker`, `python -m supervisor.commands.cli`); each other
module is one command or what only the commands use (the health report, the demo's settings,
finding a running daemon's admin socket). Nothing under `supervisor/` outside this package
imports from it: data flows from the daemon to the commands, never back.
"""
