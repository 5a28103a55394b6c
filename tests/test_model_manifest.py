"""The manifest's rules, source resolution, and how model provisioning enters the worker state."""

from __future__ import annotations

import pytest

from api.modelstore import ManifestError, When, load_manifest, parse_entries
from api.modelstore.sources import HttpSource, S3Source, resolve
from config import load_settings
from supervisor.children.child import ChildState
from supervisor.state import ChildView, Inputs, Level, Verdict, WorkerState, derive

SHA = "ab" * 32


def one(**table):
    return parse_entries([{"path": "checkpoints/a.safetensors", **table}], "models.files")[0]


def test_entry_defaults_and_name():
    entry = one(url="https://h/a.safetensors", sha256=SHA.upper())
    assert entry.when is When.BEFORE_READY and entry.sha256 == SHA and entry.name == "a"


@pytest.mark.parametrize("table, words", [
    ({"url": "ftp://h/x"}, "models.files[0].url: must start with"),
    ({"url": "https://h/x", "path": "/etc/passwd"}, "models.files[0].path"),
    ({"url": "https://h/x", "path": "checkpoints/../../x"}, "without '..'"),
    ({"url": "https://h/x", "path": "x.safetensors"}, "inside a subfolder"),
    ({"url": "https://h/x", "sha256": "123"}, "models.files[0].sha256: expected 64 hex"),
    ({"url": "https://h/x", "when": "later"}, "before_ready or background"),
    ({"url": "https://h/x", "auth_env": "Bearer abc"}, "never the secret itself"),
    ({"url": "https://h/x", "colour": "red"}, "unknown field(s) colour"),
])
def test_bad_entries_name_the_entry_and_the_field(table, words):
    with pytest.raises(ManifestError) as caught:
        parse_entries([{"path": "checkpoints/a.safetensors", **table}], "models.files")
    assert words in str(caught.value)


def test_manifest_file_and_settings_are_joined_and_paths_are_unique(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text('[[models.files]]\nurl = "https://h/a"\npath = "loras/a.safetensors"\n'
                      'when = "background"\n')
    extra = tmp_path / "manifest.toml"
    extra.write_text('[[models]]\nurl = "hf://org/repo/b.safetensors"\n'
                     'path = "checkpoints/b.safetensors"\n')
    settings = load_settings(config, environ={"MODELS_MANIFEST": str(extra)})
    entries = load_manifest(settings)
    assert [e.path for e in entries] == ["loras/a.safetensors", "checkpoints/b.safetensors"]
    assert entries[0].when is When.BACKGROUND
    extra.write_text('[[models]]\nurl = "https://h/c"\npath = "loras/a.safetensors"\n')
    with pytest.raises(ManifestError) as caught:
        load_manifest(settings)
    assert "is also the path of models.files[0]" in str(caught.value)


def test_sources_resolve_with_their_credentials():
    hf = resolve(one(url="hf://org/repo/sub/a.safetensors@rev1"),
                 {"HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://mirror:9"})
    assert isinstance(hf, HttpSource)
    assert hf.url == "http://mirror:9/org/repo/resolve/rev1/sub/a.safetensors"
    assert hf.headers == {"Authorization": "Bearer hf_x"} and hf.auth_host == "mirror"
    plain = resolve(one(url="https://other/a.safetensors"), {"HF_TOKEN": "hf_x"})
    assert plain.headers == {}  # the Hugging Face token goes to Hugging Face only
    civitai = resolve(one(url="https://c/a?x=1", auth_env="TOK", auth_header="X-Key"),
                      {"TOK": "abc"})
    assert civitai.headers == {"X-Key": "abc"} and "abc" not in civitai.shown
    with pytest.raises(ManifestError) as caught:
        resolve(one(url="https://c/a", auth_env="TOK"), {})
    assert "TOK is not set" in str(caught.value)
    s3 = resolve(one(url="s3://bucket/dir/a.safetensors"), {}, None)
    assert isinstance(s3, S3Source) and (s3.bucket, s3.key) == ("bucket", "dir/a.safetensors")
    with pytest.raises(ManifestError):
        resolve(one(url="s3://bucket/a", endpoint_url="http://minio:9000"), {})


def _children(state=ChildState.READY):
    return (ChildView("ComfyUI", state, "", False), ChildView("the wrapper", state, "", False))


def test_provisioning_comes_before_starting_and_benchmarking():
    state, reason = derive(Inputs(children=_children(ChildState.STARTING),
                                  provisioning="downloading 1 of 2 models: a 1.0/2.0 GB",
                                  benchmark_pending=True))
    assert state is WorkerState.PROVISIONING and reason.startswith("downloading 1 of 2")
    failing = Verdict(Level.UNHEALTHY, ("model checkpoints/a failed 1 time(s): HTTP 404",))
    state, reason = derive(Inputs(children=_children(), models=failing, provisioning="x"))
    assert state is WorkerState.UNHEALTHY and "HTTP 404" in reason
    state, _ = derive(Inputs(children=_children(), benchmark_pending=True))
    assert state is WorkerState.BENCHMARKING


def test_daemon_refuses_a_manifest_when_the_models_folder_cannot_be_right(tmp_path):
    from supervisor.daemon.wiring import WiringError, build_components

    settings = load_settings(None, environ={
        "MODELS": '[{"url": "https://h/a", "path": "checkpoints/a.safetensors"}]',
        "COMFYUI_INSTALL_PATH": str(tmp_path / "nowhere" / "ComfyUI"),
        "WORKER_STATE_DIR": str(tmp_path / "state"), "GPU_REQUIRED": "false",
        "BENCHMARK_ENABLED": "false", "COMFY_WORKER_CONFIG": ""})
    with pytest.raises(WiringError) as caught:
        build_components(settings, environ={})
    assert "comfyui.models_dir" in str(caught.value)
    assert "comfyui.install_path" in str(caught.value)
