"""The alert and recording rules pass Prometheus' own checks and unit tests (`promtool`).

`make test` installs Debian's `prometheus` package (server and promtool) where it is missing;
elsewhere these tests are skipped with the command that installs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import procs

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "misc" / "prometheus" / "comfy-worker-rules.yml"
RULE_TESTS = ROOT / "misc" / "prometheus" / "comfy-worker-rules.test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool not found; `make test` installs it "
                    "(Debian/Ubuntu: apt-get install -y prometheus)")
    return found


def run(*args: str) -> subprocess.CompletedProcess:
    return procs.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                     cwd=ROOT)


@pytest.mark.real_processes
def test_promtool_check_rules():
    result = run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.real_processes
def test_promtool_test_rules():
    result = run("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_shown_firing_and_not_firing():
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]
              if "alert" in rule}
    assert len(alerts) >= 15
    for name, rule in alerts.items():
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and len(annotations.get("description", "")) > 80, \
            f"{name}: a paged person needs a summary and a description that says what to do"
        assert rule.get("labels", {}).get("severity") in ("page", "warning"), name
    firing: set[str] = set()
    quiet: set[str] = set()
    tests = yaml.safe_load(RULE_TESTS.read_text())
    for case in tests["tests"]:
        for check in case.get("promql_expr_test", []):
            match = re.fullmatch(r'ALERTS\{alertname="(\w+)",alertstate="firing"\}', check["expr"])
            if match:
                (firing if check["exp_samples"] else quiet).add(match.group(1))
    assert set(alerts) - firing == set(), "alerts without a test that shows them firing"
    assert set(alerts) - quiet == set(), "alerts without a test that shows them not firing"


@pytest.mark.real_processes
def test_the_rules_test_would_catch_a_wrong_expectation(tmp_path):
    """promtool really compares: the same file with one firing node swapped fails."""
    broken = RULE_TESTS.read_text().replace(
        'alertname="ComfyWorkerQueueBackingUp",alertstate="firing",instance="a"',
        'alertname="ComfyWorkerQueueBackingUp",alertstate="firing",instance="b"')
    target = tmp_path / "broken.test.yml"
    target.write_text(broken.replace("rule_files: [comfy-worker-rules.yml]",
                                     f"rule_files: [{RULES}]"))
    result = run("test", "rules", str(target))
    assert result.returncode != 0 and "ComfyWorkerQueueBackingUp" in result.stdout + result.stderr
