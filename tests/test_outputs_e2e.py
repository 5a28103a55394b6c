"""S3 uploads and webhooks through the real wrapper process: what a client of the API sees."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from simulator.testing import start_simulator
from tests.support.comfy_modes import API_VERSIONS
from tests.support.moto_server import REGION
from tests.support.procs import free_port, post_json, start_wrapper, wait_until
from tests.support.workflows import tiny_workflow

pytestmark = pytest.mark.real_processes

SECRET = "hook-secret-123"


def tiny(prefix: str) -> dict:
    return tiny_workflow(prefix, 40, 24, color=7)


class Hooks:
    """A webhook receiver in a thread: records bodies and headers, answers from a script."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.hits: list[tuple[dict, bytes]] = []
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(outer.delay)
                outer.hits.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module", params=API_VERSIONS,
                ids=[f"comfyui-{v}" for v in API_VERSIONS])
def api_version(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def stack(tmp_path_factory, moto_server, api_version):  # noqa: F811
    bucket = f"outputs-{api_version.replace('.', '-')}"
    moto_server.create_bucket(bucket)
    tmp = tmp_path_factory.mktemp("outputs")
    env = {"S3_ACCESS_KEY_ID": "env-key-id-999", "S3_SECRET_ACCESS_KEY": "env-secret-777",
           "S3_ENDPOINT_URL": moto_server.endpoint_url, "S3_REGION": REGION,
           "S3_BUCKET_NAME": bucket, "S3_RETRIES": "0", "WEBHOOK_BACKOFF_INITIAL": "0.1"}
    with start_simulator(tmp, "--step-seconds", "0.01", api_version=api_version) as sim, \
            start_wrapper(tmp, sim.url, sim.output_dir, **env) as wrapper:
        yield sim, wrapper, moto_server


def test_presigned_url_downloads_the_same_bytes(stack, api_version):
    _, wrapper, _ = stack
    status, body = post_json(wrapper.url + "/generate/sync",
                             {"input": {"workflow_json": tiny("s3ok"), "request_id": "s3-ok"}})
    assert status == 200 and body["status"] == "completed", body
    out = body["output"][0]
    assert "upload_error" not in out
    with urllib.request.urlopen(out["url"], timeout=10) as response:
        assert response.read() == Path(out["local_path"]).read_bytes()
        assert response.headers["Content-Type"] == "image/png"
    assert f"/outputs-{api_version.replace('.', '-')}/s3-ok/{out['filename']}" in out["url"]


def test_missing_bucket_keeps_the_file_and_says_why(stack):
    _, wrapper, _ = stack
    status, body = post_json(wrapper.url + "/generate/sync", {"input": {
        "workflow_json": tiny("nobucket"), "s3": {"bucket_name": "no-such-bucket"}}})
    assert status == 200 and body["status"] == "completed"
    out = body["output"][0]
    assert "url" not in out and "no-such-bucket" in out["upload_error"]
    assert "does not exist" in out["upload_error"]
    assert Path(out["local_path"]).is_file()
    assert "upload(s) failed" in body["message"]


def test_request_fields_override_the_environment_and_secrets_stay_out_of_logs(stack,
                                                                            api_version):
    _, wrapper, moto = stack
    bucket = f"per-request-{api_version.replace('.', '-')}"
    moto.create_bucket(bucket)
    status, body = post_json(wrapper.url + "/generate/sync", {"input": {
        "workflow_json": tiny("override"), "s3": {"bucket_name": bucket}}})
    assert status == 200
    assert f"/{bucket}/" in body["output"][0]["url"]
    keys = [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"{body['id']}/{body['output'][0]['filename']}"]
    log = wrapper.log()
    assert "env-secret-777" not in log and "env-key-id-999" not in log


def test_request_choosing_its_endpoint_must_bring_its_own_keys(stack):
    _, wrapper, _ = stack
    status, body = post_json(wrapper.url + "/generate/sync", {"input": {
        "workflow_json": tiny("endpoint"), "s3": {"endpoint_url": "http://127.0.0.1:9"}}})
    assert status == 400
    assert "own access_key_id" in body["errors"]["input.s3.endpoint_url"]


def test_unreachable_endpoint_is_an_upload_error(stack):
    _, wrapper, _ = stack
    status, body = post_json(wrapper.url + "/generate/sync", {"input": {
        "workflow_json": tiny("down"),
        "s3": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "access_key_id": "a",
               "secret_access_key": "b", "bucket_name": "x"}}}, timeout=120)
    assert status == 200
    assert "unreachable" in body["output"][0]["upload_error"]


def test_signed_webhook_with_extra_params_does_not_delay_the_answer(stack):
    _, wrapper, _ = stack
    hooks = Hooks()
    hooks.delay = 3.0
    try:
        status, body = post_json(wrapper.url + "/generate/sync", {"input": {
            "workflow_json": tiny("hook"), "webhook": {
                "url": hooks.url, "secret": SECRET, "extra_params": {"user_id": "12345"}}}})
        assert status == 200
        # The receiver records a hit only after holding it for 3 s: none yet means the answer
        # came while the webhook was still being delivered.
        assert not hooks.hits, "the answer waited for the webhook"
        wait_until(lambda: hooks.hits, 15, "the webhook")
        headers, raw = hooks.hits[0]
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        assert headers["X-Webhook-Signature"] == expected
        sent = json.loads(raw)
        assert sent["id"] == body["id"] and sent["status"] == "completed"
        assert sent["extra"] == {"user_id": "12345"}
        assert sent["output"][0]["url"] == body["output"][0]["url"]
        assert set(sent) == {"id", "status", "message", "output", "timings", "extra"}
    finally:
        hooks.close()


def test_failed_requests_are_sent_too(stack):
    sim, wrapper, _ = stack
    hooks = Hooks()
    try:
        graph = tiny("fails")
        sim.set_knobs(fail_node="SaveImage")
        try:
            status, _ = post_json(wrapper.url + "/generate/sync", {"input": {
                "workflow_json": graph, "webhook": {"url": hooks.url}}})
        finally:
            sim.set_knobs(fail_node=None)
        assert status == 422
        wait_until(lambda: hooks.hits, 10, "the webhook")
        assert json.loads(hooks.hits[0][1])["status"] == "failed"
    finally:
        hooks.close()


def wrapper_figures(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_wrapper_metrics_count_uploads_webhooks_and_stages(stack):
    _, wrapper, _ = stack
    hooks = Hooks()
    uploaded = ("comfy_worker_uploads_total", (("result", "uploaded"),))
    failed = ("comfy_worker_uploads_total", (("result", "failed"),))
    delivered = ("comfy_worker_webhook_deliveries_total", (("result", "delivered"),))
    upload_stage = ("comfy_worker_stage_duration_seconds_count", (("stage", "upload"),))
    generation = ("comfy_worker_stage_duration_seconds_count", (("stage", "generation"),))
    completed = ("comfy_worker_jobs_total", (("outcome", "completed"),))
    try:
        before = wrapper_figures(wrapper.url)
        assert post_json(wrapper.url + "/generate/sync", {"input": {
            "workflow_json": tiny("metrics-ok"), "webhook": {"url": hooks.url}}})[0] == 200
        assert post_json(wrapper.url + "/generate/sync", {"input": {
            "workflow_json": tiny("metrics-nobucket"),
            "s3": {"bucket_name": "no-such-bucket"}}})[0] == 200
        wait_until(lambda: wrapper_figures(wrapper.url)[delivered] > before[delivered], 15,
                   "the delivered webhook counted")
        after = wrapper_figures(wrapper.url)
    finally:
        hooks.close()
    assert after[uploaded] == before[uploaded] + 1
    assert after[failed] == before[failed] + 1
    assert after[upload_stage] == before[upload_stage] + 2
    assert after[generation] == before[generation] + 2
    assert after[completed] == before[completed] + 2
    assert after[("comfy_worker_webhook_spool_deliveries", ())] == 0


def test_undelivered_webhook_survives_a_wrapper_restart(tmp_path, api_version):
    port = free_port()
    state = tmp_path / "state"
    env = {"WEBHOOK_URL": f"http://127.0.0.1:{port}/hook", "WEBHOOK_BACKOFF_INITIAL": "30"}
    with start_simulator(tmp_path, api_version=api_version) as sim:
        with start_wrapper(tmp_path, sim.url, sim.output_dir, state_dir=state, **env) as w:
            status, body = post_json(w.url + "/generate/sync",
                                     {"input": {"workflow_json": tiny("spool")}})
            assert status == 200
            wait_until(lambda: list((state / "webhooks").glob("*")), 10, "a spooled delivery")
        hooks = Hooks(port)  # the receiver comes up only now
        try:
            with start_wrapper(tmp_path, sim.url, sim.output_dir, state_dir=state, **env):
                wait_until(lambda: hooks.hits, 20, "the delivery after the restart")
                assert json.loads(hooks.hits[0][1])["id"] == body["id"]
        finally:
            hooks.close()
