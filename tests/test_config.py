"""Settings: precedence, errors that name key and source, and the example file in sync."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from api.comfy import folders as comfy_folders
from config import SETTINGS, SettingsError, check_file, load_settings, render_example
from supervisor.commands.cli import main
from tests.support import procs

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return path


def test_precedence_default_then_file_then_environment(tmp_path):
    path = write(tmp_path, "[worker]\nport = 4000\nqueue_size = 7\n")
    settings = load_settings(path, environ={"WORKER_PORT": "5000"})
    assert settings.worker.port == 5000
    assert str(settings.source("worker.port")) == "environment variable WORKER_PORT"
    assert settings.worker.queue_size == 7
    assert str(settings.source("worker.queue_size")) == f"{path} line 3"
    assert settings.worker.drain_timeout == 30.0
    assert str(settings.source("worker.drain_timeout")) == "default"


def test_wrapper_compatible_alias_sets_comfyui_url():
    settings = load_settings(None, environ={"COMFYUI_API_BASE": "http://127.0.0.1:9999/"})
    assert settings.comfyui.url == "http://127.0.0.1:9999"
    assert str(settings.source("comfyui.url")) == "environment variable COMFYUI_API_BASE"


def test_output_dir_follows_install_path_unless_set():
    settings = load_settings(None, environ={"COMFYUI_INSTALL_PATH": "/srv/comfy"})
    assert comfy_folders.from_settings(settings).output.path == Path("/srv/comfy/output")
    settings = load_settings(None, environ={"COMFYUI_INSTALL_PATH": "/srv/comfy",
                                            "COMFYUI_OUTPUT_DIR": "/data/out"})
    assert comfy_folders.from_settings(settings).output.path == Path("/data/out")


def test_bad_environment_value_names_key_source_and_expectation():
    with pytest.raises(SettingsError) as info:
        load_settings(None, environ={"BENCHMARK_TEST_STEPS": "twenty"})
    message = str(info.value)
    assert "benchmark.steps" in message
    assert "environment variable BENCHMARK_TEST_STEPS" in message
    assert "expected an integer" in message


def test_bad_file_value_names_the_line(tmp_path):
    path = write(tmp_path, "[worker]\n# comment\nport = \"http\"\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, environ={})
    assert f"worker.port: 'http' from {path} line 3: expected an integer" in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "[worker]\nprot = 1\n[benchmark]\naction = \"ignore\"\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, environ={"GPU_REQUIRED": "perhaps"})
    problems = info.value.problems
    assert any("worker.prot: unknown setting" in p and "did you mean worker.port" in p
               for p in problems)
    assert any(p.startswith("benchmark.action:") and "'refuse'" in p for p in problems)
    assert any(p.startswith("gpu.required:") and "GPU_REQUIRED" in p for p in problems)


def test_unknown_section_and_invalid_toml(tmp_path):
    with pytest.raises(SettingsError, match=r"unknown section \[comfy\]; did you mean \[comfyui\]"):
        load_settings(write(tmp_path, "[comfy]\nurl = 'x'\n"), environ={})
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path, "[worker\n"), environ={})


def test_secret_value_is_not_echoed_in_errors():
    # A secret setting never shows its value in a message, even when invalid.
    from config.loader import _describe

    assert _describe("s3cr3t-value", secret=True) == "the value"


def test_lists_and_tables_from_file_and_environment(tmp_path):
    path = write(tmp_path, '[comfyui]\ncommand = ["python", "main.py"]\nenv = { A = "1" }\n')
    settings = load_settings(path, environ={"WRAPPER_COMMAND": "my-wrapper --port 1"})
    assert settings.comfyui.command == ["python", "main.py"]
    assert settings.comfyui.env == {"A": "1"}
    assert settings.wrapper.command == ["my-wrapper", "--port", "1"]


def test_ssl_needs_certificate_and_key():
    with pytest.raises(SettingsError, match="worker.ssl_cert: required when worker.use_ssl"):
        load_settings(None, environ={"USE_SSL": "true"})


def test_example_file_is_in_sync_with_declarations():
    committed = (ROOT / "config" / "worker.example.toml").read_text()
    assert committed == render_example(), (
        "config/worker.example.toml drifted: regenerate it with "
        "`comfy-worker config example > config/worker.example.toml`")
    settings = check_file(ROOT / "config" / "worker.example.toml")
    for setting in SETTINGS:
        assert str(settings.source(setting.name)).startswith(str(ROOT / "config"))


def test_every_setting_has_doc_env_and_valid_default():
    names = set()
    for setting in SETTINGS:
        assert setting.doc and setting.doc.endswith("."), setting.name
        assert setting.env, setting.name
        setting.type.check(setting.default)
        names.add(setting.name)
    assert len(names) == len(SETTINGS)
    for required in ("WORKER_PORT", "BENCHMARK_TEST_WIDTH", "BENCHMARK_TEST_HEIGHT",
                     "BENCHMARK_TEST_STEPS", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY",
                     "S3_BUCKET_NAME", "S3_ENDPOINT_URL", "S3_REGION", "WEBHOOK_URL",
                     "WEBHOOK_TIMEOUT", "WEBHOOK_SECRET", "REPORT_ADDR", "CONTAINER_ID",
                     "MASTER_TOKEN", "PUBLIC_IPADDR", "UNSECURED", "USE_SSL"):
        assert any(required in s.env for s in SETTINGS), required


def test_config_show_masks_secrets_and_names_sources(monkeypatch):
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "very-secret-key-123")
    monkeypatch.setenv("WORKER_PORT", "3999")
    result = CliRunner().invoke(main, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "very-secret-key-123" not in result.output
    assert "s3.secret_access_key" in result.output and "********" in result.output
    assert "worker.port" in result.output and "3999  [environment variable WORKER_PORT]" in \
        result.output


def test_config_check_reports_bad_file_with_exit_code(tmp_path):
    bad = write(tmp_path, "[gpu]\nrequired = \"yes\"\n")
    result = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert result.exit_code == 2
    assert "gpu.required" in result.output and "line 2" in result.output


@pytest.mark.real_processes
def test_bad_setting_stops_startup_without_traceback(tmp_path):
    env = dict(os.environ, WORKER_PORT="70000")
    proc = procs.run([sys.executable, "-m", "supervisor.commands.cli", "api"], env=env,
                     capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "WORKER_PORT" in proc.stderr and "from 1 to 65535" in proc.stderr
