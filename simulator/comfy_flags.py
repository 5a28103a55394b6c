"""ComfyUI's own command-line flags, as each simulated version knows them.

The flag names, value shapes (type, nargs, choices) and mutually exclusive groups are taken
from ComfyUI's ``comfy/cli_args.py``: 0.3.64 from its release tree, the newest (0.38.1) from
the newest readable copy. A flag the chosen version does not know ends the process with
argparse's ``unrecognized arguments`` and exit status 2, as the real ComfyUI does; a flag it
knows but the simulator does not model is accepted and recorded, so the caller can log it.

Which flags the simulator *models* (reads and acts on) is decided by the caller: pass their
names as ``modeled`` and give their defaults and help in ``overrides``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from simulator.api_version import ApiVersion

# The attribute of the parsed namespace that lists the accepted-but-unmodeled flags.
IGNORED_DEST = "ignored_comfyui_flags"

LOG_LEVELS_0_3_64 = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The newest ComfyUI adds a DETAIL level between DEBUG and INFO.
LOG_LEVELS_NEWEST = ("DEBUG", "DETAIL", "INFO", "WARNING", "ERROR", "CRITICAL")
PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")
HASHING_FUNCTIONS = ("md5", "sha1", "sha256", "sha512")
PERFORMANCE_FEATURES = ("fp16_accumulation", "fp8_matrix_mult", "cublas_ops", "autotune")


def existing_directory(path: str) -> str:
    """ComfyUI's check for --user-directory (and, in the newest, --models-directory)."""
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"The path '{path}' does not exist.")
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"'{path}' is not a directory.")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"You do not have read permissions for '{path}'.")
    return path


def _performance_feature(value: str) -> str:
    if value not in PERFORMANCE_FEATURES:
        raise ValueError(value)
    return value


# argparse names the type in its error ("invalid PerformanceFeature value: 'x'"), as ComfyUI's enum.
_performance_feature.__name__ = "PerformanceFeature"


@dataclass(frozen=True)
class Flag:
    """One ComfyUI flag: a switch (no value) or an option with a value of ``type``."""

    name: str
    switch: bool = False
    type: Callable[[str], Any] | None = None
    nargs: str | None = None
    const: Any = None
    choices: tuple[str, ...] | None = None
    append: bool = False
    metavar: str | None = None
    group: str | None = None  # flags in one group are mutually exclusive

    def argparse_kwargs(self) -> dict[str, Any]:
        if self.switch:
            return {"action": "store_true"}
        kwargs: dict[str, Any] = {"type": self.type or str}
        if self.append:
            kwargs["action"] = "append"
        for key in ("nargs", "const", "choices", "metavar"):
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = value
        return kwargs


def _switches(*names: str, group: str | None = None) -> list[Flag]:
    return [Flag(name, switch=True, group=group) for name in names]


def _common_head() -> list[Flag]:
    return [
        Flag("--listen", nargs="?", const="0.0.0.0,::", metavar="IP"),
        Flag("--port", type=int),
        Flag("--tls-keyfile"),
        Flag("--tls-certfile"),
        Flag("--enable-cors-header", nargs="?", const="*", metavar="ORIGIN"),
        Flag("--max-upload-size", type=float),
        Flag("--base-directory"),
        Flag("--extra-model-paths-config", nargs="+", append=True, metavar="PATH"),
        Flag("--output-directory"),
    ]


def _precision_groups() -> list[Flag]:
    return [
        *_switches("--cuda-malloc", "--disable-cuda-malloc", group="cuda_malloc"),
        *_switches("--force-fp32", "--force-fp16", group="fp"),
        *_switches("--fp32-unet", "--fp64-unet", "--bf16-unet", "--fp16-unet", "--fp8_e4m3fn-unet",
                   "--fp8_e5m2-unet", "--fp8_e8m0fnu-unet", group="fp_unet"),
        *_switches("--fp16-vae", "--fp32-vae", "--bf16-vae", group="fp_vae"),
        *_switches("--cpu-vae"),
        *_switches("--fp8_e4m3fn-text-enc", "--fp8_e5m2-text-enc", "--fp16-text-enc", "--fp32-text-enc",
                   "--bf16-text-enc", group="fp_text_enc"),
    ]


_ATTENTION = ("--use-split-cross-attention", "--use-quad-cross-attention", "--use-pytorch-cross-attention",
              "--use-sage-attention", "--use-flash-attention")


def _flags_0_3_64() -> list[Flag]:
    return [
        *_common_head(),
        Flag("--temp-directory"),
        Flag("--input-directory"),
        *_switches("--auto-launch", "--disable-auto-launch"),
        Flag("--cuda-device", type=int, metavar="DEVICE_ID"),
        Flag("--default-device", type=int, metavar="DEFAULT_DEVICE_ID"),
        *_precision_groups(),
        *_switches("--force-channels-last"),
        Flag("--directml", type=int, nargs="?", const=-1, metavar="DIRECTML_DEVICE"),
        Flag("--oneapi-device-selector", metavar="SELECTOR_STRING"),
        *_switches("--disable-ipex-optimize", "--supports-fp8-compute"),
        Flag("--preview-method", choices=PREVIEW_METHODS),
        Flag("--preview-size", type=int),
        Flag("--cache-classic", switch=True, group="cache"),
        Flag("--cache-lru", type=int, group="cache"),
        Flag("--cache-none", switch=True, group="cache"),
        *_switches(*_ATTENTION, group="attention"),
        *_switches("--disable-xformers"),
        *_switches("--force-upcast-attention", "--dont-upcast-attention", group="upcast"),
        *_switches("--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram", "--cpu", group="vram"),
        Flag("--reserve-vram", type=float),
        *_switches("--async-offload", "--force-non-blocking"),
        Flag("--default-hashing-function", choices=HASHING_FUNCTIONS),
        *_switches("--disable-smart-memory", "--deterministic"),
        Flag("--fast", type=_performance_feature, nargs="*"),
        *_switches("--mmap-torch-files", "--disable-mmap", "--dont-print-server", "--quick-test-for-ci",
                   "--windows-standalone-build", "--disable-metadata", "--disable-all-custom-nodes"),
        Flag("--whitelist-custom-nodes", nargs="+"),
        *_switches("--disable-api-nodes", "--multi-user"),
        Flag("--verbose", nargs="?", const="DEBUG", choices=LOG_LEVELS_0_3_64),
        *_switches("--log-stdout"),
        Flag("--front-end-version"),
        Flag("--front-end-root", type=existing_directory),
        Flag("--user-directory", type=existing_directory),
        *_switches("--enable-compress-response-body"),
        Flag("--comfy-api-base"),
        Flag("--database-url"),
    ]


def _flags_newest() -> list[Flag]:
    return [
        *_common_head(),
        *_switches("--date-based-output"),
        Flag("--date-output-format"),
        Flag("--temp-directory"),
        Flag("--input-directory"),
        *_switches("--auto-launch", "--disable-auto-launch"),
        # A string now: one id, a comma list, or "all".
        Flag("--cuda-device", metavar="DEVICE_ID"),
        Flag("--default-device", type=int, metavar="DEFAULT_DEVICE_ID"),
        *_precision_groups(),
        *_switches("--fp16-intermediates", "--force-channels-last"),
        Flag("--directml", type=int, nargs="?", const=-1, metavar="DIRECTML_DEVICE"),
        Flag("--oneapi-device-selector", metavar="SELECTOR_STRING"),
        *_switches("--supports-fp8-compute", "--enable-triton-backend", "--disable-triton-backend"),
        Flag("--preview-method", choices=PREVIEW_METHODS),
        Flag("--preview-size", type=int),
        Flag("--cache-ram", type=float, nargs="*", metavar="GB", group="cache"),
        Flag("--cache-classic", switch=True, group="cache"),
        Flag("--cache-lru", type=int, group="cache"),
        Flag("--cache-none", switch=True, group="cache"),
        Flag("--high-ram", switch=True, group="cache"),
        *_switches(*_ATTENTION, "--use-ck-attention", group="attention"),
        *_switches("--disable-xformers"),
        *_switches("--force-upcast-attention", "--dont-upcast-attention", group="upcast"),
        *_switches("--enable-manager"),
        *_switches("--disable-manager-ui", "--enable-manager-legacy-ui", group="manager"),
        # --normalvram is gone from this group.
        *_switches("--gpu-only", "--highvram", "--lowvram", "--novram", "--cpu", group="vram"),
        Flag("--reserve-vram", type=float),
        Flag("--vram-headroom", type=float),
        *_switches("--disable-nvml-pressure"),
        Flag("--async-offload", type=int, nargs="?", const=2, metavar="NUM_STREAMS"),
        *_switches("--disable-async-offload", "--disable-dynamic-vram", "--enable-dynamic-vram", "--fast-disk",
                   "--disable-fast-disk", "--disable-cuda-graphs", "--disable-comfy-compiler",
                   "--assert-graph-breaks", "--force-non-blocking"),
        Flag("--default-hashing-function", choices=HASHING_FUNCTIONS),
        *_switches("--disable-smart-memory", "--deterministic"),
        Flag("--fast", type=_performance_feature, nargs="*"),
        *_switches("--debug-hang", "--disable-pinned-memory", "--mmap-torch-files", "--disable-mmap",
                   "--dont-print-server", "--quick-test-for-ci", "--windows-standalone-build",
                   "--disable-metadata", "--disable-all-custom-nodes"),
        Flag("--whitelist-custom-nodes", nargs="+"),
        Flag("--disabled-nodes-config", metavar="PATH"),
        *_switches("--disable-partner-nodes", "--offline", "--disable-api-nodes", "--multi-user"),
        # LEVEL, LEVEL FILE or nothing; repeatable (see VerboseAction).
        Flag("--verbose", nargs="*", metavar="LEVEL FILE"),
        *_switches("--log-stdout"),
        Flag("--front-end-version"),
        Flag("--front-end-root", type=existing_directory),
        Flag("--user-directory", type=existing_directory),
        Flag("--models-directory", type=existing_directory),
        *_switches("--enable-compress-response-body"),
        Flag("--comfy-api-base"),
        Flag("--database-url"),
        *_switches("--disable-assets", "--enable-assets", "--enable-asset-hashing"),
        Flag("--feature-flag", append=True, metavar="KEY[=VALUE]"),
        *_switches("--list-feature-flags"),
    ]


_TABLES: dict[ApiVersion, Callable[[], list[Flag]]] = {
    ApiVersion.V0_3_64: _flags_0_3_64,
    ApiVersion.V0_38_1: _flags_newest,
}


def comfyui_flags(version: ApiVersion) -> list[Flag]:
    """Every flag this ComfyUI version's command line knows, in its order."""
    return _TABLES[version]()


def flag_names(version: ApiVersion) -> frozenset[str]:
    return frozenset(flag.name for flag in comfyui_flags(version))


class _Ignored(argparse.Action):
    """Accepts a flag the simulator does not model and records it (with its values)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        seen = list(getattr(namespace, IGNORED_DEST, None) or [])
        if isinstance(values, list):
            shown = [option_string or self.dest, *map(str, values)]
        elif values is None or values == []:
            shown = [option_string or self.dest]
        else:
            shown = [option_string or self.dest, str(values)]
        seen.append(" ".join(shown))
        setattr(namespace, IGNORED_DEST, seen)


class _IgnoredSwitch(_Ignored):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.pop("type", None)
        super().__init__(option_strings, dest, nargs=0, **kwargs)


@dataclass
class ComfyFlagOptions:
    """How ``add_comfyui_flags`` treats the modeled flags."""

    modeled: frozenset[str]
    # Per modeled flag: argparse keyword arguments that replace or add to the table's
    # (default, help, a custom action...).
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    every_flag: bool = True  # False: only the modeled flags (unknown ones are left to the caller)


def add_comfyui_flags(parser: argparse.ArgumentParser, version: ApiVersion, options: ComfyFlagOptions) -> None:
    """Add this version's ComfyUI flags to ``parser``.

    Modeled flags parse into their usual ``dest``; the others (with ``every_flag``) are
    accepted with ComfyUI's value shape and listed in ``namespace.ignored_comfyui_flags``.
    """
    modeled_group = parser.add_argument_group(f"ComfyUI {version.value} options the simulator models")
    other_group = parser.add_argument_group(f"other ComfyUI {version.value} options (accepted, ignored)")
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    parser.set_defaults(**{IGNORED_DEST: []})
    for flag in comfyui_flags(version):
        is_modeled = flag.name in options.modeled
        if not is_modeled and not options.every_flag:
            continue
        container: Any = modeled_group if is_modeled else other_group
        if flag.group is not None:
            # Mutually exclusive as in ComfyUI ("not allowed with argument ..."), whether or
            # not the simulator models each member.
            if flag.group not in exclusive:
                exclusive[flag.group] = parser.add_mutually_exclusive_group()
            container = exclusive[flag.group]
        kwargs = flag.argparse_kwargs()
        if is_modeled:
            kwargs.update(options.overrides.get(flag.name, {}))
        else:
            kwargs["action"] = _IgnoredSwitch if flag.switch else _Ignored
            if not flag.switch and "choices" not in kwargs:
                kwargs.setdefault("metavar", flag.name.lstrip("-").upper().replace("-", "_"))
            kwargs["dest"] = "_ignored_" + flag.name.lstrip("-").replace("-", "_")
            kwargs["default"] = argparse.SUPPRESS
            kwargs["help"] = f"accepted and ignored (ComfyUI {version.value} knows it)"
        container.add_argument(flag.name, **kwargs)
