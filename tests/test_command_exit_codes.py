"""The commands' one policy for errors and exit codes (supervisor/commands/app.py).

Each kind of failure gives its documented code and one `comfy-worker: <message>` on stderr
naming what is wrong, without a traceback; the commands that judge (health, gpu, benchmark)
exit 3 whenever they could not judge. The daemon side is a real admin socket server
(`AdminServer`, as the daemon runs it) with actions that answer as the daemon's do.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import socket
import sys
import threading
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from supervisor.commands import app
from supervisor.commands.cli import COMMANDS, main
from supervisor.reporting.admin import AdminServer
from tests.support import procs
from tests.support.procs import ROOT, base_env
from tests.support.systemd_unit import parse_unit

BAD_PORT = {"WORKER_PORT": "70000"}


@pytest.fixture
def invoke(tmp_path):
    """Run `comfy-worker ARGS` in-process with no settings file and a clean environment."""
    empty = tmp_path / "worker.toml"
    empty.write_text("")

    def run(*args: str, env: dict[str, str] | None = None):
        clean = {k: None for k in os.environ
                 if k.startswith(("WORKER_", "GPU_", "COMFY", "MODELS_", "BENCHMARK_"))}
        clean.update({"COMFY_WORKER_CONFIG": str(empty), "XDG_RUNTIME_DIR": str(tmp_path)})
        clean.update(env or {})
        return CliRunner().invoke(main, list(args), env=clean)

    return run


def assert_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert result.stderr.startswith("comfy-worker: "), result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


# --- a wrong setting -----------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["config", "show"], ["models", "list"], ["run"], ["api"],
                                  ["drain"], ["resume"], ["restart-comfyui"]],
                         ids=lambda args: " ".join(args))
def test_a_wrong_setting_in_the_environment_is_2_naming_the_key(invoke, args):
    assert_error(invoke(*args, env=BAD_PORT), 2, "worker.port", "WORKER_PORT",
                 "from 1 to 65535")


@pytest.mark.parametrize("args", [["health"], ["gpu", "--seconds", "0.2"], ["benchmark"]],
                         ids=lambda args: args[0])
def test_a_wrong_setting_gives_a_judging_command_no_verdict_3(invoke, args):
    assert_error(invoke(*args, env=BAD_PORT), 3, "worker.port", "WORKER_PORT")


def test_a_wrong_setting_file_is_2_naming_file_key_and_line(invoke, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[gpu]\nrequired = "yes"\n')
    assert_error(invoke("config", "check", str(bad)), 2, str(bad), "gpu.required", "line 2")
    # The same file as --config, after the subcommand: the same message for any command.
    assert_error(invoke("config", "show", "--config", str(bad)), 2, "gpu.required")
    assert_error(invoke("health", "--config", str(bad)), 3, "gpu.required")


@pytest.mark.real_processes
def test_the_demo_with_a_wrong_setting_is_2_and_starts_nothing(tmp_path):
    env = base_env(WORKER_PORT="70000", XDG_RUNTIME_DIR=str(tmp_path))
    done = procs.run([sys.executable, "-m", "supervisor.commands.cli", "demo", "--state",
                      str(tmp_path / "demo")], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("comfy-worker: ") and "WORKER_PORT" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "demo" / "logs").exists()


# --- a wrong option ------------------------------------------------------------------------------
def test_a_wrong_option_is_2_with_clicks_usage(invoke):
    result = invoke("drain", "--instance", "-1")
    assert result.exit_code == 2 and "Usage: " in result.stderr and "--instance" in result.stderr
    result = invoke("client", "generate", "--modifier", "Text2Image")
    assert result.exit_code == 2 and "give either --url" in result.stderr


@pytest.mark.parametrize("args", [["health", "--timeout", "0"], ["gpu", "--seconds", "soon"],
                                  ["benchmark", "--no-such-option"]], ids=lambda args: args[0])
def test_a_wrong_option_gives_a_judging_command_no_verdict_3(invoke, args):
    result = invoke(*args)
    assert result.exit_code == 3, result.output
    assert "Usage: " in result.stderr and args[1] in result.stderr


# --- the daemon is not there ---------------------------------------------------------------------
@pytest.mark.parametrize("command", ["drain", "resume", "restart-comfyui", "benchmark"])
def test_no_daemon_is_3_saying_it_is_not_running(invoke, tmp_path, command):
    path = tmp_path / "admin.sock"
    result = invoke(command, "--socket", str(path))
    assert_error(result, 3, f"the daemon is not running (no admin socket at {path})")
    if command == "benchmark":
        assert "use --comfyui-url" in result.stderr


def test_a_stale_socket_is_3_saying_so(invoke, tmp_path):
    path = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX) as listener:  # bound, never listening: a killed daemon
        listener.bind(str(path))
    assert_error(invoke("drain", "--socket", str(path)), 3,
                 "refuses connections: a stale socket")


# --- the daemon answers --------------------------------------------------------------------------
class AdminSocket:
    """The daemon's real admin server in a thread, with actions that answer as given."""

    def __init__(self, path: Path, answers: dict[str, dict]):
        self.path = path
        self.asked: list[tuple[str, dict]] = []
        self.loop = asyncio.new_event_loop()
        self.server = AdminServer(path, snapshot=lambda: {"worker": {"reason": "test"}},
                                  actions={name: self._action(name, answer)
                                           for name, answer in answers.items()})
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _action(self, name: str, answer: dict):
        async def act(params: dict) -> dict:
            self.asked.append((name, params))
            return answer
        return act

    def __enter__(self) -> "AdminSocket":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_a_done_action_is_0_and_a_refused_one_is_1_with_the_daemons_words(invoke, tmp_path):
    answers = {"drain": {"ok": True, "message": "draining instance 0"},
               "resume": {"ok": False, "message": "this host runs instances 0 to 3"},
               "benchmark": {"ok": False, "message": "a benchmark is already running"}}
    with AdminSocket(tmp_path / "admin.sock", answers) as daemon:
        sock = str(daemon.path)
        done = invoke("drain", "--instance", "0", "--socket", sock)
        assert done.exit_code == 0 and done.stdout == "draining instance 0\n" and not done.stderr
        refused = invoke("resume", "--instance", "9", "--socket", sock)
        assert_error(refused, 1, "this host runs instances 0 to 3")
        assert refused.stdout == ""
        # A benchmark the daemon refuses gives no verdict: 3, not 1 (which would read "slow").
        assert_error(invoke("benchmark", "--socket", sock), 3, "a benchmark is already running")
        assert daemon.asked == [("drain", {"instance": "0"}), ("resume", {"instance": "9"}),
                                ("benchmark", {})]


# --- where the policy is written -----------------------------------------------------------------
def test_help_lists_the_exit_codes():
    text = CliRunner().invoke(main, ["--help"], terminal_width=100).stdout
    acting, _, judging = text.partition("exit with their verdict instead")
    assert "Exit codes" in acting and judging
    for row in app.EXIT_CODES:
        assert re.search(rf"^ +{row.code} +{re.escape(row.acting.split()[0])}", acting, re.M)
        if row.judging:
            assert re.search(rf"^ +{row.code} +{re.escape(row.judging.split()[0])}", judging,
                             re.M)
        else:  # a code the judging commands never exit with is not in their list
            assert not re.search(rf"^ +{row.code} ", judging, re.M)


def test_run_exits_75_for_a_restart_the_unit_and_the_image_act_on():
    """The code `run` ends with after POST /pyworker/update is in the table, is not 0 (which
    systemd's Restart=on-failure and a runtime's --restart on-failure leave stopped), and the
    shipped unit does not count it as success or exclude it from restarts."""
    assert app.Outcome.RESTART_REQUESTED == 75
    (row,) = [row for row in app.EXIT_CODES if row.code == app.Outcome.RESTART_REQUESTED]
    assert row.acting.startswith("run only: restart requested") and not row.judging
    service = parse_unit()["Service"]
    assert service["Restart"][-1] in ("on-failure", "always")
    for key in ("SuccessExitStatus", "RestartPreventExitStatus"):
        assert "75" not in " ".join(service.get(key, [])).split(), key


def test_the_docs_hold_the_exit_code_table():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    holding = [page for page in pages if app.exit_codes_markdown() in page.read_text()]
    assert holding, ("the docs' \"Exit codes\" table drifted from supervisor/commands/app.py: "
                     "paste app.exit_codes_markdown() there")


def test_exactly_the_commands_named_as_judging_exit_with_a_verdict():
    ctx = click.Context(main)
    judging = {name for name in COMMANDS
               if isinstance(main.get_command(ctx, name), app.VerdictCommand)}
    assert judging == set(app.JUDGING)


# --- the commands stand apart --------------------------------------------------------------------
def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether at module level) for each import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, id(node) in top)]
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
    return found


def test_nothing_outside_the_commands_imports_them():
    for package in ("api", "benchmark", "config", "simulator", "supervisor"):
        for path in (ROOT / package).rglob("*.py"):
            if "commands" in path.relative_to(ROOT).parts:
                continue
            assert not [m for m, _ in _imports(path) if m.startswith("supervisor.commands")], path


@pytest.mark.real_processes
def test_health_imports_neither_the_daemon_the_wrapper_nor_the_benchmark(tmp_path):
    probe = ("import sys\nfrom supervisor.commands.cli import main\n"
             f"try:\n    main(['health', '--json', '--socket', {str(tmp_path / 'no.sock')!r}])\n"
             "except SystemExit as exc:\n    print('exit', exc.code)\n"
             "print(sorted(m for m in sys.modules if m.startswith(('supervisor.daemon', "
             "'api.wrapper', 'benchmark', 'supervisor.commands.'))))\n")
    done = procs.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                     text=True, timeout=60, env=base_env(GPU_REQUIRED="false"))
    last = done.stdout.splitlines()[-2:]
    assert last[0] == "exit 3", done.stdout + done.stderr  # no daemon: unknown
    loaded = set(ast.literal_eval(last[1]))
    assert loaded == {"supervisor.commands.app", "supervisor.commands.cli",
                      "supervisor.commands.admin_socket", "supervisor.commands.health_cli",
                      "supervisor.commands.report", "supervisor.commands.sparkline"}
