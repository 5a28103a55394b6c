"""GPUs of the same model on one host, compared with each other.

A reference table knows a few GPU models, and only at one size; the GPUs beside this one know
exactly what this model does with this graph, this driver and this ComfyUI, right now. So each
instance's speed is set against the median of its siblings (the other GPUs of the same model on
the host): one that needs more time per sampler step than that median by more than the slow
threshold is slow, even where no reference figure exists. The siblings' median leaves the GPU
itself out, so one bad card among two is still found.

Pure functions of the figures; the daemon's benchmark controller applies the verdicts.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Hashable, Sequence


@dataclass(frozen=True)
class SiblingFigure:
    key: Hashable          # whose figure (an instance number)
    model: str             # GPU model name; only the same model is compared
    its: float             # measured sampler it/s


@dataclass(frozen=True)
class SiblingJudgement:
    ratio: float           # the siblings' median it/s over this GPU's: 1.30 = 30% more time
    siblings: int
    median_its: float
    its: float
    slow: bool

    def text(self) -> str:
        return (f"{round((self.ratio - 1) * 100)}% slower than the median of its "
                f"{self.siblings} sibling GPU{'s' if self.siblings > 1 else ''} of the same "
                f"model ({self.its:.2f} it/s against {self.median_its:.2f} it/s)")

    def to_dict(self) -> dict:
        return {"ratio": round(self.ratio, 3), "siblings": self.siblings,
                "median_its": self.median_its, "its": self.its, "slow": self.slow}


def judge_siblings(figures: Sequence[SiblingFigure], threshold: float
                   ) -> dict[Hashable, SiblingJudgement]:
    """A judgement for each figure that has at least one sibling with a figure."""
    out: dict[Hashable, SiblingJudgement] = {}
    for figure in figures:
        others = [f.its for f in figures if f.key != figure.key and f.model == figure.model
                  and f.its > 0]
        if not others or figure.its <= 0:
            continue
        median = statistics.median(others)
        ratio = median / figure.its
        out[figure.key] = SiblingJudgement(ratio, len(others), median, figure.its,
                                           ratio > 1.0 + threshold)
    return out
