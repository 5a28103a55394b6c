"""What every `comfy-worker` command shares: how it ends, and how it reads the settings.

The policy, in one place. A command's callback either returns how it ended (an `Outcome`; for
the commands that judge the worker, a `Verdict`) or raises a `CommandError` naming what went
wrong. Each of those has one exit code, declared here and nowhere else; click's top-level main
turns it into the process's exit status, so no command calls `sys.exit`. An error is printed as
``comfy-worker: <message>`` on stderr, without a traceback; a wrong option keeps click's usage
message. The codes are listed in `EXIT_CODES`, from which `comfy-worker --help` and the "Exit
codes" table of the docs are both written.

health, gpu and benchmark (`VerdictCommand`) exit with their verdict, and with 3 (unknown) for
anything that kept them from reaching one, so that a monitor reading 1 or 2 knows the worker was
judged, never that a setting was wrong.
"""

from __future__ import annotations

import enum
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import click

from config import Settings, SettingsError, load_settings

PREFIX = "comfy-worker: "


class Outcome(enum.IntEnum):
    """How a command that acts ended; the value is its exit code."""

    OK = 0
    FAILED = 1          # the request, the action or a file did not succeed, or a part is missing
    BAD_SETTINGS = 2    # a setting, an option or a file is wrong
    NO_DAEMON = 3       # the daemon's admin socket did not answer
    RESTART_REQUESTED = 75  # run: the autoscaler asked for an update (EX_TEMPFAIL, not 0, so
    #                         that systemd's Restart=on-failure starts the worker again)


class Verdict(enum.IntEnum):
    """What health, gpu and benchmark judged; the value is the exit code (Nagios style)."""

    HEALTHY = 0
    DEGRADED = 1
    UNHEALTHY = 2
    UNKNOWN = 3


# --- what can go wrong ---------------------------------------------------------------------------
class CommandError(click.ClickException):
    """Something a command could not do, in an operator's words (one line per problem)."""

    exit_code = int(Outcome.FAILED)

    def __init__(self, *problems: str):
        self.problems: tuple[str, ...] = problems or ("failed",)
        super().__init__("\n".join(self.problems))

    def show(self, file: Any = None) -> None:
        for problem in self.problems:
            click.echo(PREFIX + problem, file=file, err=file is None)


class Failed(CommandError):
    """The request or the action did not succeed, or something it needs is not there."""

    exit_code = int(Outcome.FAILED)


class BadSettings(CommandError):
    """A setting (file or environment), an option or an input file is wrong; the message
    names it."""

    exit_code = int(Outcome.BAD_SETTINGS)


class DaemonUnreachable(CommandError):
    """The daemon did not answer on its admin socket; the message says why (not running, ...)."""

    exit_code = int(Outcome.NO_DAEMON)


class NoVerdict(CommandError):
    """A judging command could not reach a verdict: the daemon, a setting, ... (the message)."""

    exit_code = int(Verdict.UNKNOWN)


class _NoVerdictUsage(click.UsageError):
    """A wrong option given to a judging command: click's usage message, exit 3."""

    exit_code = int(Verdict.UNKNOWN)


# --- the command classes -------------------------------------------------------------------------
class AppCommand(click.Command):
    """A comfy-worker command: what its callback returns (an Outcome, a Verdict, a child's exit
    status) becomes the exit status; None means 0."""

    def invoke(self, ctx: click.Context) -> Any:
        ended = super().invoke(ctx)
        if ended is not None:
            ctx.exit(int(ended))
        return None


class VerdictCommand(AppCommand):
    """A command whose exit status is a `Verdict`: whatever keeps it from judging exits 3."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _NoVerdictUsage(exc.format_message(), exc.ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CommandError as exc:
            if isinstance(exc, NoVerdict):
                raise
            raise NoVerdict(*exc.problems) from None
        except click.UsageError as exc:
            if isinstance(exc, _NoVerdictUsage):
                raise
            raise _NoVerdictUsage(exc.format_message(), exc.ctx) from None


class AppGroup(click.Group):
    """A group of comfy-worker commands; its commands and subgroups follow the same policy."""

    command_class = AppCommand
    group_class = type  # subgroups are of the group's own class


def command(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], AppCommand]:
    return click.command(name, cls=AppCommand, **kwargs)


def verdict_command(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], VerdictCommand]:
    return click.command(name, cls=VerdictCommand, **kwargs)


def group(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], AppGroup]:
    return click.group(name, cls=AppGroup, **kwargs)


# --- the settings --------------------------------------------------------------------------------
def config_path(ctx: click.Context) -> str | None:
    """The root group's --config (see cli.py); None when a command runs on its own."""
    obj = ctx.find_root().obj
    return obj.get("config_path") if isinstance(obj, dict) else None


def settings(ctx: click.Context) -> Settings:
    """The settings every command runs with: --config FILE (or the default file), then the
    environment. A wrong value is `BadSettings` naming the key and where it came from."""
    try:
        return load_settings(config_path(ctx))
    except SettingsError as exc:
        raise BadSettings(str(exc)) from None


# --- the table, for --help and the docs ----------------------------------------------------------
@dataclass(frozen=True)
class Meaning:
    code: int
    acting: str     # run, demo, api, config, client, models, restart-comfyui, drain, resume
    judging: str = ""   # health, gpu, benchmark; "" for a code they never exit with


JUDGING = ("health", "gpu", "benchmark")

EXIT_CODES: Sequence[Meaning] = (
    Meaning(0, "done", "healthy (gpu: ok, benchmark: pass)"),
    Meaning(1, "failed: the request, the action or a file did not succeed, or something it "
               "needs is not there; the message says which",
            "degraded: serving, with a warning (benchmark: slow)"),
    Meaning(2, "a setting, an option or an input file is wrong; the message names it",
            "unhealthy: takes no work (benchmark: error)"),
    Meaning(3, "the daemon is not reachable on its admin socket (not running, a stale socket, "
               "no answer, permission denied)",
            "unknown: no verdict, because the daemon is not reachable or a setting or an "
            "option is wrong (health still prints what the host shows)"),
    Meaning(75, "run only: restart requested: the autoscaler asked for an update (POST "
                "/pyworker/update); the service manager starts the worker again"),
)


def exit_codes_help() -> str:
    """The epilog of `comfy-worker --help` (\\b keeps click from re-wrapping it)."""
    def rows(column: Callable[[Meaning], str]) -> list[str]:
        return [textwrap.fill(column(row), 76, initial_indent=f"  {row.code:<2}  ",
                              subsequent_indent="      ") for row in EXIT_CODES if column(row)]

    return "\n".join(["\b", "Exit codes (errors go to stderr as \"comfy-worker: <message>\"):",
                      *rows(lambda row: row.acting), "",
                      "\b", f"{', '.join(JUDGING)} exit with their verdict instead:",
                      *rows(lambda row: row.judging)])


def exit_codes_markdown() -> str:
    """The "Exit codes" table of the docs (a test checks that they hold this text)."""
    lines = [f"| Code | Commands that act | Commands that judge ({', '.join(JUDGING)}) |",
             "|---|---|---|"]
    lines += [f"| {row.code} | {row.acting} | {row.judging or '—'} |" for row in EXIT_CODES]
    return "\n".join(lines) + "\n"
