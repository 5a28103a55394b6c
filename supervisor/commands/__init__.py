"""The `comfy-worker` commands: what an operator types, apart from the daemon's parts.

`cli.py` is the entry point (`comfy-worker`, `python -m supervisor.commands.cli`) and the table
of commands; `app.py` is the policy they share (how a command ends and with which exit code, how
it reads the settings); each `*_cli.py` module (and `gpu_check.py`) is one command or group, and
the rest is what only the commands use (the health report and its sparklines, the demo's
settings, the admin socket's client side). The commands may import anything below them; nothing
outside this package imports from it.
"""
