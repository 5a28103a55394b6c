"""Request bodies the tests send: tiny ComfyUI graphs, a sampler graph, an operator's modifier."""

from __future__ import annotations

from benchmark.graph import build_graph


def tiny_workflow(prefix: str = "e", width: int = 32, height: int = 32, color: int = 0) -> dict:
    """A blank image saved as `<prefix>_*.png`: the cheapest graph the simulator runs."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": width, "height": height, "batch_size": 1, "color": color}},
            "2": {"class_type": "SaveImage",
                  "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


TINY = tiny_workflow()


def sampler_graph(steps: int) -> dict:
    """Text2Image's graph at 64×64: the simulator takes `steps` × its step time for it."""
    return build_graph(width=64, height=64, steps=steps, checkpoint="v1-5-pruned-emaonly.safetensors",
                       prompt="a lighthouse", seed=7)


#: A modifier an operator would add (API_MODIFIERS_DIR/Blank.json): an integer binding with a
#: settings-valued maximum and a choice.
OPERATOR_MODIFIER = {
    "name": "Blank", "description": "A blank image of a size.",
    "workflow": tiny_workflow("t", 64, 48),
    "bindings": {"width": {"targets": [["1", "width"]], "type": "integer", "minimum": 8,
                           "maximum": "api.max_dimension", "default": 64,
                           "description": "Width in pixels."},
                 "colour": {"targets": [["1", "color"]], "type": "choice",
                            "choices": [0, 16777215]}}}
