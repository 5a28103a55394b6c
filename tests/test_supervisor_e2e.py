"""The real daemon as a subprocess, the simulator as ComfyUI: start, serve, crash, hang, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

import psutil
import pytest

from tests.support import procs
from tests.support.procs import ROOT, get_json, start_daemon, wait_until
from tests.support.systemd_unit import unit_timeout_stop_sec
from tests.support.timing import allowance
from tests.support.workflows import TINY


def slow(steps: int) -> dict:
    return {"input": {"modifier": "Text2Image",
                      "modifications": {"steps": steps, "width": 64, "height": 64}}}


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.e2e
def test_ready_serves_and_rejects_without_token(tmp_path, comfy_api):
    with start_daemon(tmp_path, "--step-seconds", "0.01") as worker:
        status, body = worker.generate({"input": {"workflow_json": TINY}})
        assert status == 200 and body["status"] == "completed", body
        status, body = worker.generate({"input": {"workflow_json": TINY}},
                                       headers={"Authorization": "Bearer wrong"})
        assert status == 401 and "invalid bearer token" in body["error"]
        status, health = get_json(worker.url + "/health")
        assert status == 200 and health["state"] == "ready"
        assert health["children"]["comfyui"]["state"] == "ready"
        assert health["instances"][0]["comfyui_version"] == f"{comfy_api}-sim"
        # /health is a projection of the admin snapshot: the same facts, without pids, paths,
        # logs or the event log.
        full = worker.status()
        public = json.dumps(health)
        for private in ("pid", "tail", "folders", "comfyui_url", "events", "history"):
            assert f'"{private}"' not in public and f'"{private}"' in json.dumps(full)
        mine, theirs = health["instances"][0], full["instances"][0]
        # (Read a moment apart: a reason may have moved on, the shape and the states not.)
        assert set(mine["children"]["comfyui"]) == {"state", "reason", "restarts"}
        assert {k: mine["children"]["comfyui"][k] for k in ("state", "restarts")} == \
            {k: theirs["children"]["comfyui"][k] for k in ("state", "restarts")}
        assert mine["gpu"] == {k: theirs["gpu"][k] for k in ("index", "uuid", "name", "verdict")}
        status, live = get_json(worker.url + "/health/live")
        assert status == 200 and live["alive"]
        import urllib.request

        metrics = urllib.request.urlopen(worker.metrics_url + "/metrics").read().decode()
        assert 'comfy_worker_state{state="ready"} 1.0' in metrics
        assert 'comfy_worker_requests_total{status="200"} 1.0' in metrics
        assert f'comfyui_version="{comfy_api}-sim"' in metrics
        from click.testing import CliRunner

        from supervisor.commands.cli import main

        report = CliRunner().invoke(main, ["health", "--socket", str(worker.admin_socket)])
        assert f"comfyui: {comfy_api}-sim; flags asked of it (--help); assets " in report.output, \
            report.output
        # The request's lines from both children: in each child's own file, and in the
        # daemon's log as its child.<name> records read (timestamp, level, the daemon's name).
        for child, line in (("comfyui", "got prompt"), ("wrapper", " completed: ")):
            own = tmp_path / "logs" / f"{child}.log"
            wait_until(lambda own=own, line=line: line in own.read_text(), 10,
                       f"{line!r} in {own.name}")
            record = f" INFO [supervisor] child.{child}: [{child}] "
            wait_until(lambda record=record, line=line: any(
                record in entry and line in entry
                for entry in worker.log_path.read_text().splitlines()), 10,
                f"{line!r} in the daemon's log")


@pytest.mark.e2e
def test_comfyui_killed_during_request_gives_502_then_recovers(tmp_path, comfy_api):
    with start_daemon(tmp_path, "--step-seconds", "0.05") as worker:
        pid = worker.child_pid("comfyui")
        result = {}

        def call():
            result["answer"] = worker.generate(slow(400))
            result["at"] = time.monotonic()

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(1.0)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        thread.join(20)
        status, body = result["answer"]
        assert status == 502, body
        assert "ComfyUI" in (body.get("error") or body.get("message", ""))
        assert result["at"] - killed < allowance(1.5)
        wait_until(lambda: get_json(worker.url + "/health")[0] == 200, 30, "ready again")
        assert worker.child_pid("comfyui") != pid
        status, body = worker.generate({"input": {"workflow_json": TINY}})
        assert status == 200, body
        snap = worker.status()["children"]["comfyui"]
        assert snap["restarts"] >= 1
        assert "SIGKILL" in snap["last_exit"]["description"]


@pytest.mark.e2e
def test_sigstopped_comfyui_is_detected_and_restarted(tmp_path, comfy_api):
    with start_daemon(tmp_path, "--step-seconds", "0.01") as worker:
        pid = worker.child_pid("comfyui")
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: get_json(worker.url + "/health")[0] == 503, 10, "unhealthy")
        wait_until(lambda: worker.child_pid("comfyui") not in (None, pid), 20, "a new ComfyUI")
        wait_until(lambda: get_json(worker.url + "/health")[0] == 200, 30, "ready again")
        # hang_timeout is 3 s, probes every 0.5 s with a 1 s timeout.
        assert time.monotonic() - stopped_at < 20
        assert not alive(pid)


@pytest.mark.e2e
def test_crash_at_start_backs_off_then_fails_and_rests(tmp_path, comfy_api):
    env = {"SUPERVISOR_CRASH_LOOP_COUNT": "3", "SUPERVISOR_CRASH_LOOP_WINDOW": "60",
           "SUPERVISOR_FAILED_COOLDOWN": "300"}
    with start_daemon(tmp_path, "--crash-at-start", "3", wait_ready=False,
                      extra_env=env) as worker:
        def failed():
            status, body = get_json(worker.url + "/health")
            return body if status == 503 and body.get("state") == "unhealthy" else None

        body = wait_until(failed, 30, "the crash loop to be declared")
        assert body["reason"].startswith("ComfyUI failed: crash loop")
        assert "exited with code 3" in body["reason"]
        status, answer = worker.generate({"input": {"workflow_json": TINY}})
        assert status == 503 and answer["state"] == "unhealthy"
        restarts = worker.status()["children"]["comfyui"]["restarts"]
        daemon = psutil.Process(worker.process.pid)
        daemon.cpu_percent(None)
        time.sleep(2.0)
        assert daemon.cpu_percent(None) < 20, "no busy loop while failed"
        assert worker.status()["children"]["comfyui"]["restarts"] == restarts


@pytest.mark.e2e
def test_killed_wrapper_is_restarted(tmp_path):
    with start_daemon(tmp_path, "--step-seconds", "0.01") as worker:
        pid = worker.child_pid("wrapper")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: worker.child_pid("wrapper") not in (None, pid), 20, "a new wrapper")
        wait_until(lambda: get_json(worker.url + "/health")[0] == 200, 30, "ready again")
        assert worker.generate({"input": {"workflow_json": TINY}})[0] == 200


@pytest.mark.e2e
def test_sigterm_stops_cleanly_with_no_child_left(tmp_path):
    with start_daemon(tmp_path, "--step-seconds", "0.01", stop=False) as worker:
        pids = [worker.child_pid("comfyui"), worker.child_pid("wrapper")]
        assert all(alive(p) for p in pids)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(30) == 0
        assert not any(alive(p) for p in pids)
        assert not worker.admin_socket.exists()


# Starts the daemon the way a shell's background job under nohup would (SIGINT, SIGQUIT and
# SIGHUP ignored), with SIGUSR1 (the wrapper's "ComfyUI died") blocked as well.
INHERITED_SIGNALS = """
import os, signal, sys
for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
    signal.signal(signum, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
os.execv(sys.argv[1], sys.argv[1:])
"""


def signal_sets(pid: int) -> dict[str, set[int]]:
    """The kernel's view of a process: which signals it ignores, blocks and catches."""
    fields = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines()
                  if ":\t" in line)
    bits = {name: int(fields[name], 16) for name in ("SigIgn", "SigBlk", "SigCgt")}
    return {name: {n for n in range(1, 65) if value >> (n - 1) & 1} for name, value in bits.items()}


@pytest.mark.e2e
def test_children_start_with_default_signals_whatever_the_daemon_inherited(tmp_path):
    with start_daemon(tmp_path, "--step-seconds", "0.01", stop=False,
                      launcher=[sys.executable, "-c", INHERITED_SIGNALS]) as worker:
        inherited = signal_sets(worker.process.pid)
        assert {signal.SIGQUIT, signal.SIGHUP} <= inherited["SigIgn"]  # the launcher did its part
        assert signal.SIGUSR1 in inherited["SigBlk"]
        comfy, wrapper = worker.child_pid("comfyui"), worker.child_pid("wrapper")
        for pid in (comfy, wrapper):
            seen = signal_sets(pid)
            assert not seen["SigIgn"] & set(procs.STOP_SIGNALS), seen
            assert not seen["SigBlk"], seen
        assert signal.SIGUSR1 in signal_sets(wrapper)["SigCgt"]  # "ComfyUI died" reaches it
        # Ctrl-C's signal stops ComfyUI (the daemon starts a new one), then the daemon itself.
        os.kill(comfy, signal.SIGINT)
        wait_until(lambda: worker.child_pid("comfyui") not in (None, comfy), 30, "a new ComfyUI")
        wait_until(lambda: get_json(worker.url + "/health")[0] == 200, 30, "ready again")
        pids = [worker.child_pid("comfyui"), worker.child_pid("wrapper")]
        worker.process.send_signal(signal.SIGINT)
        assert worker.process.wait(30) == 0
        assert not any(alive(p) for p in pids)


@pytest.mark.e2e
def test_sigkilled_supervisor_leaves_no_child(tmp_path):
    with start_daemon(tmp_path, "--step-seconds", "0.01", stop=False) as worker:
        pids = [worker.child_pid("comfyui"), worker.child_pid("wrapper")]
        worker.process.kill()
        worker.process.wait(10)
        wait_until(lambda: not any(alive(p) for p in pids), 10, "children to die with it")


@pytest.mark.e2e
def test_sd_notify_messages_arrive_in_order(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    messages: list[str] = []
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000",
           "WATCHDOG_PID": ""}
    with start_daemon(tmp_path, "--step-seconds", "0.01", extra_env=env, stop=False) as worker:
        # WATCHDOG_PID empty: the check applies to any pid (the daemon is a grandchild here).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
        worker.process.send_signal(signal.SIGTERM)
        worker.process.wait(30)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
    text = "\n".join(messages)
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    first_status = next(i for i, m in enumerate(messages) if m.startswith("STATUS=starting"))
    assert first_status < ready
    assert "STATUS=ready" in messages[ready]
    assert any(m == "WATCHDOG=1" for m in messages[ready:]), text
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert stopping > ready


def test_stop_stages_fit_in_the_units_timeout():
    from config import load_settings
    from supervisor.daemon.daemon import stop_budget

    assert stop_budget(load_settings(None, environ={})) < unit_timeout_stop_sec()


@pytest.mark.e2e
def test_comfyui_listening_publicly_is_refused(tmp_path):
    env = dict(os.environ, COMFYUI_COMMAND='["python", "main.py", "--listen"]',
               WORKER_AUTH_TOKEN="x", WORKER_STATE_DIR=str(tmp_path), GPU_REQUIRED="false")
    proc = procs.run([sys.executable, "-m", "supervisor.commands.cli", "run"], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "listens on 0.0.0.0" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_no_auth_configured_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_AUTH_TOKEN", "UNSECURED",
                                                            "REPORT_ADDR")}
    env.update(WORKER_STATE_DIR=str(tmp_path), GPU_REQUIRED="false")
    proc = procs.run([sys.executable, "-m", "supervisor.commands.cli", "run"], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "WORKER_AUTH_TOKEN" in proc.stderr and "UNSECURED=true" in proc.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish_then_second_sigterm_is_immediate(tmp_path):
    with start_daemon(tmp_path, "--step-seconds", "0.05", stop=False,
                      extra_env={"WORKER_DRAIN_TIMEOUT": "20"}) as worker:
        result = {}
        thread = threading.Thread(target=lambda: result.update(answer=worker.generate(slow(40))))
        thread.start()
        time.sleep(0.8)
        worker.process.send_signal(signal.SIGTERM)
        thread.join(30)
        assert result["answer"][0] == 200, "the request in flight was allowed to finish"
        assert worker.process.wait(30) == 0

    (tmp_path / "second").mkdir()
    with start_daemon(tmp_path / "second", "--step-seconds", "0.05", stop=False,
                      extra_env={"WORKER_DRAIN_TIMEOUT": "60"}) as worker:
        thread = threading.Thread(target=lambda: worker.generate(slow(2000)))
        thread.start()
        time.sleep(0.8)
        worker.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        began = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(30) == 0
        assert time.monotonic() - began < 15, "a second SIGTERM skips the 60 s drain"
        thread.join(30)


@pytest.mark.e2e
def test_drain_and_resume_from_the_command_line(tmp_path):
    with start_daemon(tmp_path, "--step-seconds", "0.01") as worker:
        command = [sys.executable, "-m", "supervisor.commands.cli", "drain", "--socket",
                   str(worker.admin_socket)]
        done = procs.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0 and "draining" in done.stdout
        status, body = get_json(worker.url + "/health")
        assert status == 503 and body["reason"].startswith("draining")
        assert worker.generate({"input": {"workflow_json": TINY}})[0] == 503
        command[3] = "resume"
        assert procs.run(command, capture_output=True, timeout=60, cwd=ROOT).returncode == 0
        wait_until(lambda: get_json(worker.url + "/health")[0] == 200, 10, "ready again")
        assert oct(worker.admin_socket.stat().st_mode & 0o777) == "0o660"


@pytest.mark.e2e
def test_tls_on_the_public_port(tmp_path):
    import datetime
    import ssl
    import urllib.request

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    env = {"USE_SSL": "true", "WORKER_SSL_CERT": str(cert_path), "WORKER_SSL_KEY": str(key_path)}
    with start_daemon(tmp_path, "--step-seconds", "0.01", wait_ready=False,
                      extra_env=env) as worker:
        context = ssl.create_default_context(cafile=str(cert_path))
        context.check_hostname = False
        https = worker.url.replace("http://", "https://")

        def ready():
            try:
                with urllib.request.urlopen(https + "/health", context=context,
                                            timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(ready, 30, "ready over TLS")
        with pytest.raises(OSError):
            urllib.request.urlopen(worker.url + "/health", timeout=2).read()
