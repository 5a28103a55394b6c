"""/metrics: what it says, in Prometheus' conventions, and who may read it.

The families are built from fake-NVML readings (the same scenarios the GPU tests use); who may
read them is checked against the real daemon: not the public port, loopback by default, and a
bearer token off loopback.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import SettingsError, load_settings
from supervisor.gpu import NvmlReader, fake
from supervisor.gpu.families import gpu_families
from tests.support.procs import start_daemon


def samples(families) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families for s in family.samples}


def test_gpu_readings_in_base_units_with_throttle_reasons_by_name():
    snapshot = NvmlReader(fake.scenario("thermal_throttling")).snapshot()
    got = samples(gpu_families(snapshot, 2, {("0", "79", "critical"): 1}, {}))
    gpu0 = (("gpu", "0"),)
    record = snapshot.gpus[0]
    assert got[("comfy_worker_gpu_sm_clock_hertz", gpu0)] == record.clocks.sm_mhz * 1e6
    assert got[("comfy_worker_gpu_memory_used_bytes", gpu0)] == record.memory.used_mib * 1048576
    assert got[("comfy_worker_gpu_utilization_ratio", gpu0)] == \
        pytest.approx(record.utilization.gpu_pct / 100)
    assert got[("comfy_worker_gpu_energy_joules_total", gpu0)] == \
        pytest.approx(record.power.energy_mj / 1000)
    assert got[("comfy_worker_gpu_clock_event_active",
                (("gpu", "0"), ("reason", "hw_thermal_slowdown")))] == 1
    assert got[("comfy_worker_gpu_clock_event_active",
                (("gpu", "0"), ("reason", "gpu_idle")))] == 0
    assert got[("comfy_worker_gpu_xid_errors_total",
                (("gpu", "0"), ("severity", "critical"), ("xid", "79")))] == 1
    assert got[("comfy_worker_gpu_health", ())] == 2
    # Name and UUID only on the info series, so no other series changes labels with them.
    assert got[("comfy_worker_gpu_info", (("gpu", "0"), ("name", record.name),
                                          ("uuid", record.uuid)))] == 1
    assert not [key for key in got if key[0] != "comfy_worker_gpu_info"
                and any(label in ("name", "uuid") for label, _ in key[1])]


def test_a_lost_gpu_reads_down_and_the_others_still_report():
    snapshot = NvmlReader(fake.scenario("gpu_lost")).snapshot()
    got = samples(gpu_families(snapshot, 2, {}, {}))
    lost = [g for g in snapshot.gpus if not g.available]
    assert lost and got[("comfy_worker_gpu_up", (("gpu", str(lost[0].index)),))] == 0
    for gpu in snapshot.gpus:
        if gpu.available:
            assert ("comfy_worker_gpu_temperature_celsius", (("gpu", str(gpu.index)),)) in got


def test_a_board_without_ecc_has_no_ecc_series():
    snapshot = NvmlReader(fake.scenario("consumer_no_ecc")).snapshot()
    names = {name for name, _ in samples(gpu_families(snapshot, 0, {}, {}))}
    assert "comfy_worker_gpu_temperature_celsius" in names
    assert "comfy_worker_gpu_ecc_errors_total" not in names


def test_metrics_off_loopback_need_a_token_or_an_explicit_choice():
    with pytest.raises(SettingsError) as caught:
        load_settings(None, environ={"METRICS_HOST": "0.0.0.0"})
    assert "metrics.token" in str(caught.value) and "METRICS_TOKEN" in str(caught.value)
    assert load_settings(None, environ={"METRICS_HOST": "0.0.0.0",
                                        "METRICS_TOKEN": "s3cret"}).metrics.token == "s3cret"
    assert load_settings(None, environ={"METRICS_HOST": "0.0.0.0",
                                        "METRICS_UNSECURED": "true"}).metrics.unsecured
    default = load_settings(None, environ={})
    assert default.metrics.host == "127.0.0.1" and default.metrics.port


def read(url: str, token: str | None = None) -> tuple[int | None, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError):
        return None, ""


def own_addresses() -> list[str]:
    """This host's IPv4 addresses other than loopback (where a client from outside arrives)."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                found.append(address.address)
    return found


@pytest.mark.e2e
def test_a_request_client_cannot_read_metrics_in_the_default_setup(tmp_path):
    # The defaults, except the port (free, for the test): metrics.host is 127.0.0.1.
    with start_daemon(tmp_path, extra_env={"METRICS_HOST": None}) as worker:
        port = worker.metrics_url.rsplit(":", 1)[1]
        # Not on the public port, with or without the request token.
        assert read(worker.url + "/metrics")[0] == 404
        assert read(worker.url + "/metrics", worker.token)[0] == 404
        # On its own listener, on loopback only.
        status, text = read(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and 'comfy_worker_state{state="ready"} 1.0' in text
        for address in own_addresses():
            assert read(f"http://{address}:{port}/metrics")[0] is None, address
        # The wrapper's figures are folded in: one target per worker.
        assert "comfy_worker_wrapper_metrics_up 1.0" in text
        assert "comfy_worker_stage_duration_seconds_bucket" in text
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"comfy_worker_child_restarts", "comfy_worker_jobs", "comfy_worker_info"} <= names


@pytest.mark.e2e
def test_metrics_token_is_required_when_set(tmp_path):
    env = {"METRICS_TOKEN": "m3trics"}
    with start_daemon(tmp_path, extra_env=env) as worker:
        url = worker.metrics_url + "/metrics"
        status, body = read(url)
        assert status == 401 and "metrics.token" in body
        assert read(url, worker.token)[0] == 401  # the request token is not the metrics token
        status, text = read(url, "m3trics")
        assert status == 200 and "comfy_worker_state" in text
