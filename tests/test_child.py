"""ChildProcess against real processes: tiny ``python -c`` programs that serve a ping,
crash, kill themselves, hang, ignore SIGTERM or print lines."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from supervisor.children.child import (
    ChildFailed,
    ChildNotReady,
    ChildProcess,
    ChildSpec,
    ChildState,
    ProbeFailed,
)
from supervisor.children.childlog import LineSplitter, RotatingFile
from tests.support.net import eventually
from tests.support.systemd_unit import unit_timeout_stop_sec
from tests.support.timing import allowance

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]

# Serves "ping" -> "pong" on a free port and writes the port to $PORT_FILE (atomically).
SERVER = textwrap.dedent("""
    import os, signal, socket
    if os.environ.get("IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    port_file = os.environ["PORT_FILE"]
    with open(port_file + ".tmp", "w") as f:
        f.write(str(s.getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        c.settimeout(2)
        try:
            if c.recv(16).startswith(b"ping"):
                c.sendall(b"pong\\n")
        except OSError:
            pass
        c.close()
""")


def tcp_probe(port_file: Path):
    """The kind of active probe the daemon uses: connect, ask, expect an answer."""

    async def probe() -> None:
        try:
            port = int(port_file.read_text())
        except (FileNotFoundError, ValueError):
            raise ProbeFailed("no port file yet") from None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            raise ProbeFailed(f"connect failed: {exc}") from None
        try:
            writer.write(b"ping\n")
            await writer.drain()
            answer = await reader.readline()
        finally:
            writer.close()
        if answer != b"pong\n":
            raise ProbeFailed(f"unexpected answer {answer!r}")

    return probe


def fast_spec(name: str, code: str, **overrides) -> ChildSpec:
    """Short timings so each behaviour shows within a second or two."""
    values = dict(
        probe_interval=0.05, probe_timeout=0.5, startup_timeout=10, hang_timeout=5,
        backoff_initial=5, backoff_max=10, crash_loop_count=10, crash_loop_window=60,
        failed_cooldown=30, stop_timeout=2,
    )
    values.update(overrides)
    return ChildSpec(name=name, command=[PY, "-c", code], **values)


def server_spec(tmp_path: Path, name: str = "srv", **overrides) -> ChildSpec:
    port_file = tmp_path / f"{name}.port"
    env = overrides.pop("env", {})
    return fast_spec(name, SERVER, probe=tcp_probe(port_file),
                     env={"PORT_FILE": str(port_file), **env}, **overrides)


def gone(pid: int) -> bool:
    """Dead, or a zombie nobody reaped yet (pid 1 in a container may never reap)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Recorder:
    """Listener that keeps every transition with a monotonic timestamp."""

    def __init__(self, child: ChildProcess) -> None:
        self.events: list[tuple[float, ChildState, ChildState, str, int | None]] = []
        child.add_listener(self)

    def __call__(self, child, old, new, reason) -> None:
        self.events.append((time.monotonic(), old, new, reason, child.pid))

    def of(self, state: ChildState) -> list[tuple[float, ChildState, ChildState, str, int | None]]:
        return [e for e in self.events if e[2] is state]

    async def wait(self, state: ChildState, count: int = 1, timeout: float = 5.0):
        await eventually(lambda: len(self.of(state)) >= count, timeout, f"{count}x {state.value}")
        return self.of(state)[count - 1]


@pytest.fixture
async def supervise():
    made: list[ChildProcess] = []

    def make(spec: ChildSpec) -> ChildProcess:
        child = ChildProcess(spec)
        made.append(child)
        return child

    yield make
    for child in made:
        await child.stop()


# ---- start, ready, stop ----------------------------------------------------------------

@pytest.mark.real_processes
async def test_start_ready_stop(tmp_path, supervise, caplog):
    caplog.set_level(logging.INFO)
    child = supervise(server_spec(tmp_path))
    rec = Recorder(child)
    await child.start()
    await child.wait_ready(10)

    pid = child.pid
    assert child.state is ChildState.READY and pid is not None
    assert os.getpgid(pid) == pid, "child must lead its own process group"
    assert [(e[1], e[2]) for e in rec.events] == [
        (ChildState.STOPPED, ChildState.STARTING), (ChildState.STARTING, ChildState.READY)]
    assert f"srv (pid {pid}): starting -> ready (probe ok after" in caplog.text
    snap = json.loads(json.dumps(child.snapshot()))
    assert snap["state"] == "ready" and snap["pid"] == pid and snap["restarts"] == 0
    assert snap["uptime_s"] >= 0 and "listening" in snap["tail"]

    started = time.monotonic()
    await child.stop()
    assert time.monotonic() - started < allowance(1.0), "a child that obeys SIGTERM stops at once"
    assert child.state is ChildState.STOPPED and child.pid is None
    assert gone(pid)
    assert child.last_exit.signal == "SIGTERM"
    stop_records = [r for r in caplog.records if "stopped by SIGTERM" in r.getMessage()]
    assert stop_records and stop_records[0].levelno == logging.INFO


@pytest.mark.real_processes
async def test_wait_ready_times_out_with_reason(tmp_path, supervise):
    child = supervise(fast_spec("slow", "import time; time.sleep(30)",
                                probe=tcp_probe(tmp_path / "never.port")))
    await child.start()
    with pytest.raises(ChildNotReady, match=r"slow not ready after 0.3 s \(starting: .*no port file yet"):
        await child.wait_ready(0.3)


@pytest.mark.real_processes
async def test_child_environment(tmp_path, supervise, monkeypatch):
    # systemd's variables are for the daemon only; spec env wins over os.environ.
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("GREETING", "from-daemon")
    code = ("import os, time; print('env', os.environ.get('NOTIFY_SOCKET'), os.environ['GREETING'],"
            " os.environ.get('PYTHONUNBUFFERED')); time.sleep(30)")
    child = supervise(fast_spec("env", code, env={"GREETING": "from-spec"}))
    await child.start()
    await eventually(lambda: any(l.startswith("env ") for l in child.tail()), what="env line")
    assert "env None from-spec 1" in child.tail()


# ---- exits -----------------------------------------------------------------------------

@pytest.mark.real_processes
async def test_crash_noticed_at_once_and_classified(tmp_path, supervise, caplog):
    code = "import sys, time; time.sleep(0.3); print('exiting at', time.monotonic(), flush=True); sys.exit(3)"
    child = supervise(fast_spec("crash", code))
    rec = Recorder(child)
    await child.start()
    noticed = (await rec.wait(ChildState.RESTARTING))[0]

    line = next(l for l in child.tail() if l.startswith("exiting at"))
    exited_at = float(line.split()[-1])  # CLOCK_MONOTONIC is shared across processes
    assert noticed - exited_at < allowance(0.5)
    assert child.last_exit.code == 3 and child.last_exit.signal is None
    # Its last line of output is quoted as the likely cause.
    assert child.last_exit.description == f"exited with code 3: {line}"
    assert child.reason == f"exited with code 3: {line}; restarting in 5 s"
    exit_records = [r for r in caplog.records if ": exited with code 3" in r.getMessage()]
    assert exit_records[0].levelno == logging.ERROR


CRASH_AT_START = textwrap.dedent("""
    import os, sys
    print("Starting server", flush=True)
    def execute_prestartup_script():
        os.listdir(sys.argv[1])
    execute_prestartup_script()
""")


@pytest.mark.real_processes
async def test_crash_reason_carries_the_traceback_exception_line(tmp_path, supervise, caplog):
    """ComfyUI 0.3.64 with --base-directory DIR and no DIR/custom_nodes dies with a traceback;
    the reason a user reads must say so, not only "exited with code 1", also in the crash loop."""
    missing = tmp_path / "base" / "custom_nodes"
    spec = fast_spec("comfy", CRASH_AT_START, backoff_initial=0.05, crash_loop_count=2,
                     crash_loop_window=30, failed_cooldown=30)
    spec = dataclasses.replace(spec, command=[*spec.command, str(missing)])
    child = supervise(spec)
    rec = Recorder(child)
    await child.start()
    await rec.wait(ChildState.FAILED)
    cause = f"FileNotFoundError: [Errno 2] No such file or directory: '{missing}'"
    assert child.last_exit.description == f"exited with code 1: {cause}"
    assert child.reason.startswith(f"crash loop: 2 exits in 30 s; last: exited with code 1: {cause}")
    assert "Traceback" not in child.reason and "\n" not in child.reason
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(cause in m for m in logged), logged


def test_exit_cause_picks_one_short_line():
    from supervisor.children.childlog import exit_cause

    traceback = ["Traceback (most recent call last):", '  File "main.py", line 3, in <module>',
                 "    boom()", "RuntimeError: CUDA error: out of memory", "",
                 "Exception ignored in atexit callback"]
    assert exit_cause(traceback) == "RuntimeError: CUDA error: out of memory"
    assert exit_cause(["loading", "fatal: no GPU", "  "]) == "fatal: no GPU"
    assert exit_cause([]) == ""
    long = exit_cause(["x" * 500])
    assert len(long) == 160 and long.endswith("...")


@pytest.mark.real_processes
async def test_sigkill_classified_as_out_of_memory(supervise, caplog):
    child = supervise(fast_spec("oom", "import os, time; time.sleep(0.1); os.kill(os.getpid(), 9)"))
    rec = Recorder(child)
    await child.start()
    await rec.wait(ChildState.RESTARTING)
    assert child.last_exit.signal == "SIGKILL" and child.last_exit.code is None
    assert child.last_exit.description == "killed by SIGKILL — out of memory?"
    record = next(r for r in caplog.records if "out of memory?" in r.getMessage())
    assert record.levelno == logging.ERROR


async def test_missing_command_is_a_clear_failure(supervise):
    child = supervise(ChildSpec("ghost", ["no-such-program-for-comfy-worker-tests"], backoff_initial=5))
    rec = Recorder(child)
    await child.start()
    await rec.wait(ChildState.RESTARTING)
    assert child.reason.startswith("could not start: no-such-program-for-comfy-worker-tests")
    assert "restarting in 5 s" in child.reason


@pytest.mark.real_processes
async def test_backoff_grows_then_caps(supervise):
    child = supervise(fast_spec("loop", "import sys; sys.exit(3)",
                                backoff_initial=0.2, backoff_max=0.8, crash_loop_count=20))
    rec = Recorder(child)
    await child.start()
    await rec.wait(ChildState.STARTING, count=5, timeout=10)

    delays = [e[3].rsplit("restarting in ", 1)[1] for e in rec.of(ChildState.RESTARTING)[:4]]
    assert delays == ["0.2 s", "0.4 s", "0.8 s", "0.8 s"]
    # The real gaps between launches follow (each also includes the child's run time).
    starts = [e[0] for e in rec.of(ChildState.STARTING)[:5]]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # Launch time varies a lot on a loaded 2-core machine: compare with generous margins.
    assert gaps[1] - gaps[0] > 0.05
    assert gaps[2] - gaps[1] > 0.15
    assert abs(gaps[3] - gaps[2]) < allowance(0.4)
    assert child.restarts >= 4


@pytest.mark.real_processes
async def test_crash_loop_fails_idles_then_retries(tmp_path, supervise):
    child = supervise(fast_spec("flaky", "import sys; sys.exit(3)", backoff_initial=0.05,
                                crash_loop_count=3, crash_loop_window=30, failed_cooldown=1.5,
                                probe=tcp_probe(tmp_path / "never.port")))
    rec = Recorder(child)
    await child.start()
    waiter = asyncio.ensure_future(child.wait_ready(10))
    failed_at = (await rec.wait(ChildState.FAILED))[0]
    assert child.reason == ("crash loop: 3 exits in 30 s; last: exited with code 3; "
                            "retrying in 1.5 s")
    with pytest.raises(ChildFailed, match="crash loop"):
        await waiter

    # The cool-down is a sleep: no launches, no children, no CPU.
    launches = len(rec.of(ChildState.STARTING))
    cpu = time.process_time()
    await asyncio.sleep(1.0)
    assert len(rec.of(ChildState.STARTING)) == launches
    assert psutil.Process().children(recursive=True) == []
    assert time.process_time() - cpu < 0.2
    assert child.state is ChildState.FAILED

    retried_at = (await rec.wait(ChildState.STARTING, count=launches + 1, timeout=3))[0]
    assert 1.4 <= retried_at - failed_at < 1.5 + allowance(1.0)


# ---- probes ----------------------------------------------------------------------------

@pytest.mark.real_processes
async def test_not_ready_in_time_is_killed_and_restarted(tmp_path, supervise):
    child = supervise(fast_spec("mute", "import time; time.sleep(30)", startup_timeout=0.5,
                                probe=tcp_probe(tmp_path / "never.port")))
    rec = Recorder(child)
    await child.start()
    pid = (await rec.wait(ChildState.STARTING))[4]
    await rec.wait(ChildState.RESTARTING)
    assert child.reason == ("not ready after 0.5 s (last probe: no port file yet); "
                            "killed with SIGKILL; restarting in 5 s")
    assert gone(pid)
    started = time.monotonic()
    await child.stop()  # also cuts the 5 s back-off short
    assert time.monotonic() - started < allowance(1.0)
    assert child.state is ChildState.STOPPED


@pytest.mark.real_processes
async def test_hung_child_is_restarted_after_hang_timeout(tmp_path, supervise):
    child = supervise(server_spec(tmp_path, probe_interval=0.1, probe_timeout=0.3,
                                  hang_timeout=1.0, backoff_initial=0.1))
    rec = Recorder(child)
    await child.start()
    await child.wait_ready(10)
    old_pid = child.pid

    os.kill(old_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    unhealthy = await rec.wait(ChildState.UNHEALTHY)
    assert "probe timed out after 0.3 s" in unhealthy[3]
    restarting_at = (await rec.wait(ChildState.RESTARTING, timeout=5))[0]
    assert 0.9 <= restarting_at - stopped_at < 1.0 + allowance(1.5)
    assert child.last_exit.description.startswith("unresponsive for 1 s (probe timed out after 0.3 s)")
    assert child.last_exit.description.endswith("killed with SIGKILL")

    await rec.wait(ChildState.READY, count=2, timeout=10)
    assert child.pid != old_pid and gone(old_pid)
    assert child.restarts == 1


@pytest.mark.real_processes
async def test_probe_recovery_returns_to_ready(tmp_path, supervise):
    child = supervise(server_spec(tmp_path, probe_interval=0.1, probe_timeout=0.3, hang_timeout=5))
    rec = Recorder(child)
    await child.start()
    await child.wait_ready(10)
    pid = child.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        await rec.wait(ChildState.UNHEALTHY)
    finally:
        os.kill(pid, signal.SIGCONT)
    _, old, new, reason, _ = await rec.wait(ChildState.READY, count=2)
    assert (old, new, reason) == (ChildState.UNHEALTHY, ChildState.READY, "probe ok")
    assert child.pid == pid and child.restarts == 0


@pytest.mark.real_processes
async def test_report_hang_and_restart(tmp_path, supervise):
    child = supervise(server_spec(tmp_path, backoff_initial=0.1))
    rec = Recorder(child)
    await child.start()
    await child.wait_ready(10)
    first = child.pid

    child.report_hang("prompt 42 made no progress for 120 s")
    await rec.wait(ChildState.RESTARTING)
    assert child.reason.startswith("hang reported: prompt 42 made no progress for 120 s; killed with SIGKILL")
    await rec.wait(ChildState.READY, count=2, timeout=10)
    second = child.pid
    assert second != first and gone(first) and child.restarts == 1

    await child.restart("operator asked")
    assert gone(second)
    await rec.wait(ChildState.READY, count=3, timeout=10)
    assert child.restarts == 2
    assert child.last_exit.description == "restart requested: operator asked; killed with SIGKILL"
    assert rec.of(ChildState.RESTARTING)[-1][3].endswith("restarting now")


# ---- stopping --------------------------------------------------------------------------

STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    g = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    print("grandchild", g.pid, flush=True)
    time.sleep(60)
""")


@pytest.mark.real_processes
async def test_stop_escalates_to_sigkill_for_the_whole_group(supervise, caplog):
    child = supervise(fast_spec("stubborn", STUBBORN, stop_timeout=0.5))
    await child.start()
    await eventually(lambda: any(l.startswith("grandchild") for l in child.tail()), what="grandchild")
    grandchild = int(next(l for l in child.tail() if l.startswith("grandchild")).split()[1])
    pid = child.pid

    started = time.monotonic()
    await child.stop()
    took = time.monotonic() - started
    assert 0.45 <= took < 0.5 + allowance(1.5), took
    assert gone(pid)
    # SIGKILL went to the whole group; the grandchild dies a moment later.
    await eventually(lambda: gone(grandchild), timeout=1.0, what="the grandchild to die")
    assert child.last_exit.signal == "SIGKILL"
    assert child.last_exit.description == "stopped by SIGKILL (did not stop within 0.5 s)"
    assert "did not stop within 0.5 s; SIGKILL to the process group" in caplog.text
    assert child.spec.stop_budget() >= child.spec.stop_timeout


def test_stop_budget_fits_systemd_timeout():

    # Default child stop alone must leave most of TimeoutStopSec for the other stages.
    assert ChildSpec("comfyui", ["x"]).stop_budget() <= unit_timeout_stop_sec() / 2


SUPERVISOR_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from supervisor.children.child import ChildProcess, ChildSpec

    async def main():
        code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                " print('up', flush=True); time.sleep(60)")
        child = ChildProcess(ChildSpec("victim", [sys.executable, "-c", code]))
        await child.start()
        while "up" not in child.tail():
            await asyncio.sleep(0.01)
        Path(sys.argv[1]).write_text(str(child.pid))
        await asyncio.sleep(60)

    asyncio.run(main())
""")


@pytest.mark.real_processes
async def test_killed_supervisor_leaves_no_orphan(tmp_path):
    pid_file = tmp_path / "child.pid"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sup = await asyncio.create_subprocess_exec(PY, "-c", SUPERVISOR_SCRIPT, str(pid_file),
                                               cwd=ROOT, env=env)
    try:
        await eventually(lambda: pid_file.exists() and pid_file.read_text(), timeout=10,
                         what="the supervised child to start")
        child_pid = int(pid_file.read_text())
        assert not gone(child_pid)
        assert psutil.Process(child_pid).ppid() == sup.pid
    finally:
        sup.kill()
        await sup.wait()
    await eventually(lambda: gone(child_pid), timeout=2, what="the orphan to die")


# ---- output ----------------------------------------------------------------------------

@pytest.mark.real_processes
async def test_output_goes_to_file_tail_and_daemon_log(tmp_path, supervise, caplog):
    caplog.set_level(logging.INFO, logger="child.talker")
    code = textwrap.dedent("""
        import sys, time
        print("first line")
        sys.stderr.write("on stderr\\n"); sys.stderr.flush()
        sys.stdout.write("progress 10%\\rprogress 50%\\rprogress 100%\\n")
        sys.stdout.write("no newline at exit")
        sys.stdout.flush()
        sys.exit(0)
    """)
    log_path = tmp_path / "logs" / "talker.log"
    child = supervise(fast_spec("talker", code, log_path=log_path))
    rec = Recorder(child)
    await child.start()
    await rec.wait(ChildState.RESTARTING)

    lines = ["first line", "on stderr", "progress 100%", "no newline at exit"]
    assert child.tail() == lines
    assert child.tail(2) == lines[-2:]
    text = log_path.read_text()
    for line in lines:
        assert f" {line}\n" in text
    assert "--- started pid" in text and "exited cleanly ---" in text
    daemon = [r.getMessage() for r in caplog.records if r.name == "child.talker"]
    assert daemon == [f"[talker] {line}" for line in lines]


@pytest.mark.real_processes
async def test_log_rotation_caps_size(tmp_path, supervise):
    code = "import time\nfor i in range(3000): print(f'line {i:05d} ' + 'x' * 50)\nprint('done')\ntime.sleep(30)"
    log_path = tmp_path / "chatty.log"
    child = supervise(fast_spec("chatty", code, log_path=log_path, log_max_bytes=20_000,
                                log_backups=2, tail_lines=50))
    await child.start()
    await eventually(lambda: child.tail(1) == ["done"], timeout=10, what="all output")
    files = sorted(tmp_path.glob("chatty.log*"))
    assert [f.name for f in files] == ["chatty.log", "chatty.log.1", "chatty.log.2"]
    assert all(f.stat().st_size <= 20_000 for f in files)
    assert "line 02999" in log_path.read_text()
    assert len(child.tail()) == 50 and child.tail()[-2].startswith("line 02999")


# The daemon's own side of it, in a real process configured as `comfy-worker run` configures it.
DAEMON_LOG = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    from config.logsetup import setup_logging
    from supervisor.children.childlog import ChildLog
    setup_logging("INFO", ["hunter2-secret"], name="[supervisor]")
    log = ChildLog("talker", Path(sys.argv[1]))
    log.lines(["uses hunter2-secret here", "second"])
    logging.getLogger("child.talker").info("[%s] %s", "talker", "hunter2-secret in a record")
    logging.getLogger().setLevel("WARNING")
    log.line("below the daemon's log level")
""")


@pytest.mark.real_processes
def test_daemon_log_reads_child_lines_as_its_records_and_masks_them(tmp_path):
    import re
    import subprocess

    log_path = tmp_path / "talker.log"
    run = subprocess.run([PY, "-c", DAEMON_LOG, str(log_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    shape = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \[supervisor\] "
                       r"child\.talker: \[talker\] (.*)")
    lines = run.stderr.splitlines()
    # The lines written in one go and the record logged the usual way read alike, secrets masked.
    assert [shape.fullmatch(line).group(1) for line in lines] == \
        ["uses ******** here", "second", "******** in a record"], run.stderr
    # The child's own file has every line as the child wrote it, the one below the level too.
    text = log_path.read_text()
    assert " uses hunter2-secret here\n" in text and " below the daemon's log level\n" in text


def test_rotation_without_backups_starts_the_file_over(tmp_path):
    path = tmp_path / "c.log"
    file = RotatingFile(path, max_bytes=100, backups=0)
    file.write([f"line {i:02d} {'x' * 30}\n" for i in range(10)])
    file.close()
    assert [p.name for p in tmp_path.iterdir()] == ["c.log"]
    assert path.stat().st_size <= 100 and path.read_text().endswith("line 09 " + "x" * 30 + "\n")


def test_a_file_that_is_not_regular_is_never_rotated(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        file = RotatingFile(path, max_bytes=100, backups=2)
        file.write([f"line {i}\n" for i in range(40)])
        file.close()
        assert os.read(reader, 65536).decode().splitlines() == [f"line {i}" for i in range(40)]
    finally:
        os.close(reader)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_a_failed_write_is_reported_once_and_the_file_comes_back(tmp_path, capsys):
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "c.log"
    file = RotatingFile(path, max_bytes=10_000, backups=1)
    file.write(["before\n"])
    path.unlink()
    folder.rmdir()  # the open file is gone with it; a new open fails until the folder is back
    file.close()
    file.write(["lost 1\n"])
    file.write(["lost 2\n"])
    assert capsys.readouterr().err.count(f"cannot write {path}") == 1
    folder.mkdir()
    file.write(["after\n"])
    file.close()
    assert path.read_text() == "after\n"


def test_line_splitter_handles_partial_cr_and_long_lines():
    s = LineSplitter(max_line=100)
    assert s.feed(b"hel") == []
    assert s.feed(b"lo\nwor") == ["hello"]
    assert s.feed(b"ld\r\n") == ["world"]
    # A progress bar redrawn many times never grows past the limit.
    out: list[str] = []
    for i in range(1000):
        out += s.feed(f"\rstep {i:04d}/1000".encode())
    assert out == []
    assert s.feed(b"\n") == ["step 0999/1000"]
    # A long line without newlines is cut, not kept whole.
    long = s.feed(b"y" * 250)
    assert long and len(long[0]) < 130 and long[0].endswith("[line cut]")
    assert s.feed(b"\xff\xfe broken utf8\n") == ["\ufffd\ufffd broken utf8"]
    assert s.flush() == []
