"""What stops the daemon from starting; the CLI maps it to an exit code."""

from __future__ import annotations


class DaemonStartError(Exception):
    """The daemon cannot start; the message says why in words (the CLI prints it)."""
