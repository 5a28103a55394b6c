"""Run one child process (ComfyUI, the API wrapper) and keep it healthy.

One :class:`ChildProcess` owns one child at a time and one background task that does
everything to it: launch, read its output, probe it, notice its exit, restart it.
Other coroutines only *ask* (``stop()``, ``restart()``, ``report_hang()``); the task
acts, so there is never a race over who reaps or relaunches.

Lifecycle (every change goes through ``_set_state`` and is logged ``old -> new``)::

    STOPPED -> STARTING --probe ok--> READY <--probe ok-- UNHEALTHY
                  |                     |--probe fails-->    |
                  | not ready in time   |                    | failing for hang_timeout
                  v                     v exit / crash       v
               (kill) ------------> RESTARTING <---------- (kill)
                                        |  too many exits in the window
                                        v
                                     FAILED --cool-down--> STARTING

Process groups and orphans
--------------------------
Each child starts in a new session (``start_new_session=True``), so it leads its own
process group and every signal we send goes to the whole group: ComfyUI's own helper
processes die with it, and no leftover holds GPU memory or the port when the next
instance starts.  After every exit the group is sent SIGKILL once more to sweep up
members that outlived the leader.

If the supervisor itself is SIGKILLed nobody sends those signals, so the child also
gets ``PR_SET_PDEATHSIG=SIGKILL``: the kernel kills it when its parent dies.  This is
set by a tiny exec wrapper (``python -I -S -c ...``, about 30 ms) rather than
``preexec_fn``, because ``preexec_fn`` runs Python in the forked child and can
deadlock when other threads (NVML and boto3 calls run in threads) hold locks.  The
wrapper also checks that its parent is still the supervisor after ``prctl`` (the
parent may die in between) and then ``exec``s the real command, so the child's pid is
the command's pid.  The same wrapper gives every child default signal dispositions and an
empty signal mask whatever the supervisor inherited: an ignored or blocked signal survives
exec, and a shell's background job ignores SIGINT and SIGQUIT, ``nohup`` SIGHUP.  Limits:

* The death signal reaches only the direct child.  Grandchildren in the same group
  are reparented and keep running unless something kills the group; under systemd,
  ``KillMode=mixed`` kills everything left in the unit's cgroup when the daemon dies,
  which covers them.  Outside systemd they can survive a SIGKILLed supervisor.
* A grandchild that calls ``setsid()`` leaves the group; only the cgroup catches it.
* The signal fires when the *thread* that forked the child exits, so the event loop
  that starts children must run on a thread that lives as long as they do.
* It is Linux-only; elsewhere (``kill_on_parent_death`` is ignored) children of a
  SIGKILLed supervisor survive.
* It is cleared when the child execs a set-uid/set-gid binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from api.host.ports import stranger_on_port
from supervisor.children.childlog import ChildLog, FailureRule, exit_cause
from supervisor.sdnotify import strip_notify_env

logger = logging.getLogger(__name__)

#: How long to wait for the kernel to reap a child after SIGKILL before logging that
#: it is stuck (a process in uninterruptible sleep, e.g. inside the GPU driver).
KILL_REAP_TIMEOUT = 5.0
#: Probe period while a child is starting (capped by its probe_interval).
STARTING_PROBE_INTERVAL = 0.25
#: How long to keep reading a dead child's pipe for its last lines.
OUTPUT_DRAIN_TIMEOUT = 2.0


# ---- errors --------------------------------------------------------------------------

class ChildError(Exception):
    """Base class for child supervision errors."""


class ProbeFailed(ChildError):
    """Raised by a probe: the child is not (or no longer) able to serve."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChildNotReady(ChildError):
    """``wait_ready`` gave up: the child did not become ready in time."""


class ChildFailed(ChildNotReady):
    """``wait_ready`` gave up: the child entered FAILED (crash loop) or was stopped."""


# ---- data ----------------------------------------------------------------------------

class ChildState(Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    FAILED = "failed"


@dataclass(frozen=True)
class ExitInfo:
    """How a child's run ended.  ``code`` for a normal exit, ``signal`` (a name such as
    ``"SIGKILL"``) when a signal ended it; ``at`` is a Unix timestamp."""

    code: int | None
    signal: str | None
    description: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "signal": self.signal,
                "description": self.description, "at": self.at}


Probe = Callable[[], Awaitable[None]]


@dataclass
class ChildSpec:
    """What to run and how to judge it.  Times are seconds.

    ``probe`` is an async callable that returns when the child can serve and raises
    :class:`ProbeFailed` (with a human reason) when it cannot; any other exception or
    running past ``probe_timeout`` counts as a failure too.  ``None`` means "ready as
    soon as it runs" (for children nothing talks to).
    """

    name: str
    command: list[str]
    probe: Probe | None = None
    cwd: Path | None = None
    #: Merged onto ``os.environ``.  PYTHONUNBUFFERED=1 is added unless set (so Python
    #: children's lines arrive as printed); NOTIFY_SOCKET and WATCHDOG_* are removed.
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 600.0
    probe_interval: float = 2.0
    probe_timeout: float = 5.0
    hang_timeout: float = 30.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    crash_loop_count: int = 5
    crash_loop_window: float = 300.0
    failed_cooldown: float = 600.0
    stop_timeout: float = 10.0
    log_path: Path | None = None
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    tail_lines: int = 200
    #: Linux: have the kernel SIGKILL the child if the supervisor dies.
    kill_on_parent_death: bool = True
    #: The local TCP port the child must listen on itself: before it counts as ready, the
    #: listening socket must belong to its process tree (see api/host/ports.py).
    port: int | None = None
    #: How messages name the child ("our ComfyUI").
    label: str = ""
    #: While this returns a reason, failing probes do not count towards ``hang_timeout``: the
    #: child is waiting on something else that is failing (a wrapper whose /health asks a hung
    #: ComfyUI cannot answer in time, and killing it would only lose its queue).
    hang_excuse: Callable[[], str | None] | None = None
    #: Rules that recognise the line of the child's output saying why it stopped, with the fix
    #: (see ``childlog.exit_cause``); a crash's reason quotes that line.
    failure_rules: tuple[FailureRule, ...] = ()

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError(f"child {self.name!r}: command is empty")
        for attr in ("startup_timeout", "probe_interval", "probe_timeout", "hang_timeout",
                     "backoff_initial", "backoff_max", "crash_loop_window",
                     "failed_cooldown", "stop_timeout"):
            if getattr(self, attr) < 0:
                raise ValueError(f"child {self.name!r}: {attr} must be >= 0")
        if self.crash_loop_count < 1:
            raise ValueError(f"child {self.name!r}: crash_loop_count must be >= 1")

    def stop_budget(self) -> float:
        """Longest ``stop()`` can take: SIGTERM grace, SIGKILL and reap, reading the
        last output.  The daemon adds this to its other stop stages and the sum must
        fit in systemd's ``TimeoutStopSec``."""
        return self.stop_timeout + KILL_REAP_TIMEOUT + OUTPUT_DRAIN_TIMEOUT


class _Intent(Enum):
    """Why we signalled the child; decides how its exit is described and counted."""

    STOP = "stop"          # stop(): not restarted
    RESTART = "restart"    # restart(): relaunched at once, not a failure
    FAILURE = "failure"    # hang / not ready: a failure, counts toward the crash loop


Listener = Callable[["ChildProcess", ChildState, ChildState, str], None]

# Runs before the real command: default signal dispositions and an empty mask; if argv[1]
# names the parent (0: do not), ask the kernel for SIGKILL when the parent dies and make
# sure the parent did not die before that took effect; then become the command.
_EXEC_WRAPPER = """\
import os, signal, sys
for name in ("SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP", "SIGPIPE", "SIGXFSZ"):
    signal.signal(getattr(signal, name), signal.SIG_DFL)  # the last two: Python ignores them
signal.pthread_sigmask(signal.SIG_SETMASK, ())
parent = int(sys.argv[1])
if parent:
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except Exception as exc:
        sys.stderr.write("comfy-worker: PR_SET_PDEATHSIG not set (%s); this child may outlive"
                         " a killed supervisor\\n" % (exc,))
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write("comfy-worker: cannot run %r: %s\\n" % (sys.argv[2], exc))
    sys.stderr.flush()
    os._exit(127)
"""


def _exec_wrapped(argv: list[str], parent: int) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", _EXEC_WRAPPER, str(parent), *argv]


def dies_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run through the exec wrapper, for any process the supervisor starts that must
    not outlive it: PR_SET_PDEATHSIG (Linux), and default signal dispositions and an empty
    signal mask whatever the supervisor inherited."""
    return _exec_wrapped(argv, os.getpid() if sys.platform.startswith("linux") else 0)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _describe_code(code: int) -> str:
    if code == 0:
        return "exited cleanly"
    text = f"exited with code {code}"
    if code == 127:
        return text + " (command not found)"
    if code == 126:
        return text + " (command not executable)"
    if 128 < code < 128 + 65:
        # A shell or wrapper in between reports its own child's death this way.
        name = _signal_name(code - 128)
        hint = " — out of memory?" if code - 128 == signal.SIGKILL else ""
        return f"{text} (128+{name}: a process it ran was killed{hint})"
    return text


# ---- the supervisor ------------------------------------------------------------------

class ChildProcess:
    """Supervises one :class:`ChildSpec`.  Create, ``await start()``, ``await stop()``."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self._state = ChildState.STOPPED
        self._reason = "not started"
        self._stranger_logged: str | None = None
        self._listeners: list[Listener] = []
        self._exit_listeners: list[Callable[["ChildProcess"], None]] = []
        self._log = ChildLog(spec.name, spec.log_path, max_bytes=spec.log_max_bytes,
                             backups=spec.log_backups, tail_lines=spec.tail_lines)
        self._proc: asyncio.subprocess.Process | None = None
        self._last_pid: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._started_mono: float | None = None
        self._started_at: float | None = None
        self._restarts = 0
        self._launches = 0
        self._last_exit: ExitInfo | None = None
        self._failures = 0                       # consecutive; reset after a stable run
        self._ready_since: float | None = None   # monotonic, this run's first READY
        self._exit_times: deque[float] = deque()  # failure exits, for the crash loop
        self._intent: _Intent | None = None
        self._intent_reason = ""
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()

    # ---- read-only view ------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> ChildState:
        return self._state

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def pid(self) -> int | None:
        """The running child's pid (also its process group id), else None."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return None
        return proc.pid

    @property
    def started_at(self) -> float | None:
        """Unix time the current process was launched (None when none runs)."""
        return self._started_at if self.pid is not None else None

    @property
    def uptime(self) -> float | None:
        if self.pid is None or self._started_mono is None:
            return None
        return time.monotonic() - self._started_mono

    @property
    def restarts(self) -> int:
        """Launches after the first one (crashes, hangs, requested restarts)."""
        return self._restarts

    @property
    def last_exit(self) -> ExitInfo | None:
        return self._last_exit

    @property
    def last_output_at(self) -> float | None:
        """Monotonic time the child last wrote anything (its output is a heartbeat)."""
        return self._log.last_output_at

    def tail(self, n: int | None = None) -> list[str]:
        """The last ``n`` output lines (all kept lines when None)."""
        return self._log.tail(n)

    def snapshot(self, tail_lines: int = 20) -> dict[str, Any]:
        """JSON-able view for the admin socket, the CLI and /health."""
        uptime = self.uptime
        return {
            "name": self.name,
            "state": self._state.value,
            "reason": self._reason,
            "pid": self.pid,
            "started_at": self.started_at,
            "uptime_s": None if uptime is None else round(uptime, 1),
            "restarts": self._restarts,
            "last_exit": None if self._last_exit is None else self._last_exit.to_dict(),
            "tail": self.tail(tail_lines),
        }

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(child, old, new, reason)`` on each state change.  Listeners
        run synchronously inside the change; they must be quick and not raise."""
        self._listeners.append(listener)

    def on_exit(self, listener: Callable[["ChildProcess"], None]) -> None:
        """Call ``listener(child)`` the moment the process is seen to have exited, before its
        reason is worked out (its last output, who holds its port: that can take a while) and
        so before the state changes. Synchronous; it must be quick and not raise."""
        self._exit_listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    # ---- commands ------------------------------------------------------------------

    async def start(self) -> None:
        """Launch the child and supervise it in a background task; returns at once."""
        if self._task is not None:
            raise ChildError(f"{self.name}: already started (call stop() first)")
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._supervise(), name=f"child:{self.name}")

    async def stop(self) -> None:
        """SIGTERM the group, wait ``stop_timeout``, SIGKILL the group, reap.  Idempotent.

        Takes at most ``spec.stop_budget()`` seconds (plus a little bookkeeping)."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        self._stop_event.set()
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self.spec.stop_budget() + 1.0)
        except asyncio.TimeoutError:
            logger.error("%s: supervisor task did not finish after stop; cancelling it", self._who())
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            self._task = None
            self._log.close()

    async def restart(self, reason: str = "restart requested") -> None:
        """Kill the group now and relaunch at once (no back-off, not a failure).

        Also ends a FAILED cool-down or a back-off wait early.  Returns once the old
        process is gone (or after ``KILL_REAP_TIMEOUT``)."""
        if self._task is None or self._stopping:
            raise ChildError(f"{self.name}: not running (call start() first)")
        proc = self._proc
        if proc is not None and proc.returncode is None:
            logger.info("%s: restarting: %s", self._who(), reason)
            self._kill(_Intent.RESTART, reason, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), KILL_REAP_TIMEOUT)
        else:
            # Waiting out a back-off or a FAILED cool-down: end the wait.
            logger.info("%s: restart requested while not running (%s): launching now",
                        self.name, reason)
            self._wake.set()

    def report_hang(self, reason: str) -> None:
        """Someone outside saw the child stop making progress (e.g. a prompt stuck at
        the same step): kill the group; it is restarted like any failure."""
        proc = self._proc
        if self._stopping or proc is None or proc.returncode is not None:
            logger.debug("%s: hang report ignored (not running): %s", self.name, reason)
            return
        logger.warning("%s: hang reported: %s; killing process group", self._who(), reason)
        self._kill(_Intent.FAILURE, f"hang reported: {reason}", signal.SIGKILL)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Return when READY.  Raises :class:`ChildFailed` if the child enters FAILED
        or is stopped, :class:`ChildNotReady` after ``timeout`` seconds."""

        async def _until_ready() -> None:
            while True:
                if self._state is ChildState.READY:
                    return
                if self._state is ChildState.FAILED:
                    raise ChildFailed(f"{self.name} failed: {self._reason}")
                if self._task is None or self._stopping:
                    raise ChildFailed(f"{self.name} is stopped")
                await self._changed.wait()

        try:
            await asyncio.wait_for(_until_ready(), timeout)
        except asyncio.TimeoutError:
            raise ChildNotReady(
                f"{self.name} not ready after {timeout:g} s "
                f"({self._state.value}: {self._reason})") from None

    # ---- state -----------------------------------------------------------------------

    def _who(self) -> str:
        # Between runs, name the pid that just exited: that is what the message is about.
        pid = self.pid or self._last_pid
        return f"{self.name} (pid {pid})" if pid is not None else f"{self.name} (no pid)"

    def _set_state(self, new: ChildState, reason: str) -> None:
        """The only place the state changes: log it, wake waiters, tell listeners."""
        old = self._state
        if old is new:
            if reason != self._reason:
                self._reason = reason
                logger.debug("%s: still %s (%s)", self._who(), new.value, reason)
            return
        self._state, self._reason = new, reason
        logger.info("%s: %s -> %s (%s)", self._who(), old.value, new.value, reason)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for listener in list(self._listeners):
            try:
                listener(self, old, new, reason)
            except Exception:
                logger.exception("%s: state listener %r failed", self.name, listener)

    # ---- signals ---------------------------------------------------------------------

    def _signal_group(self, sig: int) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            # pid == pgid because the child was started in a new session.
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:  # should not happen: same user
            logger.error("%s: cannot send %s to its group: %s", self._who(), _signal_name(sig), exc)

    def _kill(self, intent: _Intent, reason: str, sig: int) -> None:
        if self._intent is None or intent is _Intent.STOP:
            self._intent, self._intent_reason = intent, reason
        self._signal_group(sig)

    # ---- the supervising task --------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            while not self._stopping:
                exit_info = await self._run_once()
                if self._stopping:
                    break
                delay = self._after_exit(exit_info)
                await self._pause(delay)
                if self._state is ChildState.FAILED and not self._stopping:
                    # Cool-down over: start over with a clean slate.
                    self._exit_times.clear()
                    self._failures = 0
        except asyncio.CancelledError:
            self._signal_group(signal.SIGKILL)
            raise
        except Exception as exc:  # a bug here must not leave a child unsupervised
            logger.exception("%s: supervisor error", self._who())
            self._signal_group(signal.SIGKILL)
            self._set_state(ChildState.FAILED, f"supervisor error: {exc!r}")
            return
        self._set_state(ChildState.STOPPED, "stopped")

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` without busy-looping; stop() and restart() cut it short."""
        if self._stopping:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _run_once(self) -> ExitInfo:
        """Launch one process and return when it is gone."""
        self._intent, self._intent_reason = None, ""
        self._ready_since = None
        # Cleared here, not in _pause: a restart() between this run's exit and the
        # pause must still cut the pause short.
        self._wake.clear()
        if self._launches:
            self._restarts += 1
        self._launches += 1
        try:
            proc = await self._launch()
        except OSError as exc:
            info = ExitInfo(None, None, f"could not start: {exc}", time.time())
            logger.error("%s: %s", self.name, info.description)
            self._log.marker(info.description)
            self._last_exit = info
            return info

        self._proc, self._last_pid = proc, proc.pid
        run_mark = self._log.lines_seen
        self._started_mono, self._started_at = time.monotonic(), time.time()
        self._log.marker(f"started pid {proc.pid}: {' '.join(self.spec.command)}")
        self._set_state(ChildState.STARTING, "waiting for the first good probe")

        reader = asyncio.create_task(self._log.pump(proc.stdout), name=f"child:{self.name}:output")
        prober = asyncio.create_task(self._probe_loop(proc), name=f"child:{self.name}:probe")
        exited = asyncio.ensure_future(proc.wait())
        stop_requested = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({exited, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._terminate(proc, exited)
            returncode = await exited
            for listener in self._exit_listeners:
                try:
                    listener(self)
                except Exception:  # a listener's bug must not stop the supervision
                    logger.exception("%s: exit listener failed", self.name)
        except asyncio.CancelledError:
            for task in (exited, reader):
                task.cancel()
            raise
        finally:
            stop_requested.cancel()
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober

        info, level = self._classify(proc.pid, returncode)
        pid = proc.pid
        stranger = None
        if self.spec.port is not None and self._intent is None:
            # A child that died by itself may have lost its port to a stranger: say who.
            stranger = await self._stranger_on_port(pid)
        # Sweep group members that outlived the leader (the group id stays reserved
        # while any member lives, so this cannot hit an unrelated process group).
        self._signal_group(signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(reader), OUTPUT_DRAIN_TIMEOUT)
        except asyncio.TimeoutError:
            reader.cancel()
        except Exception:
            logger.exception("%s: reading output failed", self.name)
        if self._intent is None and not self._stopping and returncode > 0:
            # It died by itself: its own last words usually say why (a traceback's last line).
            cause = exit_cause(self._log.since(run_mark), known=self.spec.failure_rules)
            if cause:
                info = dataclasses.replace(info, description=f"{info.description}: {cause}")
        if stranger is not None:
            info = dataclasses.replace(info, description=f"{info.description}; {stranger}")
        logger.log(level, "%s (pid %d): %s", self.name, pid, info.description)
        self._log.marker(f"pid {pid} {info.description}")
        self._last_exit = info
        self._proc = None
        return info

    async def _launch(self) -> asyncio.subprocess.Process:
        spec = self.spec
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(spec.env)
        strip_notify_env(env)
        self._check_command(env)
        argv = list(spec.command)
        argv = dies_with_parent(argv) if spec.kill_on_parent_death else _exec_wrapped(argv, 0)
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            # One pipe keeps stdout and stderr lines in the order they were written.
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(spec.cwd) if spec.cwd is not None else None,
            env=env,
            start_new_session=True,
        )

    def _check_command(self, env: dict[str, str]) -> None:
        """Fail with a clear reason before forking when the program is missing."""
        program = self.spec.command[0]
        if os.sep in program:
            path = Path(program)
            if not path.is_absolute() and self.spec.cwd is not None:
                path = Path(self.spec.cwd) / path
            if not os.access(path, os.X_OK):
                raise FileNotFoundError(f"{program}: not found or not executable")
        elif shutil.which(program, path=env.get("PATH")) is None:
            raise FileNotFoundError(f"{program}: command not found in PATH")

    async def _terminate(self, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
        """stop(): SIGTERM the group, grace period, SIGKILL the group, reap."""
        timeout = self.spec.stop_timeout
        logger.info("%s: stopping: SIGTERM to the process group, up to %g s", self._who(), timeout)
        self._kill(_Intent.STOP, "stop requested", signal.SIGTERM)
        await asyncio.wait({exited}, timeout=timeout)
        if exited.done():
            return
        logger.warning("%s: did not stop within %g s; SIGKILL to the process group",
                       self._who(), timeout)
        self._kill(_Intent.STOP, f"did not stop within {timeout:g} s", signal.SIGKILL)
        await asyncio.wait({exited}, timeout=KILL_REAP_TIMEOUT)
        if not exited.done():
            # Uninterruptible sleep (typically inside a driver): nothing more we can do.
            logger.error("%s: still not gone %g s after SIGKILL (stuck in the kernel?); "
                         "waiting for it", self._who(), KILL_REAP_TIMEOUT)

    def _classify(self, pid: int, returncode: int) -> tuple[ExitInfo, int]:
        """Describe an exit and pick the log level its meaning deserves."""
        now = time.time()
        if returncode < 0:
            signum = -returncode
            name = _signal_name(signum)
            ours = self._intent is not None and signum in (signal.SIGKILL, signal.SIGTERM)
            if ours and self._intent is _Intent.STOP:
                return ExitInfo(None, name, f"stopped by {name} ({self._intent_reason})", now), logging.INFO
            if ours and self._intent is _Intent.RESTART:
                return (ExitInfo(None, name, f"restart requested: {self._intent_reason}; killed with {name}", now),
                        logging.INFO)
            if ours:
                return (ExitInfo(None, name, f"{self._intent_reason}; killed with {name}", now),
                        logging.WARNING)
            if signum == signal.SIGKILL:
                return ExitInfo(None, name, "killed by SIGKILL — out of memory?", now), logging.ERROR
            if signum == signal.SIGTERM:
                return (ExitInfo(None, name, "terminated by SIGTERM (not sent by the supervisor)", now),
                        logging.WARNING)
            return ExitInfo(None, name, f"killed by {name}", now), logging.ERROR
        desc = _describe_code(returncode)
        if self._stopping:
            level = logging.INFO
        elif returncode == 0:
            level = logging.WARNING  # a server should not exit on its own
        else:
            level = logging.ERROR
        return ExitInfo(returncode, None, desc, now), level

    def _after_exit(self, info: ExitInfo) -> float:
        """Pick the next state and how long to wait before relaunching."""
        if self._intent is _Intent.RESTART:
            self._set_state(ChildState.RESTARTING, f"{info.description}; restarting now")
            return 0.0
        spec = self.spec
        now = time.monotonic()
        if self._ready_since is not None and now - self._ready_since >= spec.backoff_max:
            # It served for longer than the longest back-off: not a tight loop, so the
            # back-off starts small again.  (Resetting on READY alone would keep the
            # delay at its minimum for a child that crashes right after its first probe.)
            self._failures = 0
        self._failures += 1
        self._exit_times.append(now)
        while self._exit_times and now - self._exit_times[0] > spec.crash_loop_window:
            self._exit_times.popleft()
        if len(self._exit_times) >= spec.crash_loop_count:
            self._set_state(
                ChildState.FAILED,
                f"crash loop: {len(self._exit_times)} exits in {spec.crash_loop_window:g} s; "
                f"last: {info.description}; retrying in {spec.failed_cooldown:g} s")
            return spec.failed_cooldown
        delay = min(spec.backoff_initial * 2 ** (self._failures - 1), spec.backoff_max)
        self._set_state(ChildState.RESTARTING, f"{info.description}; restarting in {delay:g} s")
        return delay

    # ---- probing ---------------------------------------------------------------------

    async def _probe_once(self) -> str | None:
        """None when the probe passes, else the reason it failed."""
        probe = self.spec.probe
        if probe is None:
            return None
        try:
            await asyncio.wait_for(probe(), self.spec.probe_timeout)
        except ProbeFailed as exc:
            return exc.reason
        except asyncio.TimeoutError:
            return f"probe timed out after {self.spec.probe_timeout:g} s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return f"probe error: {exc!r}"
        return None

    async def _stranger_on_port(self, pid: int | None) -> str | None:
        """The reason the child cannot count as ready when another process holds its port."""
        port = self.spec.port
        if port is None:
            return None
        who = self.spec.label or f"our {self.name}"
        reason = await asyncio.to_thread(stranger_on_port, port, pid, who)
        # Once per holder, not once per probe: the state reason carries it from then on.
        if reason is not None and reason != self._stranger_logged:
            logger.error("%s: %s", self._who(), reason)
        self._stranger_logged = reason
        return reason

    async def _probe_loop(self, proc: asyncio.subprocess.Process) -> None:
        spec = self.spec
        launched = time.monotonic()
        failing_since: float | None = None
        while proc.returncode is None:
            began = time.monotonic()
            failure = await self._probe_once()
            if proc.returncode is not None or self._intent is not None:
                return  # exited or being killed meanwhile: the verdict is moot
            now = time.monotonic()
            if self._state is ChildState.STARTING and failure is None:
                failure = await self._stranger_on_port(proc.pid)
                if proc.returncode is not None or self._intent is not None:
                    return
                now = time.monotonic()
            if self._state is ChildState.STARTING:
                if failure is None:
                    self._ready_since = now
                    self._set_state(ChildState.READY, f"probe ok after {now - launched:.1f} s")
                elif now - launched >= spec.startup_timeout:
                    reason = f"not ready after {spec.startup_timeout:g} s (last probe: {failure})"
                    logger.warning("%s: %s; killing process group", self._who(), reason)
                    self._kill(_Intent.FAILURE, reason, signal.SIGKILL)
                    return
                else:
                    self._set_state(ChildState.STARTING, f"waiting for readiness: {failure}")
            elif failure is None:
                failing_since = None
                self._set_state(ChildState.READY, "probe ok")
            else:
                excuse = spec.hang_excuse() if spec.hang_excuse is not None else None
                if excuse is not None:
                    failing_since = None  # judged afresh once the excuse is gone
                    failure = f"{failure} ({excuse})"
                elif failing_since is None:
                    failing_since = began
                if failing_since is not None and now - failing_since >= spec.hang_timeout:
                    reason = f"unresponsive for {now - failing_since:.0f} s ({failure})"
                    logger.warning("%s: %s; killing process group", self._who(), reason)
                    self._kill(_Intent.FAILURE, reason, signal.SIGKILL)
                    return
                self._set_state(ChildState.UNHEALTHY, failure)
            # While starting, probe often: a refused connection costs nothing, and every
            # interval waited here is time the worker stays out of service after a restart.
            interval = spec.probe_interval
            if self._state is ChildState.STARTING:
                interval = min(interval, STARTING_PROBE_INTERVAL)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))
