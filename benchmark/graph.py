"""The benchmark's workload: ComfyUI's default SD1.5 text-to-image graph.

Each run gets a random prompt (from benchmark.prompts_file, else the package's own
test_prompts.txt) and a
random seed, so ComfyUI's cache never answers for the sampler. The *fingerprint* is a hash of
the graph with those two removed: two graphs with the same fingerprint do the same work, which
is what the verdict cache keys on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The default prompts, package data of `benchmark` (in the wheel, so in every installation).
DEFAULT_PROMPTS = resources.files(__package__) / "test_prompts.txt"
FILENAME_PREFIX = "comfy-worker-benchmark"
NEGATIVE_PROMPT = "blurry, low quality, distorted, watermark, text"
MAX_SEED = 2**63 - 1  # KSampler accepts 0 .. 0xffffffffffffffff; stay well inside
# Used only when the packaged prompts cannot be read (a damaged installation), so that a
# missing data file never stops a benchmark.
FALLBACK_PROMPTS = (
    "a quiet mountain lake at sunrise with mist over the water",
    "a red lighthouse on a rocky coast under a cloudy sky",
    "a ceramic teapot and two cups on a wooden table, soft window light",
)

# Inputs that vary from run to run and do not change the work done.
_SEED_INPUTS = ("seed", "noise_seed")
_VARIABLE_MARK = "<variable>"

SAMPLER_NODE = "3"
POSITIVE_NODE = "6"
SAVE_NODE = "9"


@dataclass(frozen=True)
class BenchmarkGraph:
    graph: dict[str, Any]
    prompt: str
    seed: int
    fingerprint: str


def load_prompts(path: Path | None = None) -> list[str]:
    """Prompts, one a line; blank lines and ``#`` comments skipped. Blocking (reads a file).

    An explicit ``path`` that cannot be read, or holds no prompt, raises ``ValueError``;
    when the packaged default is missing the built-in fallback list is used.
    """
    target = Path(path) if path is not None else DEFAULT_PROMPTS
    try:
        text = target.read_text(encoding="utf-8")
    except OSError as exc:
        if path is not None:
            raise ValueError(f"benchmark prompts file {target} cannot be read: "
                             f"{exc.strerror or exc}") from None
        logger.warning("benchmark: the packaged prompts (%s) cannot be read (%s); using "
                       "built-in prompts, or set benchmark.prompts_file", target,
                       exc.strerror or exc)
        return list(FALLBACK_PROMPTS)
    prompts = [line.strip() for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"benchmark prompts file {target} holds no prompt")
    return prompts


def build_graph(*, width: int, height: int, steps: int, checkpoint: str, prompt: str,
                seed: int, filename_prefix: str = FILENAME_PREFIX) -> dict[str, Any]:
    """ComfyUI's own API example graph (KSampler euler/normal, cfg 8), sized and seeded."""
    return {
        SAMPLER_NODE: {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1, "model": ["4", 0], "positive": [POSITIVE_NODE, 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": width, "height": height, "batch_size": 1}},
        POSITIVE_NODE: {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE_PROMPT, "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER_NODE, 0], "vae": ["4", 2]}},
        SAVE_NODE: {"class_type": "SaveImage",
                    "inputs": {"filename_prefix": filename_prefix, "images": ["8", 0]}},
    }


def graph_fingerprint(graph: dict[str, Any]) -> str:
    """sha256 (first 16 hex digits) of the graph with seeds and the positive prompt blanked.

    Works on any API-format graph: every ``seed``/``noise_seed`` input is blanked, and so is
    the ``text`` of each node a sampler's ``positive`` input points at.
    """
    stripped = copy.deepcopy(graph)
    positives: set[str] = set()
    for node in stripped.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for name in _SEED_INPUTS:
            if name in inputs and not isinstance(inputs[name], list):
                inputs[name] = _VARIABLE_MARK
        link = inputs.get("positive")
        if isinstance(link, list) and link:
            positives.add(str(link[0]))
    for node_id in positives:
        inputs = (stripped.get(node_id) or {}).get("inputs")
        if isinstance(inputs, dict) and isinstance(inputs.get("text"), str):
            inputs["text"] = _VARIABLE_MARK
    canonical = json.dumps(stripped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def workload_fingerprint(*, width: int, height: int, steps: int, checkpoint: str) -> str:
    """The fingerprint every benchmark graph of this size and model has."""
    return graph_fingerprint(build_graph(width=width, height=height, steps=steps,
                                         checkpoint=checkpoint, prompt="", seed=0))


def make_graph(*, width: int, height: int, steps: int, checkpoint: str, prompts: list[str],
               rng: random.Random) -> BenchmarkGraph:
    """A graph with a prompt and a seed drawn from ``rng``."""
    prompt = rng.choice(prompts) if prompts else FALLBACK_PROMPTS[0]
    seed = rng.randint(0, MAX_SEED)
    graph = build_graph(width=width, height=height, steps=steps, checkpoint=checkpoint,
                        prompt=prompt, seed=seed)
    return BenchmarkGraph(graph, prompt, seed, graph_fingerprint(graph))
