"""The simulator's small exception hierarchy.

Only the errors the simulator itself decides on live here. Failures that ComfyUI reports
under a builtin type (a ``RuntimeError`` from a node, a ``KeyError`` during validation) are
raised as those builtins, so the ``exception_type`` a client reads matches the real server.
"""

from __future__ import annotations


class SimulatorError(Exception):
    """Base class for errors the simulator raises on purpose."""


class KnobError(SimulatorError):
    """A knob value given on the command line or to ``POST /__sim__/knobs`` is not valid."""

    def __init__(self, knob: str, message: str) -> None:
        super().__init__(f"{knob}: {message}")
        self.knob = knob
        self.reason = message


class StartupFailed(SimulatorError):
    """Start-up stops; the CLI logs the message and exits with ``exit_code``."""

    exit_code = 1


class AssetsStartupFailed(StartupFailed):
    """The newest ComfyUI's asset database could not be opened (or its packages are missing).

    ``kind`` is the word after ``ASSETS_STARTUP_FAILED:`` in the log (``in_use``,
    ``missing_packages``, ``unsupported_url``, ``not_writable``...); ``advice`` the lines after it.
    """

    def __init__(self, kind: str, advice: str) -> None:
        super().__init__(f"ASSETS_STARTUP_FAILED: {kind}\n{advice}")
        self.kind = kind
        self.advice = advice


class PortInUse(StartupFailed):
    """The newest ComfyUI says so in one line and exits 1 (0.3.64 dies of the OSError)."""


class InterruptProcessing(SimulatorError):
    """Raised inside a running prompt when ``POST /interrupt`` asked it to stop.

    Mirrors ComfyUI's ``InterruptProcessingException``: it is checked when a node starts and
    at every sampler step, and it turns into an ``execution_interrupted`` event.
    """


class UnidentifiedImageError(OSError):
    """An input file is not an image the simulator can read.

    ComfyUI reads input images with Pillow, so a client sees ``PIL.UnidentifiedImageError``;
    the module is set to match so ``exception_type`` reads the same.
    """


UnidentifiedImageError.__module__ = "PIL"
