"""Which command-line flags a ComfyUI accepts: learned from its ``--help``, or a known version's.

ComfyUI parses its command line with argparse, which ends the process with exit status 2 on a
flag it does not know. So the worker must know, before it starts ComfyUI, which of the flags it
would add (its folder flags, ``--disable-assets``, ``--models-directory``) this ComfyUI has: a
flag this ComfyUI does not know is never passed.

The exact answer is ComfyUI's own ``--help`` (the usage block lists every flag; it comes back
in under 0.1 s for 0.3.64, before any heavy import). Where that cannot be asked (a start script
that swallows its arguments, a timeout) or the operator says which version runs
(``comfyui.version``), a known version's set stands in: 0.3.64's, read from its ``--help``, or
the newest line that could be read (0.38.1), from its ``comfy/cli_args.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: Every flag of ComfyUI 0.3.64 (its `main.py --help`).
FLAGS_0_3_64: frozenset[str] = frozenset((
    "-h", "--async-offload", "--auto-launch", "--base-directory", "--bf16-text-enc",
    "--bf16-unet", "--bf16-vae", "--cache-classic", "--cache-lru", "--cache-none",
    "--comfy-api-base", "--cpu", "--cpu-vae", "--cuda-device", "--cuda-malloc",
    "--database-url", "--default-device", "--default-hashing-function", "--deterministic",
    "--directml", "--disable-all-custom-nodes", "--disable-api-nodes", "--disable-auto-launch",
    "--disable-cuda-malloc", "--disable-ipex-optimize", "--disable-metadata", "--disable-mmap",
    "--disable-smart-memory", "--disable-xformers", "--dont-print-server",
    "--dont-upcast-attention", "--enable-compress-response-body", "--enable-cors-header",
    "--extra-model-paths-config", "--fast", "--force-channels-last", "--force-fp16",
    "--force-fp32", "--force-non-blocking", "--force-upcast-attention", "--fp16-text-enc",
    "--fp16-unet", "--fp16-vae", "--fp32-text-enc", "--fp32-unet", "--fp32-vae", "--fp64-unet",
    "--fp8_e4m3fn-text-enc", "--fp8_e4m3fn-unet", "--fp8_e5m2-text-enc", "--fp8_e5m2-unet",
    "--fp8_e8m0fnu-unet", "--front-end-root", "--front-end-version", "--gpu-only", "--highvram",
    "--input-directory", "--listen", "--log-stdout", "--lowvram", "--max-upload-size",
    "--mmap-torch-files", "--multi-user", "--normalvram", "--novram", "--oneapi-device-selector",
    "--output-directory", "--port", "--preview-method", "--preview-size", "--quick-test-for-ci",
    "--reserve-vram", "--supports-fp8-compute", "--temp-directory", "--tls-certfile",
    "--tls-keyfile", "--use-flash-attention", "--use-pytorch-cross-attention",
    "--use-quad-cross-attention", "--use-sage-attention", "--use-split-cross-attention",
    "--user-directory", "--verbose", "--whitelist-custom-nodes", "--windows-standalone-build",
))

#: The newest line that could be read (0.38.1): 0.3.64's flags, two fewer, these more.
FLAGS_NEWEST: frozenset[str] = (FLAGS_0_3_64 - {"--disable-ipex-optimize", "--normalvram"}) | {
    "--assert-graph-breaks", "--cache-ram", "--date-based-output", "--date-output-format",
    "--debug-hang", "--disable-assets", "--disable-async-offload", "--disable-comfy-compiler",
    "--disable-cuda-graphs", "--disable-dynamic-vram", "--disable-fast-disk",
    "--disable-manager-ui", "--disable-nvml-pressure", "--disable-partner-nodes",
    "--disable-pinned-memory", "--disable-triton-backend", "--disabled-nodes-config",
    "--enable-asset-hashing", "--enable-assets", "--enable-dynamic-vram", "--enable-manager",
    "--enable-manager-legacy-ui", "--enable-triton-backend", "--fast-disk", "--feature-flag",
    "--fp16-intermediates", "--high-ram", "--list-feature-flags", "--models-directory",
    "--offline", "--use-ck-attention", "--vram-headroom",
}
NEWEST_READ = "0.38.1"
BASELINE = "0.3.64"

#: Flags every ComfyUI has: a --help without them is not ComfyUI's.
_ESSENTIAL = ("--listen", "--port")
_USAGE_FLAG = re.compile(r"[\[|]\s*(--?[A-Za-z0-9][\w-]*)")
_OPTION_LINE = re.compile(r"^ {1,4}(-[^ ].*?)(?: {2,}|$)")
_VERSION = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?$")
_VERSION_FILE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)


@dataclass(frozen=True)
class ComfyFlags:
    """The flags one ComfyUI accepts and how that is known.

    ``exact``: read from this ComfyUI's own ``--help``; otherwise a known version's set stands in
    (``source`` says which and why, in words an operator can act on).
    """

    known: frozenset[str]
    source: str
    exact: bool
    #: Set when asking ComfyUI failed (shown in /health and the log), naming the setting.
    warning: str = ""
    #: No version was known either: 0.3.64's set stands in for an unknown ComfyUI.
    guessed: bool = False

    def knows(self, flag: str) -> bool:
        return flag in self.known

    def unknown_in(self, command: list[str]) -> list[str]:
        """The flags in ``command`` this ComfyUI does not know (only when the set is exact)."""
        if not self.exact:
            return []
        found = []
        for arg in command:
            name = arg.partition("=")[0]
            if name.startswith("--") and name not in self.known and name not in found:
                found.append(name)
        return found

    @property
    def assets_era(self) -> bool:
        """Whether this ComfyUI has the assets database of the newest line (`--disable-assets`):
        it then locks its database, keeps it at ``<user directory>/comfyui.db`` by default and
        stops at start-up when it cannot open it."""
        return self.knows("--disable-assets")

    @property
    def public_note(self) -> str:
        """How the flags are known, without paths or commands (for /health)."""
        if self.exact:
            return "asked (--help)"
        if self.guessed:
            return (f"assumed: ComfyUI {BASELINE}'s, it could not be asked; set comfyui.version "
                    "(COMFYUI_VERSION_OVERRIDE)")
        version = self.source.split(" (", 1)[0].replace("the flags of ", "")
        if self.warning:
            return (f"{version}'s, from the checkout's comfyui_version.py (it could not be "
                    "asked); set comfyui.version if another version runs")
        return f"{version}'s, from comfyui.version"

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "exact": self.exact, "warning": self.warning,
                "guessed": self.guessed,
                "models_directory": self.knows("--models-directory"),
                "disable_assets": self.knows("--disable-assets")}


def main_scripts(argv: list[str] | tuple[str, ...]) -> list[str]:
    """The arguments of a command line that name ComfyUI's own entry point, main.py (none: a
    start script or another program runs it, and may take options of its own)."""
    return [arg for arg in argv if Path(arg).name == "main.py"]


def parse_help(text: str) -> frozenset[str]:
    """The flags an argparse ``--help`` (or usage error) lists; empty when it lists none of
    ComfyUI's essential ones (a start script's own help, or no help at all)."""
    found: set[str] = set()
    lines = text.splitlines()
    in_usage = False
    for line in lines:
        if line.lower().startswith("usage:"):
            in_usage = True
        elif in_usage and not line.strip():
            in_usage = False
        if in_usage:
            found.update(_USAGE_FLAG.findall(line))
            continue
        option = _OPTION_LINE.match(line)
        if option:
            found.update(part.split(" ")[0] for part in option.group(1).split(", ")
                         if part.startswith("-"))
    if not all(flag in found for flag in _ESSENTIAL):
        return frozenset()
    return frozenset(found)


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"0.3.64"`` (or ``"v0.38"``) as a tuple; None when it is not a version number."""
    match = _VERSION.match(text.strip())
    if not match:
        return None
    return tuple(int(part or 0) for part in match.groups())  # type: ignore[return-value]


def for_version(version: str, why: str) -> ComfyFlags:
    """The flags a known version line has: the newest read from 0.38.1 on, else 0.3.64's (a
    version in between may know more; it is never told a flag 0.3.64 did not have)."""
    parsed = parse_version(version)
    if parsed is not None and parsed >= parse_version(NEWEST_READ):  # type: ignore[operator]
        return ComfyFlags(FLAGS_NEWEST, f"the flags of ComfyUI {NEWEST_READ} ({why})", False)
    return ComfyFlags(FLAGS_0_3_64, f"the flags of ComfyUI {BASELINE} ({why})", False)


def assumed(reason: str) -> ComfyFlags:
    """0.3.64's flags, because this ComfyUI could not be asked; the warning names the setting."""
    warning = (f"could not ask ComfyUI which flags it accepts ({reason}); assuming ComfyUI "
               f"{BASELINE}'s, so --disable-assets and --models-directory are not passed: set "
               f"comfyui.version (COMFYUI_VERSION_OVERRIDE) to the version that runs")
    return ComfyFlags(FLAGS_0_3_64, f"assumed: ComfyUI {BASELINE}'s flags", False, warning, True)


def version_file(folders: list[Path | None]) -> tuple[str, Path] | None:
    """The version a ComfyUI checkout states in its ``comfyui_version.py`` (the first of
    ``folders`` that has one), with the file; None when none is readable. Blocking (file reads)."""
    for folder in folders:
        if folder is None:
            continue
        path = Path(folder) / "comfyui_version.py"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")[:4096]
        except OSError:
            continue
        found = _VERSION_FILE.search(text)
        if found and parse_version(found.group(1)) is not None:
            return found.group(1), path
    return None
