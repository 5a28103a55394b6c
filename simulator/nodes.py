"""The simulated node classes, with ComfyUI's input definitions, and ``/object_info``.

Each class copies the *interface* of the ComfyUI node of the same name (input names, types,
defaults, limits, output types, category, output-node flag), because validation errors and
``/object_info`` are built from it. What a node *does* is simulated: images are
``ImageBatch`` descriptions, a sampler sleeps per step and reports progress, loaders check a
name against the configured checkpoint list.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from simulator.api_version import ApiVersion
from simulator.images import (
    PREVIEW_COMPRESS_LEVEL,
    SAVE_COMPRESS_LEVEL,
    Conditioning,
    ImageBatch,
    Latent,
    Mask,
    ModelHandle,
    colour_from_int,
    invert,
    read_image_info,
    write_latent,
    write_png,
)
from simulator.knobs import Knobs
from simulator.paths import Directories, SaveTarget, save_target

MAX_RESOLUTION = 16384

# ComfyUI 0.3.64's comfy.samplers lists, so a workflow that names a sampler validates the same.
SAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]
SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal"]

_OUTPUT_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
# PreviewImage's random suffix alphabet, as ComfyUI spells it.
_PREVIEW_LETTERS = "abcdefghijklmnopqrstupvxyz"


@dataclass
class NodeEnv:
    """What node definitions and runs may read: folders and the live knobs."""

    dirs: Directories
    knobs: Knobs
    disable_metadata: bool = False
    api_version: ApiVersion = ApiVersion.V0_3_64
    # --date-based-output (newest ComfyUI): strftime format of the dated output subfolder.
    date_output_format: str | None = None

    def save_target(self, filename_prefix: str, folder: str, width: int = 0, height: int = 0) -> SaveTarget:
        return save_target(filename_prefix, folder, width, height, date_format=self.date_output_format,
                           newer=self.api_version.is_newer)

    def checkpoint_names(self) -> list[str]:
        """The configured checkpoints plus files in ``<models>/checkpoints``, sorted."""
        return sorted(set(self.knobs.checkpoints) | set(self.dirs.checkpoint_files()))


class RunContext(Protocol):
    """The executor's side of a running node."""

    env: NodeEnv
    prompt_id: str
    node_id: str

    async def progress(self, value: int, total: int) -> None:
        """Report a step; raises ``InterruptProcessing`` when an interrupt is pending."""


@dataclass
class NodeOutput:
    outputs: tuple[Any, ...]
    ui: dict[str, list[Any]] | None = None


class SimNode:
    """Base class: class attributes mirror the ComfyUI node's metadata."""

    CLASS_TYPE: ClassVar[str]
    DISPLAY_NAME: ClassVar[str | None] = None
    CATEGORY: ClassVar[str] = "sd"
    DESCRIPTION: ClassVar[str] = ""
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ()
    RETURN_NAMES: ClassVar[tuple[str, ...] | None] = None
    OUTPUT_TOOLTIPS: ClassVar[tuple[str | None, ...] | None] = None
    OUTPUT_NODE: ClassVar[bool] = False
    PYTHON_MODULE: ClassVar[str] = "nodes"
    # ComfyUI's newer node API describes /object_info a little differently (see node_info).
    SCHEMA_V3: ClassVar[bool] = False
    # Inputs that a VALIDATE_INPUTS-style check owns: min/max/list checks are skipped for them.
    VALIDATE_ARGS: ClassVar[tuple[str, ...]] = ()
    HAS_IS_CHANGED: ClassVar[bool] = False

    @classmethod
    def input_types(cls, env: NodeEnv) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def validate(cls, env: NodeEnv, **inputs: Any) -> bool | str:
        return True

    @classmethod
    def is_changed(cls, env: NodeEnv, **inputs: Any) -> Any:
        return None

    async def run(self, ctx: RunContext, **inputs: Any) -> NodeOutput:
        raise NotImplementedError


# --- images -----------------------------------------------------------------------------

class EmptyImage(SimNode):
    CLASS_TYPE = "EmptyImage"
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def input_types(cls, env):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
        }}

    async def run(self, ctx, width, height, batch_size=1, color=0):
        return NodeOutput((ImageBatch(width, height, batch_size, colour_from_int(color)),))


class SaveImage(SimNode):
    CLASS_TYPE = "SaveImage"
    DISPLAY_NAME = "Save Image"
    CATEGORY = "image"
    DESCRIPTION = "Simulated: writes the images as PNG files into the output folder."
    OUTPUT_NODE = True
    FOLDER_TYPE: ClassVar[str] = "output"
    COMPRESS_LEVEL: ClassVar[int] = SAVE_COMPRESS_LEVEL

    @classmethod
    def input_types(cls, env):
        return {
            "required": {
                "images": ("IMAGE", {}),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            },
            "hidden": dict(_OUTPUT_HIDDEN),
        }

    def folder(self, env: NodeEnv) -> str:
        return env.dirs.output

    def prefix_append(self) -> str:
        return ""

    async def run(self, ctx, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        text = _png_metadata(ctx.env, prompt, extra_pnginfo)
        target = ctx.env.save_target(filename_prefix + self.prefix_append(), self.folder(ctx.env),
                                     images.width, images.height)
        results = []
        counter = target.counter
        for batch_number in range(images.batch):
            name = target.filename.replace("%batch_num%", str(batch_number))
            file = f"{name}_{counter:05}_.png"
            await asyncio.to_thread(write_png, os.path.join(target.folder, file), images.width, images.height,
                                    images.rgb, text, self.COMPRESS_LEVEL, ctx.env.knobs.image_bytes)
            results.append({"filename": file, "subfolder": target.subfolder, "type": self.FOLDER_TYPE})
            counter += 1
        return NodeOutput((), {"images": results})


class PreviewImage(SaveImage):
    CLASS_TYPE = "PreviewImage"
    DISPLAY_NAME = "Preview Image"
    DESCRIPTION = "Simulated: writes the images as PNG files into the output folder."
    FOLDER_TYPE = "temp"
    COMPRESS_LEVEL = PREVIEW_COMPRESS_LEVEL

    @classmethod
    def input_types(cls, env):
        return {"required": {"images": ("IMAGE",)}, "hidden": dict(_OUTPUT_HIDDEN)}

    def folder(self, env: NodeEnv) -> str:
        return env.dirs.temp

    def prefix_append(self) -> str:
        return "_temp_" + "".join(random.choice(_PREVIEW_LETTERS) for _ in range(5))


class LoadImage(SimNode):
    CLASS_TYPE = "LoadImage"
    DISPLAY_NAME = "Load Image"
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    VALIDATE_ARGS = ("image",)
    HAS_IS_CHANGED = True

    @classmethod
    def input_types(cls, env):
        return {"required": {"image": (env.dirs.input_images(), {"image_upload": True})}}

    @classmethod
    def validate(cls, env, image=None, **_):
        if not os.path.exists(env.dirs.annotated_path(image)):
            return f"Invalid image file: {image}"
        return True

    @classmethod
    def is_changed(cls, env, image=None, **_):
        digest = hashlib.sha256()
        with open(env.dirs.annotated_path(image), "rb") as f:
            digest.update(f.read())
        return digest.digest().hex()

    async def run(self, ctx, image):
        info = await asyncio.to_thread(read_image_info, ctx.env.dirs.annotated_path(image))
        picture = ImageBatch(info.width, info.height, info.frames, info.rgb)
        # Without an alpha channel ComfyUI returns a 64x64 empty mask.
        mask = Mask(info.width, info.height, info.frames) if info.has_alpha else Mask(64, 64)
        return NodeOutput((picture, mask))


class ImageInvert(SimNode):
    CLASS_TYPE = "ImageInvert"
    DISPLAY_NAME = "Invert Image"
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def input_types(cls, env):
        return {"required": {"image": ("IMAGE",)}}

    async def run(self, ctx, image):
        return NodeOutput((ImageBatch(image.width, image.height, image.batch, invert(image.rgb)),))


class ImageScale(SimNode):
    CLASS_TYPE = "ImageScale"
    DISPLAY_NAME = "Upscale Image"
    CATEGORY = "image/upscaling"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def input_types(cls, env):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (["disabled", "center"],),
        }}

    async def run(self, ctx, image, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return NodeOutput((image,))
        if width == 0:
            width = max(1, round(image.width * height / image.height))
        elif height == 0:
            height = max(1, round(image.height * width / image.width))
        return NodeOutput((ImageBatch(width, height, image.batch, image.rgb, image.has_alpha),))


# --- text to image ----------------------------------------------------------------------

class CheckpointLoaderSimple(SimNode):
    CLASS_TYPE = "CheckpointLoaderSimple"
    DISPLAY_NAME = "Load Checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = "Simulated: checks the checkpoint name and hands out stand-in model, CLIP and VAE."
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("Stand-in model.", "Stand-in CLIP.", "Stand-in VAE.")

    @classmethod
    def input_types(cls, env):
        return {"required": {
            "ckpt_name": (env.checkpoint_names(), {}),
        }}

    async def run(self, ctx, ckpt_name):
        if ckpt_name not in ctx.env.checkpoint_names():
            raise FileNotFoundError(f"Model in folder 'checkpoints' with filename '{ckpt_name}' not found.")
        delay = ctx.env.knobs.load_seconds * ctx.env.knobs.slow_factor
        if delay > 0:
            await asyncio.sleep(delay)
        return NodeOutput(tuple(ModelHandle(kind, ckpt_name) for kind in ("MODEL", "CLIP", "VAE")))


class CLIPTextEncode(SimNode):
    CLASS_TYPE = "CLIPTextEncode"
    DISPLAY_NAME = "CLIP Text Encode (Prompt)"
    CATEGORY = "conditioning"
    DESCRIPTION = "Simulated: keeps the prompt text as the conditioning."
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Simulated conditioning.",)

    @classmethod
    def input_types(cls, env):
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            "clip": ("CLIP", {}),
        }}

    async def run(self, ctx, text, clip):
        return NodeOutput((Conditioning(text),))


class EmptyLatentImage(SimNode):
    CLASS_TYPE = "EmptyLatentImage"
    DISPLAY_NAME = "Empty Latent Image"
    CATEGORY = "latent"
    DESCRIPTION = "Simulated: a blank latent of the given size."
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Blank latent.",)

    @classmethod
    def input_types(cls, env):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
        }}

    async def run(self, ctx, width, height, batch_size=1):
        return NodeOutput((Latent(width, height, batch_size),))


class KSampler(SimNode):
    CLASS_TYPE = "KSampler"
    DISPLAY_NAME = "KSampler"
    CATEGORY = "sampling"
    DESCRIPTION = "Simulated: waits step_seconds per step and reports progress each step."
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Simulated latent.",)

    @classmethod
    def input_types(cls, env):
        return {"required": {
            "model": ("MODEL", {}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (list(SAMPLER_NAMES), {}),
            "scheduler": (list(SCHEDULER_NAMES), {}),
            "positive": ("CONDITIONING", {}),
            "negative": ("CONDITIONING", {}),
            "latent_image": ("LATENT", {}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    async def run(self, ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                  latent_image, denoise=1.0):
        for step in range(1, steps + 1):
            # Read the knob every step so a test can slow down a prompt that is already running.
            await asyncio.sleep(ctx.env.knobs.step_delay())
            await ctx.progress(step, steps)
        seed_text = f"{seed}|{steps}|{cfg}|{sampler_name}|{scheduler}|{denoise}|{positive.text}|{negative.text}"
        digest = hashlib.sha256(seed_text.encode("utf-8")).digest()
        result = Latent(latent_image.width, latent_image.height, latent_image.batch, (digest[0], digest[1], digest[2]))
        return NodeOutput((result,))


class VAEDecode(SimNode):
    CLASS_TYPE = "VAEDecode"
    DISPLAY_NAME = "VAE Decode"
    CATEGORY = "latent"
    DESCRIPTION = "Simulated: an image eight times the latent's size."
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Simulated image.",)

    @classmethod
    def input_types(cls, env):
        return {"required": {
            "samples": ("LATENT", {}),
            "vae": ("VAE", {}),
        }}

    async def run(self, ctx, samples, vae):
        batch, _channels, height, width = samples.shape
        return NodeOutput((ImageBatch(width * 8, height * 8, batch, samples.rgb),))


class VAEEncode(SimNode):
    CLASS_TYPE = "VAEEncode"
    DISPLAY_NAME = "VAE Encode"
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def input_types(cls, env):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    async def run(self, ctx, pixels, vae):
        return NodeOutput((Latent(pixels.width, pixels.height, pixels.batch, pixels.rgb),))


class SaveLatent(SimNode):
    CLASS_TYPE = "SaveLatent"
    CATEGORY = "_for_testing"
    OUTPUT_NODE = True

    @classmethod
    def input_types(cls, env):
        return {"required": {"samples": ("LATENT",), "filename_prefix": ("STRING", {"default": "latents/ComfyUI"})},
                "hidden": dict(_OUTPUT_HIDDEN)}

    async def run(self, ctx, samples, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        target = ctx.env.save_target(filename_prefix, ctx.env.dirs.output)
        metadata = None
        if not ctx.env.disable_metadata:
            metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
            for key, value in (extra_pnginfo or {}).items():
                metadata[key] = json.dumps(value)
        file = f"{target.filename}_{target.counter:05}_.latent"
        await asyncio.to_thread(write_latent, os.path.join(target.folder, file), samples, metadata)
        return NodeOutput((), {"latents": [{"filename": file, "subfolder": target.subfolder, "type": "output"}]})


# --- nodes ComfyUI defines with its newer node API -------------------------------------------

class ImageBlur(SimNode):
    CLASS_TYPE = "ImageBlur"
    CATEGORY = "image/postprocessing"
    PYTHON_MODULE = "comfy_extras.nodes_post_processing"
    SCHEMA_V3 = True
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def input_types(cls, env):
        return {"required": {
            "image": ("IMAGE", {}),
            "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
        }}

    async def run(self, ctx, image, blur_radius, sigma):
        # A slow node without progress reports: one sampler step's time, and an interrupt
        # only takes effect when the next node starts (as with a real blur).
        await asyncio.sleep(ctx.env.knobs.step_delay())
        return NodeOutput((image,))


class _Primitive(SimNode):
    CATEGORY = "utils/primitive"
    PYTHON_MODULE = "comfy_extras.nodes_primitive"
    SCHEMA_V3 = True
    VALUE_SPEC: ClassVar[tuple[str, dict[str, Any]]]

    @classmethod
    def input_types(cls, env):
        return {"required": {"value": cls.VALUE_SPEC}}

    async def run(self, ctx, value):
        return NodeOutput((value,))


class PrimitiveInt(_Primitive):
    CLASS_TYPE = "PrimitiveInt"
    DISPLAY_NAME = "Int"
    RETURN_TYPES = ("INT",)
    VALUE_SPEC = ("INT", {"min": -sys.maxsize, "max": sys.maxsize, "control_after_generate": True})


class PrimitiveFloat(_Primitive):
    CLASS_TYPE = "PrimitiveFloat"
    DISPLAY_NAME = "Float"
    RETURN_TYPES = ("FLOAT",)
    VALUE_SPEC = ("FLOAT", {"min": -sys.maxsize, "max": sys.maxsize})


class PrimitiveString(_Primitive):
    CLASS_TYPE = "PrimitiveString"
    DISPLAY_NAME = "String"
    RETURN_TYPES = ("STRING",)
    VALUE_SPEC = ("STRING", {"multiline": False})


class PrimitiveBoolean(_Primitive):
    CLASS_TYPE = "PrimitiveBoolean"
    DISPLAY_NAME = "Boolean"
    RETURN_TYPES = ("BOOLEAN",)
    VALUE_SPEC = ("BOOLEAN", {})


NODE_CLASSES: dict[str, type[SimNode]] = {
    cls.CLASS_TYPE: cls for cls in (
        KSampler, CheckpointLoaderSimple, CLIPTextEncode, VAEDecode, VAEEncode, EmptyLatentImage, SaveLatent,
        SaveImage, PreviewImage, LoadImage, ImageScale, ImageInvert, EmptyImage,
        ImageBlur, PrimitiveString, PrimitiveInt, PrimitiveFloat, PrimitiveBoolean,
    )
}


def _png_metadata(env: NodeEnv, prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    if env.disable_metadata:
        return {}
    text: dict[str, str] = {}
    if prompt is not None:
        text["prompt"] = json.dumps(prompt)
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            text[str(key)] = json.dumps(value)
    return text


def node_info(cls: type[SimNode], env: NodeEnv) -> dict[str, Any]:
    """One ``/object_info`` entry, with the keys in the order ComfyUI writes them."""
    inputs = cls.input_types(env)
    outputs = list(cls.RETURN_TYPES)
    if cls.SCHEMA_V3:
        return {
            "input": inputs,
            "input_order": {key: list(value) for key, value in inputs.items()},
            "output": outputs,
            "output_is_list": [False] * len(outputs),
            "output_name": list(cls.RETURN_NAMES or outputs),
            "output_tooltips": list(cls.OUTPUT_TOOLTIPS or [None] * len(outputs)),
            "name": cls.CLASS_TYPE,
            "display_name": cls.DISPLAY_NAME or cls.CLASS_TYPE,
            "description": cls.DESCRIPTION,
            "python_module": cls.PYTHON_MODULE,
            "category": cls.CATEGORY,
            "output_node": cls.OUTPUT_NODE,
            "deprecated": False,
            "experimental": False,
            "api_node": False,
        }
    newer = env.api_version.is_newer
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
    }
    if newer:
        info["is_input_list"] = False
    info.update({
        "output": outputs,
        "output_is_list": [False] * len(outputs),
        "output_name": list(cls.RETURN_NAMES or outputs),
        "name": cls.CLASS_TYPE,
        "display_name": cls.DISPLAY_NAME or cls.CLASS_TYPE,
        "description": cls.DESCRIPTION,
        "python_module": cls.PYTHON_MODULE,
        "category": cls.CATEGORY,
        "output_node": cls.OUTPUT_NODE,
    })
    if newer:
        info["has_intermediate_output"] = False
    if cls.OUTPUT_TOOLTIPS is not None:
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    if newer:
        info["search_aliases"] = []
    return info
