"""A real Prometheus scrapes a real worker: every query of the dashboard and the rules works.

The worker runs as `comfy-worker run` with the simulator as ComfyUI and two fake GPUs read from a
file (GPU_FAKE_SOURCE); Prometheus (Debian's package, which `make test` installs) runs with a
config of its own on a free loopback port, scraping and evaluating the rules every second. Then:

* `promtool check metrics` accepts what /metrics serves;
* every metric named by a dashboard panel, a dashboard variable or a rule exists in Prometheus,
  and every one of those queries evaluates without error (so renaming a metric breaks this test);
* a fake GPU that starts throttling makes ComfyWorkerGpuThermalSlowdown go pending in Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support import procs
from tests.support.procs import free_port, start_daemon, wait_until
from tests.support.workflows import tiny_workflow

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "misc" / "prometheus" / "comfy-worker-rules.yml"
DASHBOARD = ROOT / "misc" / "grafana" / "comfy-worker.json"
TINY = tiny_workflow("p")
NAME = re.compile(r"\b(comfy_worker[a-zA-Z0-9_:]*)")


def tools() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prometheus and promtool):
        pytest.skip("prometheus/promtool not found; `make test` installs them "
                    "(Debian/Ubuntu: apt-get install -y prometheus)")
    return prometheus, promtool


def write_gpus(path: Path, description: dict) -> None:
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(description))
    os.replace(scratch, path)


def gpus(throttle: bool = False) -> dict:
    first = {"preset": "h100_sxm", "gpu_util_pct": 60}
    if throttle:
        first.update(temperature_c=91, sm_clock_mhz=1350,
                     clock_event_reasons=["hw_thermal_slowdown"])
    # XID 13 (a warning) so the XID counter the rules read exists; it leaves the GPU degraded.
    return {"gpus": [first, {"preset": "rtx_4090"}], "events": [{"gpu": 0, "xid": 13}]}


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(panels):
        for panel in panels:
            queries.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(board["panels"])
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else None
        if text:
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", text)
            queries.append(match.group(1) if match else text)
    return queries


def rule_queries() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(self.url + path + query, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # a bad query answers 400 with the error
            return json.loads(exc.read() or b"{}")

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def names(self) -> set[str]:
        return set(self.get("/api/v1/label/__name__/values").get("data", []))

    def alert_states(self, name: str) -> set[str]:
        alerts = self.get("/api/v1/alerts").get("data", {}).get("alerts", [])
        return {a["state"] for a in alerts if a["labels"].get("alertname") == name}


@pytest.mark.e2e
@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_worker_and_every_query_works(tmp_path):
    prometheus_bin, promtool = tools()
    fake = tmp_path / "gpus.json"
    write_gpus(fake, gpus())
    env = {"GPU_FAKE_SOURCE": str(fake), "GPU_REQUIRED": "true", "GPU_SAMPLE_INTERVAL": "0.3",
           "BENCHMARK_ENABLED": "true", "BENCHMARK_TEST_WIDTH": "64",
           "BENCHMARK_TEST_HEIGHT": "64", "BENCHMARK_TEST_STEPS": "4", "BENCHMARK_RUNS": "1",
           "BENCHMARK_EXPECTED_SECONDS": "5"}
    with start_daemon(tmp_path, "--step-seconds", "0.02", extra_env=env) as worker:
        for _ in range(3):
            status, body = worker.generate({"input": {"workflow_json": TINY}})
            assert status == 200, body
        scrape = urllib.request.urlopen(worker.metrics_url + "/metrics", timeout=10).read()
        check = procs.run([promtool, "check", "metrics"], input=scrape,
                          capture_output=True, timeout=60)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()

        target = worker.metrics_url.split("://", 1)[1]
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "comfy-worker",
                                "static_configs": [{"targets": [target]}]}]}))
        log = open(tmp_path / "prometheus.log", "wb")
        server = procs.popen(
            [prometheus_bin, f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        prom = Prometheus(f"http://127.0.0.1:{port}")
        try:
            def scraped() -> bool:
                if server.poll() is not None:
                    raise AssertionError((tmp_path / "prometheus.log").read_text())
                try:
                    up = prom.query('up{job="comfy-worker"}')["data"]["result"]
                except (OSError, KeyError, ValueError):  # 503 while it starts
                    return False
                return bool(up) and up[0]["value"][1] == "1"

            wait_until(scraped, 60, "Prometheus to scrape the worker")
            assert prom.alert_states("ComfyWorkerGpuThermalSlowdown") == set()

            queries = dashboard_queries() + rule_queries()
            assert len(queries) > 50
            used = {name for q in queries for name in NAME.findall(q)}
            # Recording rules and rate() windows need a few scrapes and evaluations.
            wait_until(lambda: not (used - prom.names()), 30, "every metric in Prometheus")
            missing = used - prom.names()
            assert not missing, f"used by the dashboard or the rules, absent: {sorted(missing)}"
            substitutions = {"$instance": target, "$gpu": ".*", "$__rate_interval": "1m"}
            for query in queries:
                for variable, value in substitutions.items():
                    query = query.replace(variable, value)
                answer = prom.query(query)
                assert answer.get("status") == "success", (query, answer)
            # Panels show this node: its GPU temperature and benchmark are there, labelled.
            temps = prom.query(f'comfy_worker_gpu_temperature_celsius{{instance="{target}"}}')
            assert {r["metric"]["gpu"] for r in temps["data"]["result"]} == {"0", "1"}

            # The GPU throttles for heat: the alert goes pending (its `for:` is 10 minutes).
            write_gpus(fake, gpus(throttle=True))
            wait_until(lambda: prom.alert_states("ComfyWorkerGpuThermalSlowdown")
                       & {"pending", "firing"}, 30, "ComfyWorkerGpuThermalSlowdown pending")
            pending = [a for a in prom.get("/api/v1/alerts")["data"]["alerts"]
                       if a["labels"]["alertname"] == "ComfyWorkerGpuThermalSlowdown"]
            assert pending[0]["labels"]["gpu"] == "0" and \
                pending[0]["labels"]["instance"] == target
            assert "GPU 0" in pending[0]["annotations"]["summary"]
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)
            log.close()


def test_the_dashboard_is_importable_as_is():
    """No data source UID of ours baked in (the importer picks one), ids unique, panels on the
    grid without overlapping, a fleet row and a per-node row driven by the variables."""
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"instance", "gpu"} <= set(variables)
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Fleet", "Node $instance"]
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    node = panels[[p["title"] for p in panels].index("Node $instance"):]
    assert all('instance="$instance"' in t["expr"] for p in node if p["type"] != "row"
               for t in p["targets"]), "every per-node panel follows the node variable"
