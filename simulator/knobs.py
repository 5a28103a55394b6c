"""Knobs: the simulator's behaviour switches.

Set on the command line, read with ``GET /__sim__/knobs`` and changed at run time with
``POST /__sim__/knobs`` (a JSON object with any subset of the runtime fields), so a test can
make the next prompt slow, fail or crash without restarting the process.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

from simulator.errors import KnobError

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


class DeviceType(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class HangMode(str, enum.Enum):
    """How ``hang_during_prompt`` stops the process from answering.

    BLOCK: the event-loop thread sleeps forever. Connections are still accepted by the kernel
    but nothing is answered, so probes time out; SIGTERM still ends it (as with a real
    ComfyUI stuck inside a GPU call). SIGSTOP: the process stops itself; only SIGKILL (or
    SIGCONT) gets it moving, which exercises a supervisor's escalation path.
    """

    BLOCK = "block"
    SIGSTOP = "sigstop"


@dataclass(frozen=True)
class Fault:
    """How to die: ``exit`` with a status code, or ``signal`` the process itself."""

    kind: str  # "exit" | "signal"
    number: int

    @classmethod
    def parse(cls, text: str | int, knob: str) -> "Fault":
        """``3`` exits with status 3; ``SIGKILL``, ``KILL`` or ``SIGSEGV`` kill by that signal."""
        raw = str(text).strip()
        if raw.lstrip("-").isdigit():
            code = int(raw)
            if not 0 <= code <= 255:
                raise KnobError(knob, f"exit code must be 0..255, got {code}")
            return cls("exit", code)
        name = raw.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return cls("signal", int(signal.Signals[name]))
        except KeyError:
            raise KnobError(knob, f"expected an exit code or a signal name, got {raw!r}") from None

    def describe(self) -> str:
        if self.kind == "exit":
            return str(self.number)
        return signal.Signals(self.number).name

    def trigger(self) -> NoReturn:
        """End the process now. Blocks the calling thread; never returns."""
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        if self.kind == "exit":
            os._exit(self.number)
        # Restore the default action first so the process really dies of the signal (Python
        # turns SIGINT into KeyboardInterrupt otherwise).
        try:
            signal.signal(self.number, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL and SIGSTOP cannot be caught anyway
        os.kill(os.getpid(), self.number)
        time.sleep(1.0)  # the signal is delivered asynchronously; it should not get here
        os._exit(128 + self.number)


@dataclass
class Knobs:
    """Current knob values. Mutated only through ``update`` (and the CLI at start)."""

    step_seconds: float = 0.05
    slow_factor: float = 1.0
    load_seconds: float = 0.0
    crash_during_prompt: Fault | None = None
    hang_during_prompt: HangMode | None = None
    fail_node: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=lambda: [DEFAULT_CHECKPOINT])
    device_type: DeviceType = DeviceType.CPU
    device_name: str | None = None
    vram_total_mb: int = 24576
    # POST /prompt: seconds to wait after the prompt was queued, before answering; and whether
    # to drop the connection instead of answering (a POST that "timed out" after ComfyUI took it).
    post_prompt_delay: float = 0.0
    post_prompt_drop: bool = False
    # SaveImage / PreviewImage: each PNG padded to at least this many bytes (0: as small as a
    # solid colour compresses), with incompressible data, so outputs fill a disk as real ones do.
    image_bytes: int = 0
    # Start-up only: shown by GET, refused by POST.
    startup_delay: float = 0.0
    crash_at_start: Fault | None = None

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("step_seconds", "slow_factor", "load_seconds", "crash_during_prompt",
                      "hang_during_prompt", "fail_node", "checkpoints", "device_type", "device_name",
                      "vram_total_mb", "post_prompt_delay", "post_prompt_drop", "image_bytes")

    def step_delay(self) -> float:
        """Seconds one sampler step takes now."""
        return self.step_seconds * self.slow_factor

    def resolved_device_name(self) -> str:
        if self.device_name:
            return self.device_name
        if self.device_type is DeviceType.CUDA:
            return "cuda:0 NVIDIA Simulated GPU : cudaMallocAsync"
        return "cpu"

    def to_json(self) -> dict[str, Any]:
        return {
            "step_seconds": self.step_seconds,
            "slow_factor": self.slow_factor,
            "load_seconds": self.load_seconds,
            "crash_during_prompt": self.crash_during_prompt.describe() if self.crash_during_prompt else None,
            "hang_during_prompt": self.hang_during_prompt.value if self.hang_during_prompt else None,
            "fail_node": list(self.fail_node),
            "checkpoints": list(self.checkpoints),
            "device_type": self.device_type.value,
            "device_name": self.device_name,  # null: the default name for device_type
            "vram_total_mb": self.vram_total_mb,
            "post_prompt_delay": self.post_prompt_delay,
            "post_prompt_drop": self.post_prompt_drop,
            "image_bytes": self.image_bytes,
            "startup_delay": self.startup_delay,
            "crash_at_start": self.crash_at_start.describe() if self.crash_at_start else None,
        }

    def update(self, changes: Any, log: bool = True) -> list[str]:
        """Apply a JSON object of changes atomically; return the names changed.

        Raises ``KnobError`` naming the first bad field; nothing is changed then.
        """
        if not isinstance(changes, dict):
            raise KnobError("body", "expected a JSON object of knob values")
        parsed: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in self.RUNTIME_FIELDS:
                if name in ("startup_delay", "crash_at_start"):
                    raise KnobError(name, "only applies at start; pass it on the command line")
                raise KnobError(name, f"unknown knob; runtime knobs are {', '.join(self.RUNTIME_FIELDS)}")
            parsed[name] = _PARSERS[name](name, value)
        for name, value in parsed.items():
            setattr(self, name, value)
        if parsed and log:
            shown = self.to_json()
            logger.info("Simulator knobs changed: %s", ", ".join(f"{k}={shown[k]!r}" for k in parsed))
        return list(parsed)


def parse_seconds(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise KnobError(name, f"expected a number of seconds, got {value!r}") from None
    if math.isnan(number) or number < 0:
        raise KnobError(name, f"must be >= 0, got {value!r}")
    return number


def parse_factor(name: str, value: Any) -> float:
    number = parse_seconds(name, value)
    if number == 0:
        raise KnobError(name, "must be > 0")
    return number


def parse_fault(name: str, value: Any) -> Fault | None:
    if value is None or value == "" or value is False:
        return None
    return Fault.parse(value, name)


def parse_hang(name: str, value: Any) -> HangMode | None:
    if value is None or value is False or value == "":
        return None
    if value is True:
        return HangMode.BLOCK
    try:
        return HangMode(str(value).lower())
    except ValueError:
        raise KnobError(name, f"expected one of {[m.value for m in HangMode]} or null, got {value!r}") from None


def parse_name_list(name: str, value: Any) -> list[str]:
    """A list of strings, or one comma-separated string; null or "" is the empty list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v]
    raise KnobError(name, f"expected a list of strings or a comma-separated string, got {value!r}")


def parse_device_type(name: str, value: Any) -> DeviceType:
    try:
        return DeviceType(str(value).lower())
    except ValueError:
        raise KnobError(name, f"expected one of {[d.value for d in DeviceType]}, got {value!r}") from None


def parse_optional_str(name: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise KnobError(name, f"expected a string, got {value!r}")
    return value


def parse_flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise KnobError(name, f"expected true or false, got {value!r}")


def parse_megabytes(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise KnobError(name, f"expected a whole number of MiB, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise KnobError(name, f"expected a whole number of MiB, got {value!r}") from None
    if number <= 0:
        raise KnobError(name, f"must be > 0, got {value!r}")
    return number


def parse_byte_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KnobError(name, f"expected a whole number of bytes >= 0, got {value!r}")
    return value


_PARSERS = {
    "step_seconds": parse_seconds,
    "slow_factor": parse_factor,
    "load_seconds": parse_seconds,
    "crash_during_prompt": parse_fault,
    "hang_during_prompt": parse_hang,
    "fail_node": parse_name_list,
    "checkpoints": parse_name_list,
    "device_type": parse_device_type,
    "device_name": parse_optional_str,
    "vram_total_mb": parse_megabytes,
    "post_prompt_delay": parse_seconds,
    "post_prompt_drop": parse_flag,
    "image_bytes": parse_byte_count,
}
