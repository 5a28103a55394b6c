"""The systemd unit: systemd itself accepts it, and it says what the daemon relies on."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.systemd_unit import (
    UNIT_PATH,
    parse_timespan,
    parse_unit,
    unit_timeout_stop_sec,
    unit_value,
)

REAL_EXEC = "/opt/comfy-worker/.venv/bin/comfy-worker"


# ---- systemd-analyze verify ---------------------------------------------------------

def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze not found; install it (Debian/Ubuntu: apt-get install -y systemd)")
    return found


def _verifiable_copy(text: str, directory: Path) -> Path:
    """The unit with only ExecStart's program swapped for one that exists here.

    verify checks that the program is executable, and the venv path only exists on an
    installed host.  Everything else (user, paths, hardening) is checked as written.
    """
    assert text.count(f"ExecStart={REAL_EXEC} ") == 1
    copy = directory / "comfy-worker.service"
    copy.write_text(text.replace(f"ExecStart={REAL_EXEC} ", f"ExecStart={sys.executable} "))
    return copy


def _verify(unit: Path) -> tuple[int, str]:
    tool = _systemd_analyze()
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"}
    base = [tool, "verify", "--man=no", "--generators=no"]
    # --recursive-errors=no (systemd >= 250): judge this unit, not the host's other units.
    for extra in (["--recursive-errors=no"], []):
        proc = procs.run([*base, *extra, str(unit)], capture_output=True, text=True,
                         env=env, timeout=60)
        if "recursive-errors" in proc.stderr and "unrecognized" in proc.stderr:
            continue
        return proc.returncode, proc.stdout + proc.stderr
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def short_tmp():
    # Unit names end up in sockets and D-Bus paths; keep the directory short.
    with tempfile.TemporaryDirectory(prefix="cwunit") as name:
        yield Path(name)


@pytest.mark.real_processes
def test_systemd_analyze_verify_accepts_the_unit(short_tmp):
    rc, output = _verify(_verifiable_copy(UNIT_PATH.read_text(), short_tmp))
    # verify exits 0 even for unknown keys or bad values (it only warns), so any line
    # about our unit counts as a failure.
    about_unit = [line for line in output.splitlines() if "comfy-worker" in line]
    assert rc == 0 and not about_unit, output


@pytest.mark.real_processes
def test_verify_check_catches_a_broken_unit(short_tmp):
    # Proves the test above can fail: the same check on a unit with two mistakes.
    broken = UNIT_PATH.read_text().replace("KillMode=mixed", "KillMode=mixed\nRestart=sometimes\nWatchdogSecs=60")
    rc, output = _verify(_verifiable_copy(broken, short_tmp))
    assert "WatchdogSecs" in output and "sometimes" in output


@pytest.mark.real_processes
def test_verify_notices_the_real_exec_path_is_missing_here(short_tmp):
    if Path(REAL_EXEC).exists():
        pytest.skip(f"{REAL_EXEC} exists on this host")
    copy = short_tmp / "comfy-worker.service"
    copy.write_text(UNIT_PATH.read_text())
    rc, output = _verify(copy)
    assert rc != 0 and REAL_EXEC in output


# ---- what the daemon relies on ------------------------------------------------------

def test_service_contract():
    unit = parse_unit()
    service, section_unit = unit["Service"], unit["Unit"]

    def one(key: str) -> str:
        assert key in service, f"[Service] {key}= missing"
        return service[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert parse_timespan(one("WatchdogSec")) == 60
    assert parse_timespan(one("TimeoutStartSec")) == 1800
    assert unit_timeout_stop_sec() == 90
    assert one("Restart") == "on-failure"
    assert parse_timespan(one("RestartSec")) == 5
    assert one("KillMode") == "mixed"
    assert one("ExecStart") == f"{REAL_EXEC} run --config /etc/comfy-worker/worker.toml"
    assert one("EnvironmentFile") == "-/etc/comfy-worker/worker.env"
    assert one("User") == one("Group") == "comfy-worker"
    assert set(one("SupplementaryGroups").split()) == {"video", "render"}
    for key in ("StateDirectory", "LogsDirectory", "RuntimeDirectory"):
        assert one(key) == "comfy-worker"
    # Start limits belong to [Unit]; in [Service] systemd ignores them with a warning.
    assert "StartLimitIntervalSec" in section_unit and "StartLimitBurst" in section_unit
    assert "StartLimitIntervalSec" not in service and "StartLimitBurst" not in service


def test_hardening_keeps_gpu_devices_usable():
    service = parse_unit()["Service"]

    def value(key: str) -> str | None:
        values = service.get(key)
        return values[-1] if values else None

    # Each of these turns on a device allow-list (or hides /dev) and breaks CUDA.
    assert value("PrivateDevices") in (None, "no", "false")
    assert value("ProtectClock") in (None, "no", "false"), "ProtectClock implies DeviceAllow=char-rtc"
    assert value("DevicePolicy") in (None, "auto")
    assert value("DeviceAllow") is None
    assert value("MemoryDenyWriteExecute") in (None, "no", "false"), "CUDA/PyTorch JIT need W+X pages"
    assert value("PrivateUsers") in (None, "no", "false")
    # ...while the rest of the sandbox is on.
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables", "ProtectControlGroups",
                "RestrictSUIDSGID", "LockPersonality"):
        assert value(key) == "yes", key
    assert value("ProtectSystem") in ("full", "strict")
    if value("ProtectSystem") == "strict":
        writable = " ".join(service.get("ReadWritePaths", [])).split()
        assert "/opt/ComfyUI" in writable


def test_watchdog_interval_from_this_unit_is_half_the_period():
    from supervisor.sdnotify import SystemdNotifier

    usec = int(parse_timespan(unit_value("Service", "WatchdogSec")) * 1_000_000)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": str(usec),
                                "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval() == 30.0


def test_timespan_parsing():
    assert parse_timespan("90") == 90
    assert parse_timespan("90s") == 90
    assert parse_timespan("1min 30s") == 90
    assert parse_timespan("1h") == 3600
    assert parse_timespan("500ms") == 0.5
    assert parse_timespan("infinity") == float("inf")
    with pytest.raises(ValueError):
        parse_timespan("ninety")
