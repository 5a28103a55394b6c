"""Command line: ComfyUI's own flags, as the chosen version knows them, plus the simulator's knobs.

``--api-version`` (default ``SIM_API_VERSION``, else 0.3.64) picks the ComfyUI version whose
flags are accepted. A flag that version does not know ends the process with argparse's
``unrecognized arguments`` and exit status 2, as the real ComfyUI does; a flag it knows but the
simulator does not model is accepted and logged at debug level. The simulator's own knobs
(``--step-seconds``...) are accepted in every mode.

Like ComfyUI (both versions), the process installs no SIGTERM handler: SIGTERM ends it at once,
with no cleanup. Ctrl-C prints ``Stopped server`` and exits 0; the newest ComfyUI then also
removes its temp folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from simulator import api_version as versions
from simulator.api_version import ApiVersion
from simulator.assets import AssetCatalog, AssetRoot, remove_temp_folder
from simulator.comfy_flags import IGNORED_DEST, LOG_LEVELS_NEWEST, ComfyFlagOptions, add_comfyui_flags
from simulator.database import (
    LOCK_WAIT_SECONDS, DatabaseLock, DatabaseLocation, held_by_another, in_use_warning, locate_database,
    missing_packages_failure,
)
from simulator.errors import AssetsStartupFailed, KnobError, PortInUse, StartupFailed
from simulator.feature_flags import CLI_FEATURE_FLAGS, parse_cli_feature_flags
from simulator.knobs import DEFAULT_CHECKPOINT, DeviceType, Fault, Knobs, parse_name_list
from simulator.paths import Directories

if TYPE_CHECKING:
    from aiohttp import web

    from simulator.nodes import NodeEnv
    from simulator.server import ServerOptions

# aiohttp and the server are imported only after --crash-at-start had its chance, so a
# simulated start-up crash happens as early as a real import-time failure would.

logger = logging.getLogger("simulator")

# The newest ComfyUI's level between DEBUG and INFO.
DETAIL = 15
logging.addLevelName(DETAIL, "DETAIL")

# ComfyUI flags the simulator reads and acts on, per version.
_MODELED_0_3_64 = frozenset({
    "--listen", "--port", "--base-directory", "--output-directory", "--input-directory", "--temp-directory",
    "--user-directory", "--database-url", "--cpu", "--cuda-device", "--verbose", "--log-stdout",
    "--disable-metadata", "--cache-none", "--cache-classic", "--cache-lru", "--max-upload-size",
    "--enable-cors-header",
})
_MODELED_NEWEST = _MODELED_0_3_64 | {
    "--models-directory", "--disable-assets", "--enable-assets", "--enable-asset-hashing", "--offline",
    "--disable-api-nodes", "--cache-ram", "--list-feature-flags", "--feature-flag", "--date-based-output",
    "--date-output-format",
}


class VerboseAction(argparse.Action):
    """The newest ``--verbose``: no value (DEBUG), a console LEVEL, or LEVEL FILE; repeatable."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        values = list(values or [])
        if not values:
            output: tuple[str, str | None] = ("DEBUG", None)
        elif len(values) == 1 and values[0] in LOG_LEVELS_NEWEST:
            output = (values[0], None)
        elif len(values) == 2 and values[0] in LOG_LEVELS_NEWEST:
            output = (values[0], values[1])
        else:
            parser.error(f"{option_string} expects no values, a console LEVEL, or LEVEL FILE")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), output])


def _overrides(version: ApiVersion) -> dict[str, dict[str, Any]]:
    """Defaults and help of the modeled flags (argparse keyword arguments)."""
    common: dict[str, dict[str, Any]] = {
        "--listen": {"default": "127.0.0.1",
                     "help": "Address(es) to listen on, comma-separated (default 127.0.0.1; bare flag: all)."},
        "--port": {"default": 8188, "help": "Port to listen on (default 8188)."},
        "--base-directory": {"default": None, "help": "Folder holding input/, output/, temp/, user/ and models/ "
                                                      "(default: <tmp>/comfyui-sim-<port>)."},
        "--output-directory": {"help": "Output folder (overrides base)."},
        "--input-directory": {"help": "Input folder (overrides base)."},
        "--temp-directory": {"help": "Temp files go in a 'temp' folder inside this one (overrides base)."},
        "--user-directory": {"help": "User folder (overrides base); must exist, as ComfyUI checks."},
        "--cpu": {"help": "Report a CPU device (the default)."},
        "--log-stdout": {"help": "Log to stdout (errors still go to stderr) instead of stderr."},
        "--disable-metadata": {"help": "Do not embed the prompt in saved files."},
        "--cache-none": {"help": "Do not reuse node results between prompts."},
        "--cache-classic": {"help": "Default caching (accepted)."},
        "--cache-lru": {"default": 0, "help": "Accepted; behaves like the default cache."},
        "--max-upload-size": {"default": 100, "help": "Upload limit in MB (default 100)."},
        "--enable-cors-header": {"help": "Send CORS headers instead of refusing cross-origin requests."},
    }
    if not version.is_newer:
        return {**common,
                "--database-url": {"default": None, "metavar": "URL",
                                   "help": "ComfyUI's SQLite database (accepted; the simulator keeps none in 0.3.64 "
                                           "mode)."},
                "--cuda-device": {"help": "Sets CUDA_VISIBLE_DEVICES like ComfyUI."},
                "--verbose": {"default": "INFO", "help": "Log level."}}
    return {**common,
            "--database-url": {"default": None, "metavar": "URL",
                               "help": "The asset database, sqlite:///PATH (default <user directory>/comfyui.db)."},
            "--cuda-device": {"help": "An id, a comma list or 'all': sets CUDA_VISIBLE_DEVICES and friends."},
            "--verbose": {"action": VerboseAction, "default": [], "metavar": "LEVEL FILE",
                          "help": "No value (DEBUG), a console LEVEL, or LEVEL FILE for a log file; repeatable."},
            "--models-directory": {"help": "The models folder (must exist); checkpoints are looked up in "
                                            "DIR/checkpoints."},
            "--disable-assets": {"help": "No asset database, lock, ids or scans."},
            "--enable-assets": {"help": "Deprecated no-op: assets are on unless --disable-assets."},
            "--enable-asset-hashing": {"help": "Hash outputs and scanned files too (uploads are always hashed)."},
            "--offline": {"help": "Send a restrictive Content-Security-Policy header."},
            "--disable-api-nodes": {"help": "Deprecated alias of --offline."},
            "--cache-ram": {"default": [], "help": "RAM-pressure caching (the default; behaves like the classic "
                                                   "cache here)."},
            "--list-feature-flags": {"help": "Print the CLI-settable feature flags as JSON and exit."},
            "--feature-flag": {"default": [], "help": "An extra server feature flag (bare KEY means true)."},
            "--date-based-output": {"help": "Save outputs into a dated subfolder."},
            "--date-output-format": {"default": "%Y-%m-%d", "help": "strftime format of that subfolder."}}


def build_parser(api_version: ApiVersion | None = None, *, every_comfyui_flag: bool = False) -> argparse.ArgumentParser:
    """The parser for ``api_version`` (default: ``SIM_API_VERSION``, else 0.3.64).

    With ``every_comfyui_flag`` (what ``main`` uses) every flag that ComfyUI version knows is
    accepted and anything else is an error; without it only the modeled flags and the knobs
    are defined, so ``parse_known_args`` hands back the rest.
    """
    version = api_version or versions.default_api_version()
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description="ComfyUI simulator: ComfyUI's HTTP/WebSocket API with simulated nodes. "
                    f"Speaks ComfyUI {version.value}'s API and accepts its flags.")
    modeled = _MODELED_NEWEST if version.is_newer else _MODELED_0_3_64
    add_comfyui_flags(parser, version, ComfyFlagOptions(modeled=modeled, overrides=_overrides(version),
                                                        every_flag=every_comfyui_flag))

    sim = parser.add_argument_group("simulator knobs (runtime ones can be changed with POST /__sim__/knobs)")
    sim.add_argument("--api-version", choices=versions.CHOICES, default=version.value,
                     help=f"ComfyUI API to speak (default from ${versions.ENV_VAR}, else "
                          f"{versions.DEFAULT_API_VERSION.value}).")
    sim.add_argument("--strict-base-directory", action="store_true",
                     help="Fail at start, as ComfyUI 0.3.64 does, when --base-directory has no custom_nodes/ "
                          "folder (off by default so tests need not create it).")
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
    sim.add_argument("--post-prompt-delay", type=float, default=0.0, metavar="S",
                     help="Seconds POST /prompt waits after queueing the prompt, before answering.")
    sim.add_argument("--post-prompt-drop", action="store_true",
                     help="POST /prompt queues the prompt, then drops the connection instead of answering.")
    sim.add_argument("--image-bytes", type=int, default=0, metavar="N",
                     help="Pad each PNG that SaveImage and PreviewImage write to at least N bytes "
                          "(incompressible), so outputs fill a disk as real ones do.")
    sim.add_argument("--simulate-missing-packages", action="store_true",
                     help="Start as if sqlalchemy, alembic and blake3 could not be imported (0.38.1: "
                          "ASSETS_STARTUP_FAILED: missing_packages, exit 1, unless --disable-assets; 0.3.64: a "
                          "warning).")
    sim.add_argument("--assets-gc-seconds", type=float, default=10.0, metavar="S",
                     help="0.38.1: the tick after prompts that walks the output folder (default 10, as ComfyUI).")
    sim.add_argument("--db-lock-wait-seconds", type=float, default=LOCK_WAIT_SECONDS, metavar="S",
                     help=f"0.38.1: how long a second process waits for the database lock (default "
                          f"{LOCK_WAIT_SECONDS:g}, as ComfyUI).")
    return parser


@dataclass(frozen=True)
class LogSettings:
    console_level: str
    files: tuple[tuple[str, str], ...] = ()  # (level, path)
    use_stdout: bool = False


def log_settings(args: argparse.Namespace, version: ApiVersion) -> LogSettings:
    if not version.is_newer:
        return LogSettings(args.verbose, (), args.log_stdout)
    outputs = args.verbose or []
    console = [level for level, path in outputs if path is None]
    level = min(console, key=LOG_LEVELS_NEWEST.index, default="INFO")
    return LogSettings(level, tuple((lvl, path) for lvl, path in outputs if path is not None), args.log_stdout)


def configure_logging(level: str, use_stdout: bool, files: tuple[tuple[str, str], ...] = ()) -> None:
    """ComfyUI logs bare messages; to stderr, or with --log-stdout below-ERROR to stdout;
    the newest ``--verbose LEVEL FILE`` adds a log file."""
    root = logging.getLogger()
    levels = [logging.getLevelName(level)] + [logging.getLevelName(lvl) for lvl, _ in files]
    root.setLevel(min(levels))
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter("%(message)s")
    if use_stdout:
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(formatter)
        out.setLevel(level)
        out.addFilter(lambda record: record.levelno < logging.ERROR)
        root.addHandler(out)
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.ERROR)
        err.setFormatter(formatter)
        root.addHandler(err)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter)
        handler.setLevel(level)
        root.addHandler(handler)
    for file_level, path in files:
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(formatter)
        file_handler.setLevel(file_level)
        root.addHandler(file_handler)
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
        "post_prompt_delay": args.post_prompt_delay,
        "post_prompt_drop": args.post_prompt_drop,
        "image_bytes": args.image_bytes,
    }, log=False)
    return knobs


def _pick_version(argv: list[str]) -> ApiVersion:
    """``--api-version`` decides which flags the real parser knows, so it is read first."""
    pre = argparse.ArgumentParser(prog="python -m simulator", add_help=False)
    pre.add_argument("--api-version", choices=versions.CHOICES, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.api_version:
        return ApiVersion(known.api_version)
    try:
        return versions.default_api_version()
    except ValueError as ex:
        pre.error(str(ex))
        raise  # not reached: error() exits


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    version = _pick_version(argv)
    parser = build_parser(version, every_comfyui_flag=True)
    args = parser.parse_args(argv)
    if version.is_newer:
        if len(args.cache_ram) > 2:
            parser.error("--cache-ram accepts at most two values: active GB and inactive GB")
        if args.list_feature_flags:
            # Before anything else, as ComfyUI answers it before its heavy imports.
            print(json.dumps(CLI_FEATURE_FLAGS, indent=2))
            return 0
    settings = log_settings(args, version)
    configure_logging(settings.console_level, settings.use_stdout, settings.files)

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
    _apply_cuda_device(args.cuda_device, version)

    base = args.base_directory or os.path.join(tempfile.gettempdir(), f"comfyui-sim-{args.port}")
    custom_nodes = os.path.join(os.path.abspath(base), "custom_nodes")
    if args.strict_base_directory and args.base_directory and not os.path.isdir(custom_nodes):
        # ComfyUI lists custom_nodes/ before it binds and dies of the FileNotFoundError.
        logger.error("FileNotFoundError: [Errno 2] No such file or directory: %r", custom_nodes)
        return 1
    dirs = Directories.from_options(base, args.output_directory, args.input_directory, args.temp_directory,
                                    args.user_directory, getattr(args, "models_directory", None))
    dirs.prepare()
    _log_startup(args, version, knobs, dirs)

    if knobs.startup_delay > 0:
        # Start-up happens before any event loop exists, so a plain sleep blocks nothing.
        time.sleep(knobs.startup_delay)

    from simulator.nodes import NodeEnv
    from simulator.server import ServerOptions

    try:
        database = _open_assets(args, version, dirs)
    except StartupFailed as ex:
        logger.error("%s", ex)
        return ex.exit_code

    newer = version.is_newer
    env = NodeEnv(dirs, knobs, disable_metadata=args.disable_metadata, api_version=version,
                  date_output_format=args.date_output_format if newer and args.date_based_output else None)
    options = ServerOptions(max_upload_size_mb=args.max_upload_size, enable_cors_header=args.enable_cors_header,
                            cache_enabled=not args.cache_none, api_version=version,
                            offline=newer and (args.offline or args.disable_api_nodes),
                            cli_feature_flags=parse_cli_feature_flags(args.feature_flag) if newer else None,
                            assets_gc_seconds=args.assets_gc_seconds)
    try:
        asyncio.run(_serve(env, options, args.listen, args.port, database))
    except KeyboardInterrupt:
        logger.info("\nStopped server")
    except PortInUse as ex:
        logger.error("%s", ex)
        return ex.exit_code
    finally:
        if newer:
            _shutdown_assets(database, dirs)
    return 0


@dataclass
class OpenDatabase:
    """The newest mode's asset database at start-up: the catalog (None: assets off) and its lock."""

    catalog: AssetCatalog | None
    lock: DatabaseLock | None
    location: DatabaseLocation | None
    warning: str | None = None  # logged once the server runs (the --disable-assets case)


def _open_assets(args: argparse.Namespace, version: ApiVersion, dirs: Directories) -> OpenDatabase | None:
    """0.3.64 keeps no database; the newest opens (and locks) it unless --disable-assets.

    Raises ``StartupFailed`` (``ASSETS_STARTUP_FAILED: ...``) as the newest ComfyUI stops.
    """
    if not version.is_newer:
        if args.simulate_missing_packages:
            logger.warning("Error importing dependencies: No module named 'sqlalchemy'\n"
                           "Install the packages ComfyUI's requirements.txt lists. ComfyUI now keeps a local "
                           "sqlite database; it starts without it.")
        return None
    if args.enable_assets:
        logger.warning("--enable-assets is deprecated and does nothing: the assets system is on unless "
                       "ComfyUI is started with --disable-assets.")
    if args.disable_api_nodes:
        logger.warning("--disable-api-nodes is deprecated; it behaves like --offline.")
    if args.disable_assets:
        try:
            location = locate_database(args.database_url, dirs.user)
        except StartupFailed:
            return OpenDatabase(None, None, None)
        warning = in_use_warning(location) if held_by_another(location) else None
        return OpenDatabase(None, None, location, warning)
    if args.simulate_missing_packages:
        raise missing_packages_failure()
    location = locate_database(args.database_url, dirs.user)
    lock = DatabaseLock(location)
    lock.acquire(args.db_lock_wait_seconds)
    catalog = AssetCatalog(location.path, dirs, hash_outputs=args.enable_asset_hashing)
    try:
        catalog.open()
    except Exception as ex:
        lock.release()
        raise AssetsStartupFailed("other", f"Could not open or upgrade the asset database '{location.path}': {ex}\n"
                                           "Or start ComfyUI without the assets system: --disable-assets") from ex
    logger.info("Asset database: %s", location.path or location.url)
    return OpenDatabase(catalog, lock, location)


def _shutdown_assets(database: OpenDatabase | None, dirs: Directories) -> None:
    """The newest ComfyUI's shutdown: temp rows and the temp folder go (SIGINT or a normal end;
    SIGTERM kills the process before any of this)."""
    if database is not None and database.catalog is not None:
        database.catalog.close()
    remove_temp_folder(dirs)
    if database is not None and database.lock is not None:
        database.lock.release()


def _apply_cuda_device(cuda_device: Any, version: ApiVersion) -> None:
    if cuda_device is None:
        return
    if version.is_newer and cuda_device == "all":
        logger.info("Set cuda devices to all")
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = str(cuda_device)
    if version.is_newer:
        os.environ["HIP_VISIBLE_DEVICES"] = str(cuda_device)
        os.environ["ASCEND_RT_VISIBLE_DEVICES"] = str(cuda_device)
    logger.info("Set cuda device to: %s", cuda_device)


def _log_startup(args: argparse.Namespace, version: ApiVersion, knobs: Knobs, dirs: Directories) -> None:
    if version.is_newer and args.base_directory:
        logger.info("Setting base directory to: %s", dirs.base)
    if version.is_newer and dirs.models_given:
        logger.info("Setting models directory to: %s", os.path.dirname(dirs.checkpoints))
    if args.output_directory:
        logger.info("Setting output directory to: %s", dirs.output)
    if args.input_directory:
        logger.info("Setting input directory to: %s", dirs.input)
    if version.is_newer and args.user_directory:
        logger.info("Setting user directory to: %s", dirs.user)
    if args.temp_directory:
        logger.info("Setting temp directory to: %s", dirs.temp)
    logger.info("Checkpoint files will always be loaded safely.")
    ram_mb = _ram_total_mb()
    vram_mb = ram_mb if knobs.device_type is DeviceType.CPU else knobs.vram_total_mb
    logger.info("Total VRAM %d MB, total RAM %d MB", vram_mb, ram_mb)
    logger.info("pytorch version: 2.8.0+sim")
    logger.info("Device: %s", knobs.resolved_device_name())
    logger.info("Python version: %s", sys.version)
    logger.info("ComfyUI version: %s", version.label)
    logger.info("ComfyUI simulator: simulated nodes, no models, no GPU; base directory %s", dirs.base)
    ignored = getattr(args, IGNORED_DEST, None) or []
    if ignored:
        logger.debug("Ignoring ComfyUI options the simulator does not model: %s", " ".join(ignored))
    logger.info("Checkpoints: %s", ", ".join(knobs.checkpoints) or "(none)")


def _ram_total_mb() -> int:
    import psutil
    return psutil.virtual_memory().total // (1024 * 1024)


async def _serve(env: NodeEnv, options: ServerOptions, listen: str, port: int,
                 database: OpenDatabase | None) -> None:
    from aiohttp import web

    from simulator.server import SimulatorServer, is_address_in_use

    catalog = database.catalog if database is not None else None
    server = SimulatorServer(env, options, catalog)
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    tasks = [asyncio.create_task(server.publish_loop()), asyncio.create_task(server.prompt_worker())]
    if catalog is not None:
        tasks.append(asyncio.create_task(server.assets_loop()))
    logger.info("Starting server\n")
    try:
        for address in [a for a in listen.split(",") if a]:
            site = web.TCPSite(runner, address, port)
            try:
                await site.start()
            except OSError as ex:
                if options.api_version.is_newer and is_address_in_use(ex):
                    raise PortInUse(f"Port {port} is already in use on address {address}. Please close the other "
                                    "application or use a different port with --port.") from ex
                raise
            bound = port or _bound_port(site) or port
            shown = f"[{address}]" if ":" in address else address
            logger.info("To see the GUI go to: http://%s:%s", shown, bound)
        if database is not None and database.warning:
            logger.warning("%s", database.warning)
        # At start the newest ComfyUI scans the models and input folders in the background.
        server.start_scan((AssetRoot.MODELS, AssetRoot.INPUT))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()


def _bound_port(site: web.TCPSite) -> int | None:
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    return sockets[0].getsockname()[1] if sockets else None
