"""Command line: ComfyUI's own flags (the ones that matter here) plus the simulator's knobs.

Unknown flags are accepted and ignored, so an operator's real ComfyUI command line
(``main.py --cpu --disable-auto-launch --preview-method auto ...``) starts the simulator too.
Like ComfyUI, the process installs no SIGTERM handler: SIGTERM ends it at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from simulator import COMFYUI_VERSION
from simulator.errors import KnobError
from simulator.knobs import (
    DEFAULT_CHECKPOINT,
    DeviceType,
    Fault,
    Knobs,
    parse_name_list,
)
from simulator.paths import Directories

if TYPE_CHECKING:
    from aiohttp import web

    from simulator.nodes import NodeEnv
    from simulator.server import ServerOptions

# aiohttp and the server are imported only after --crash-at-start had its chance, so a
# simulated start-up crash happens as early as a real import-time failure would.

logger = logging.getLogger("simulator")

_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]



def _existing_directory(path: str) -> str:
    """ComfyUI 0.3.64 refuses a --user-directory that is not an existing directory (exit 2)."""
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"The path '{path}' does not exist.")
    return path

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description="ComfyUI simulator: ComfyUI's HTTP/WebSocket API with simulated nodes. "
                    "Unknown ComfyUI flags are ignored.")
    comfy = parser.add_argument_group("ComfyUI options")
    comfy.add_argument("--listen", type=str, default="127.0.0.1", metavar="IP", nargs="?", const="0.0.0.0,::",
                       help="Address(es) to listen on, comma-separated (default 127.0.0.1; bare flag: all).")
    comfy.add_argument("--port", type=int, default=8188, help="Port to listen on (default 8188).")
    comfy.add_argument("--base-directory", type=str, default=None,
                       help="Folder holding input/, output/, temp/, user/ and models/ "
                            "(default: <tmp>/comfyui-sim-<port>).")
    comfy.add_argument("--output-directory", type=str, default=None, help="Output folder (overrides base).")
    comfy.add_argument("--input-directory", type=str, default=None, help="Input folder (overrides base).")
    comfy.add_argument("--temp-directory", type=str, default=None,
                       help="Temp files go in a 'temp' folder inside this one (overrides base).")
    comfy.add_argument("--user-directory", type=_existing_directory, default=None,
                       help="User folder (overrides base); must exist, as ComfyUI checks.")
    comfy.add_argument("--database-url", type=str, default=None, metavar="URL",
                       help="ComfyUI's SQLite database (accepted; the simulator keeps none).")
    comfy.add_argument("--strict-base-directory", action="store_true",
                       help="Fail at start, as ComfyUI 0.3.64 does, when --base-directory has no custom_nodes/ "
                            "folder (off by default so tests need not create it).")
    comfy.add_argument("--cpu", action="store_true", help="Report a CPU device (the default).")
    comfy.add_argument("--cuda-device", type=int, default=None, metavar="DEVICE_ID",
                       help="Accepted for compatibility; sets CUDA_VISIBLE_DEVICES like ComfyUI.")
    comfy.add_argument("--verbose", default="INFO", const="DEBUG", nargs="?", choices=_LOG_LEVELS,
                       help="Log level.")
    comfy.add_argument("--log-stdout", action="store_true",
                       help="Log to stdout (errors still go to stderr) instead of stderr.")
    comfy.add_argument("--disable-metadata", action="store_true",
                       help="Do not embed the prompt in saved files.")
    comfy.add_argument("--cache-none", action="store_true",
                       help="Do not reuse node results between prompts.")
    comfy.add_argument("--cache-classic", action="store_true", help="Default caching (accepted).")
    comfy.add_argument("--cache-lru", type=int, default=0, help="Accepted; behaves like the default cache.")
    comfy.add_argument("--max-upload-size", type=float, default=100, help="Upload limit in MB (default 100).")
    comfy.add_argument("--enable-cors-header", type=str, default=None, metavar="ORIGIN", nargs="?", const="*",
                       help="Send CORS headers instead of refusing cross-origin requests.")

    sim = parser.add_argument_group("simulator knobs (runtime ones can be changed with POST /__sim__/knobs)")
    sim.add_argument("--startup-delay", type=float, default=0.0, metavar="S",
                     help="Seconds to wait before binding the port (ComfyUI takes 7-15 s).")
    sim.add_argument("--step-seconds", type=float, default=0.05, metavar="S",
                     help="Seconds per sampler step (default 0.05).")
    sim.add_argument("--slow-factor", type=float, default=1.0, metavar="F",
                     help="Multiplies sampler step and model load times (default 1).")
    sim.add_argument("--load-seconds", type=float, default=0.0, metavar="S",
                     help="Seconds a checkpoint loader takes when it is not cached (default 0).")
    sim.add_argument("--crash-at-start", type=str, default=None, metavar="CODE|SIGNAME",
                     help="Exit with CODE, or kill itself with SIGNAME, before binding.")
    sim.add_argument("--crash-during-prompt", type=str, default=None, metavar="CODE|SIGNAME",
                     help="Exit or kill itself halfway through the next prompt.")
    sim.add_argument("--hang-during-prompt", type=str, default=None, nargs="?", const="block",
                     metavar="block|sigstop",
                     help="Stop answering HTTP and WebSocket halfway through the next prompt.")
    sim.add_argument("--fail-node", action="append", default=[], metavar="CLASS[,CLASS]",
                     help="Nodes of this class raise at run time (execution_error). Repeatable.")
    sim.add_argument("--checkpoints", type=str, default=DEFAULT_CHECKPOINT, metavar="A,B",
                     help=f"Checkpoint names CheckpointLoaderSimple offers (default {DEFAULT_CHECKPOINT}); "
                          "'' for none.")
    sim.add_argument("--device-type", type=str, default=None, choices=[d.value for d in DeviceType],
                     help="Device type /system_stats reports (default cpu).")
    sim.add_argument("--device-name", type=str, default=None, help="Device name /system_stats reports.")
    sim.add_argument("--vram-total-mb", type=int, default=24576, help="VRAM a cuda device reports (MiB).")
    return parser


def configure_logging(level: str, use_stdout: bool) -> None:
    """ComfyUI logs bare messages; to stderr, or with --log-stdout below-ERROR to stdout."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter("%(message)s")
    if use_stdout:
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(formatter)
        out.addFilter(lambda record: record.levelno < logging.ERROR)
        root.addHandler(out)
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.ERROR)
        err.setFormatter(formatter)
        root.addHandler(err)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    # aiohttp's own access log is off in ComfyUI; keep its error reports.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def knobs_from_args(args: argparse.Namespace) -> Knobs:
    device = args.device_type or DeviceType.CPU.value
    knobs = Knobs(startup_delay=max(0.0, args.startup_delay))
    knobs.update({
        "step_seconds": args.step_seconds,
        "slow_factor": args.slow_factor,
        "load_seconds": args.load_seconds,
        "crash_during_prompt": args.crash_during_prompt,
        "hang_during_prompt": args.hang_during_prompt,
        "fail_node": [name for item in args.fail_node for name in parse_name_list("fail_node", item)],
        "checkpoints": parse_name_list("checkpoints", args.checkpoints),
        "device_type": device,
        "device_name": args.device_name,
        "vram_total_mb": args.vram_total_mb,
    }, log=False)
    return knobs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    configure_logging(args.verbose, args.log_stdout)

    if args.crash_at_start:
        try:
            fault = Fault.parse(args.crash_at_start, "crash_at_start")
        except KnobError as ex:
            parser.error(str(ex))
        logger.error("Simulated crash at start: %s", fault.describe())
        fault.trigger()

    try:
        knobs = knobs_from_args(args)
    except KnobError as ex:
        parser.error(str(ex))
    if args.cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.cuda_device)
        logger.info("Set cuda device to: %s", args.cuda_device)

    base = args.base_directory or os.path.join(tempfile.gettempdir(), f"comfyui-sim-{args.port}")
    custom_nodes = os.path.join(os.path.abspath(base), "custom_nodes")
    if args.strict_base_directory and args.base_directory and not os.path.isdir(custom_nodes):
        # ComfyUI lists custom_nodes/ before it binds and dies of the FileNotFoundError.
        logger.error("FileNotFoundError: [Errno 2] No such file or directory: %r", custom_nodes)
        return 1
    dirs = Directories.from_options(base, args.output_directory, args.input_directory, args.temp_directory,
                                    args.user_directory)
    dirs.prepare()
    _log_startup(args, unknown, knobs, dirs)

    if knobs.startup_delay > 0:
        # Start-up happens before any event loop exists, so a plain sleep blocks nothing.
        time.sleep(knobs.startup_delay)

    from simulator.nodes import NodeEnv
    from simulator.server import ServerOptions

    env = NodeEnv(dirs, knobs, disable_metadata=args.disable_metadata)
    options = ServerOptions(max_upload_size_mb=args.max_upload_size, enable_cors_header=args.enable_cors_header,
                            cache_enabled=not args.cache_none)
    try:
        asyncio.run(_serve(env, options, args.listen, args.port))
    except KeyboardInterrupt:
        logger.info("\nStopped server")
    return 0


def _log_startup(args: argparse.Namespace, unknown: list[str], knobs: Knobs, dirs: Directories) -> None:
    if args.output_directory:
        logger.info("Setting output directory to: %s", dirs.output)
    if args.input_directory:
        logger.info("Setting input directory to: %s", dirs.input)
    if args.temp_directory:
        logger.info("Setting temp directory to: %s", dirs.temp)
    logger.info("Checkpoint files will always be loaded safely.")
    ram_mb = _ram_total_mb()
    vram_mb = ram_mb if knobs.device_type is DeviceType.CPU else knobs.vram_total_mb
    logger.info("Total VRAM %d MB, total RAM %d MB", vram_mb, ram_mb)
    logger.info("pytorch version: 2.8.0+sim")
    logger.info("Device: %s", knobs.resolved_device_name())
    logger.info("Python version: %s", sys.version)
    logger.info("ComfyUI version: %s", COMFYUI_VERSION)
    logger.info("ComfyUI simulator: simulated nodes, no models, no GPU; base directory %s", dirs.base)
    if unknown:
        logger.info("Ignoring options the simulator does not model: %s", " ".join(unknown))
    logger.info("Checkpoints: %s", ", ".join(knobs.checkpoints) or "(none)")


def _ram_total_mb() -> int:
    import psutil
    return psutil.virtual_memory().total // (1024 * 1024)


async def _serve(env: NodeEnv, options: ServerOptions, listen: str, port: int) -> None:
    from aiohttp import web

    from simulator.server import SimulatorServer

    server = SimulatorServer(env, options)
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    publisher = asyncio.create_task(server.publish_loop())
    worker = asyncio.create_task(server.prompt_worker())
    logger.info("Starting server\n")
    for address in [a for a in listen.split(",") if a]:
        site = web.TCPSite(runner, address, port)
        await site.start()
        bound = port or _bound_port(site) or port
        shown = f"[{address}]" if ":" in address else address
        logger.info("To see the GUI go to: http://%s:%s", shown, bound)
    try:
        await asyncio.gather(publisher, worker)
    finally:
        await runner.cleanup()


def _bound_port(site: web.TCPSite) -> int | None:
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    return sockets[0].getsockname()[1] if sockets else None
