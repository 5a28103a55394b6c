"""The GPU reference table (config/gpu_reference.toml) and the expected time of one run.

The table holds SD1.5 512x512 it/s per GPU model; ``expected_seconds`` scales it to the
benchmark's own size and step count. An operator's ``benchmark.expected_seconds``
(BENCHMARK_EXPECTED_SECONDS) replaces the table; see :func:`expectation`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import config
from benchmark.errors import ReferenceTableError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

# Shipped as package data of `config`, next to the settings it goes with.
REFERENCE_PATH = Path(config.__file__).resolve().parent / "gpu_reference.toml"
REFERENCE_PIXELS = 512 * 512
EXPECTED_SECONDS_ENV = "BENCHMARK_EXPECTED_SECONDS"


@dataclass(frozen=True)
class GpuReference:
    """One row of the table."""

    label: str
    match: tuple[str, ...]
    its: float  # SD1.5, 512x512, fp16, batch 1
    overhead_s: float  # per run, outside the sampler


@dataclass(frozen=True)
class ReferenceMatch:
    reference: GpuReference
    matched: str  # the match string that won


@dataclass(frozen=True)
class Expectation:
    """What one run should take, and where that figure comes from.

    ``seconds`` is None when there is nothing to compare with; ``note`` then says why.
    """

    seconds: float | None
    source: str  # "setting" | "reference" | "none"
    note: str  # human: "reference NVIDIA GeForce RTX 4090 (33 it/s at 512x512)"
    reference: GpuReference | None = None
    its: float | None = None  # expected sampler it/s at the benchmark's size


def load_reference(path: Path | None = None) -> tuple[GpuReference, ...]:
    """Read and check the table. Raises :class:`ReferenceTableError` naming the bad row."""
    return _load_cached(str(path or REFERENCE_PATH))


@lru_cache(maxsize=4)
def _load_cached(path: str) -> tuple[GpuReference, ...]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReferenceTableError(f"GPU reference table {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ReferenceTableError(f"GPU reference table {path} is not valid TOML: {exc}") from None
    rows = data.get("gpu")
    if not isinstance(rows, list) or not rows:
        raise ReferenceTableError(f"GPU reference table {path} has no [[gpu]] rows")
    table = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}: [[gpu]] row {number}"
        if not isinstance(row, dict):
            raise ReferenceTableError(f"{where} is not a table")
        label = row.get("label")
        match = row.get("match")
        its = row.get("its")
        overhead = row.get("overhead_s", 0.0)
        if not isinstance(label, str) or not label:
            raise ReferenceTableError(f"{where}: label must be a non-empty string")
        if not (isinstance(match, list) and match and all(isinstance(m, str) and m.strip() for m in match)):
            raise ReferenceTableError(f"{where} ({label}): match must be a list of non-empty strings")
        if not isinstance(its, (int, float)) or isinstance(its, bool) or its <= 0:
            raise ReferenceTableError(f"{where} ({label}): its must be a positive number")
        if not isinstance(overhead, (int, float)) or isinstance(overhead, bool) or overhead < 0:
            raise ReferenceTableError(f"{where} ({label}): overhead_s must be a number >= 0")
        table.append(GpuReference(label, tuple(m.strip() for m in match), float(its), float(overhead)))
    return tuple(table)


def _edge_match(needle: str, name: str) -> bool:
    # A word edge on both sides: "A100" must not match "RTX A1000", nor "L4" match "L40S".
    pattern = r"(?<![0-9a-z])" + re.escape(needle.lower()) + r"(?![0-9a-z])"
    return re.search(pattern, name.lower()) is not None


def find_reference(gpu_name: str | None, table: tuple[GpuReference, ...] | None = None
                   ) -> ReferenceMatch | None:
    """The row whose longest match string occurs in ``gpu_name`` (case-insensitive), or None."""
    if not gpu_name:
        return None
    best: ReferenceMatch | None = None
    for row in table if table is not None else load_reference():
        for needle in row.match:
            if _edge_match(needle, gpu_name) and (best is None or len(needle) > len(best.matched)):
                best = ReferenceMatch(row, needle)
    return best


def expected_seconds(reference: GpuReference, *, width: int, height: int, steps: int) -> float:
    """steps / (its scaled by pixel count) + the row's fixed overhead."""
    return steps / scaled_its(reference, width=width, height=height) + reference.overhead_s


def scaled_its(reference: GpuReference, *, width: int, height: int) -> float:
    # The UNet's cost grows about linearly with the latent's pixel count.
    return reference.its * REFERENCE_PIXELS / (width * height)


def expectation(gpu_name: str | None, *, width: int, height: int, steps: int,
                override_seconds: float = 0.0,
                table: tuple[GpuReference, ...] | None = None) -> Expectation:
    """The expected seconds of one run: the operator's figure when set, else the table's."""
    match = find_reference(gpu_name, table)
    its = scaled_its(match.reference, width=width, height=height) if match else None
    if override_seconds and override_seconds > 0:
        return Expectation(override_seconds, "setting",
                           f"{EXPECTED_SECONDS_ENV}={override_seconds:g}",
                           match.reference if match else None, its)
    if match is None:
        shown = gpu_name or "unknown"
        return Expectation(None, "none", f"no reference for this GPU: {shown}")
    seconds = expected_seconds(match.reference, width=width, height=height, steps=steps)
    return Expectation(seconds, "reference",
                       f"reference {match.reference.label} ({match.reference.its:g} it/s at 512x512)",
                       match.reference, its)
