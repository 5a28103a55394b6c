"""`comfy-worker models pull` and `models list`, with no daemon, against a local file server."""

from __future__ import annotations

import hashlib
import json
import os

from click.testing import CliRunner

from supervisor.commands.cli import main
from tests.support.fileserver import FileServer

A = os.urandom(2 * 1024 * 1024)
B = os.urandom(1024 * 1024)


def run(args, tmp_path):
    env = {"COMFYUI_MODELS_DIR": str(tmp_path / "models"),
           "WORKER_STATE_DIR": str(tmp_path / "state"), "MODELS_RETRIES": "0",
           "MODELS_BACKOFF_INITIAL": "0.05", "COMFY_WORKER_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    return CliRunner().invoke(main, args, env=env)


def test_pull_fetches_what_it_can_and_list_tells_each_state(tmp_path):
    with FileServer(files={"a.safetensors": A, "b.safetensors": B}) as server:
        manifest = tmp_path / "m.toml"
        manifest.write_text(
            f'[[models]]\nurl = "{server.url}/a.safetensors"\npath = "checkpoints/a.safetensors"\n'
            f'sha256 = "{hashlib.sha256(A).hexdigest()}"\n'
            f'[[models]]\nurl = "{server.url}/b.safetensors"\npath = "loras/b.safetensors"\n'
            f'[[models]]\nurl = "{server.url}/gone.safetensors"\npath = "vae/c.safetensors"\n')
        result = run(["models", "pull", "--manifest", str(manifest)], tmp_path)
        assert result.exit_code == 1, result.output
        assert "checkpoints/a.safetensors" in result.output and "100.0%" in result.output
        assert "FAILED vae/c.safetensors" in result.output and "HTTP 404" in result.output
        assert "2 of 3 model files in place" in result.output
        assert (tmp_path / "models/checkpoints/a.safetensors").read_bytes() == A
        assert (tmp_path / "models/loras/b.safetensors").read_bytes() == B

        result = run(["models", "list", "--manifest", str(manifest), "--json"], tmp_path)
        assert result.exit_code == 1
        states = {m["path"]: m["state"] for m in json.loads(result.output)["models"]}
        assert states == {"checkpoints/a.safetensors": "verified",
                          "loras/b.safetensors": "present", "vae/c.safetensors": "missing"}
        table = run(["models", "list", "--manifest", str(manifest)], tmp_path).output
        assert "verified" in table and "missing" in table

        seen = len(server.seen)
        server.files["gone.safetensors"] = B
        result = run(["models", "pull", "--manifest", str(manifest)], tmp_path)
        assert result.exit_code == 0, result.output
        assert len(server.seen) == seen + 1  # only the missing file was fetched


def test_bad_manifest_is_exit_2_naming_the_field(tmp_path):
    manifest = tmp_path / "m.toml"
    manifest.write_text('[[models]]\nurl = "https://h/a"\npath = "/abs/a.safetensors"\n')
    result = run(["models", "pull", "--manifest", str(manifest)], tmp_path)
    assert result.exit_code == 2
    assert "[0].path" in result.output


def test_config_check_validates_the_manifest_entries(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text('[[models.files]]\nurl = "https://h/a"\npath = "checkpoints/a.safetensors"\n'
                      'when = "soon"\n')
    result = CliRunner().invoke(main, ["config", "check", str(config)])
    assert result.exit_code == 2
    assert "models.files[0].when: expected before_ready or background" in result.output
