"""The `comfy-worker` command: the root group and the table of its commands.

Each command lives in its own module and is imported only when it runs, so `comfy-worker
health` (run by monitors every few seconds) loads neither the daemon, the wrapper nor the
benchmark. How commands end and read their settings is app.py's.
"""

from __future__ import annotations

import importlib

import click

from supervisor.commands.app import AppGroup, exit_codes_help

#: name -> "module:attribute" of the click command.
COMMANDS = {
    "run": "supervisor.commands.run_cli:run",
    "demo": "supervisor.commands.run_cli:demo",
    "api": "supervisor.commands.api_cli:api",
    "config": "supervisor.commands.config_cli:config",
    "health": "supervisor.commands.health_cli:health",
    "gpu": "supervisor.commands.gpu_check:gpu",
    "benchmark": "supervisor.commands.bench_cli:benchmark",
    "models": "supervisor.commands.models_cli:models",
    "client": "supervisor.commands.client_cli:client",
    "restart-comfyui": "supervisor.commands.admin_cli:restart_comfyui",
    "drain": "supervisor.commands.admin_cli:drain",
    "resume": "supervisor.commands.admin_cli:resume",
}


class Root(AppGroup):
    """The root group: commands from `COMMANDS`, and `--config FILE` anywhere on the line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        # Lazy on purpose: only the module of the command being run is imported (see above).
        found = getattr(importlib.import_module(module), attribute)
        assert isinstance(found, click.Command), COMMANDS[name]
        return found

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Takes `--config FILE` after any subcommand too (`comfy-worker run --config FILE`):
        people type it both ways. It is moved in front of the subcommand before click parses."""
        moved: list[str] = []
        rest: list[str] = []
        index = 0
        while index < len(args):
            arg = args[index]
            if arg == "--":
                rest.extend(args[index:])
                break
            if arg == "--config" and index + 1 < len(args):
                moved += [arg, args[index + 1]]
                index += 2
                continue
            if arg.startswith("--config="):
                moved.append(arg)
            else:
                rest.append(arg)
            index += 1
        return super().parse_args(ctx, moved + rest)


@click.group(cls=Root, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=exit_codes_help())
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML settings file (default: /etc/comfy-worker/worker.toml when it exists).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """comfy-worker: a supervised ComfyUI worker for autoscaled GPU fleets.

    --config FILE may also come after the subcommand (`comfy-worker run --config FILE`).
    """
    ctx.obj = {"config_path": config_path}


if __name__ == "__main__":  # pragma: no cover
    main()
