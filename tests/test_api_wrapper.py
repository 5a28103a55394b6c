"""The API wrapper over real HTTP, against the ComfyUI simulator: the request contract end to end.

Every test runs against both ComfyUI API modes the simulator speaks (`api_version`): 0.3.64,
and the newest read (jobs API, canonical prompt ids, assets)."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from simulator.testing import start_simulator
from tests.support.comfy_modes import API_VERSIONS
from tests.support.procs import get_json, post_json, start_wrapper, wait_until
from tests.support.timing import allowance
from tests.support.workflows import tiny_workflow

pytestmark = pytest.mark.real_processes

TINY = tiny_workflow("t", 64, 48)


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def set_knobs(sim, **knobs) -> None:
    post_json(f"{sim.url}/__sim__/knobs", knobs)


@pytest.fixture(scope="module", params=API_VERSIONS,
                ids=[f"comfyui-{v}" for v in API_VERSIONS])
def api_version(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def stack(tmp_path_factory, api_version):
    tmp = tmp_path_factory.mktemp("wrapper")
    with start_simulator(tmp, "--step-seconds", "0.01", api_version=api_version) as sim:
        with start_wrapper(tmp, sim.url, sim.output_dir, API_QUEUE_SIZE="4") as wrapper:
            yield sim, wrapper


def generate(wrapper, body, headers=None, path="/generate/sync"):
    return post_json(wrapper.url + path, body, headers)


# --- success --------------------------------------------------------------------------------------
def test_text2image_modifier_produces_png_of_requested_size(stack):
    sim, wrapper = stack
    status, body = generate(wrapper, {"input": {"modifier": "Text2Image", "modifications": {
        "prompt": "a red bicycle", "width": 256, "height": 192, "steps": 5, "seed": 7}}})
    assert status == 200, body
    assert body["status"] == "completed"
    assert len(body["output"]) == 1
    out = body["output"][0]
    assert out["node_id"] == "9" and out["output_type"] == "images"
    assert out["mimetype"] == "image/png"
    assert Path(out["local_path"]).parent.name == body["id"]
    assert png_size(out["local_path"]) == (256, 192)
    assert body["timings"]["steps"] == 5
    assert body["timings"]["sampling_its"] and body["timings"]["sampling_its"] > 1
    assert body["timings"]["total_ms"] >= body["timings"]["generation_ms"] > 0
    assert body["comfyui_response"] == {}


def test_raw_workflow_modifier_and_cfg_scale_alias(stack):
    _, wrapper = stack
    status, body = generate(wrapper, {"input": {"modifier": "RawWorkflow", "modifications": {
        "prompt": "a lighthouse", "cfg_scale": 6.5, "steps": 3, "width": 128, "height": 128},
        "request_id": "raw-1"}}, headers={"X-Include-ComfyUI-Response": "1"})
    assert status == 200, body
    assert body["id"] == "raw-1"
    (history,) = body["comfyui_response"].values()
    sampler = history["prompt"][2]["3"]["inputs"]
    assert sampler["cfg"] == 6.5 and sampler["steps"] == 3
    assert history["prompt"][2]["6"]["inputs"]["text"] == "a lighthouse"


def test_image2image_with_base64_input(stack, tmp_path):
    sim, wrapper = stack
    status, first = generate(wrapper, {"input": {"workflow_json": TINY}})
    assert status == 200, first
    data = base64.b64encode(Path(first["output"][0]["local_path"]).read_bytes()).decode()
    status, body = generate(wrapper, {"input": {"modifier": "Image2Image", "modifications": {
        "prompt": "same but blue", "input_image": f"data:image/png;base64,{data}",
        "steps": 2}}})
    assert status == 200, body
    assert png_size(body["output"][0]["local_path"]) == (64, 48)
    uploaded = list(Path(sim.input_dir).glob(f"{body['id']}_1.png"))
    assert uploaded, "the input image was uploaded to ComfyUI's input folder"


def test_workflow_json_random_int_placeholder_and_two_outputs(stack):
    _, wrapper = stack
    graph = json.loads(json.dumps(TINY))
    graph["2"]["inputs"]["filename_prefix"] = "run-__RANDOM_INT__"
    graph["3"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                        "filename_prefix": "sub/dir/second"}}
    status, body = generate(wrapper, {"input": {"workflow_json": graph}},
                            headers={"X-Include-ComfyUI-Response": "true"})
    assert status == 200, body
    names = sorted(o["filename"] for o in body["output"])
    assert len(names) == 2
    assert not any("__RANDOM_INT__" in n for n in names)
    assert any(n.startswith("run-") and n.split("-")[1].split("_")[0].isdigit() for n in names)
    sub = [o for o in body["output"] if o["subfolder"]]
    assert sub and sub[0]["subfolder"] == "sub/dir"


def test_each_prompts_socket_to_comfyui_is_closed_once_its_client_is_answered(stack):
    sim, wrapper = stack
    port = int(sim.url.rsplit(":", 1)[1])

    def to_comfyui() -> int:
        return sum(1 for c in psutil.Process(wrapper.process.pid).net_connections("tcp")
                   if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)

    for n in range(5):
        status, body = generate(wrapper, {"input": {"workflow_json": tiny_workflow(f"s{n}", 64, 48)}})
        assert status == 200, body
    # One WebSocket per prompt, closed after its answer: what stays is the HTTP keep-alive
    # connection (and perhaps the last prompt's socket, closing), not one per prompt.
    wait_until(lambda: to_comfyui() <= 2, 5, "the prompts' sockets to close")


def test_base64_outputs_on_request_header(stack):
    _, wrapper = stack
    status, body = generate(wrapper, {"input": {"workflow_json": TINY}},
                            headers={"X-Return-Outputs-As-Base64": "1"})
    assert status == 200
    raw = base64.b64decode(body["output"][0]["data"])
    assert raw == Path(body["output"][0]["local_path"]).read_bytes()


# --- 400s -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,field,words", [
    (b"{not json", "body", "not valid JSON"),
    ({"inputs": {}}, "input", "missing"),
    ({"input": {"modifier": "Text2Image", "workflow_json": TINY}}, "input", "not both"),
    ({"input": {}}, "input", "either modifier"),
    ({"input": {"workflow_json": TINY, "modifications": {"steps": 3}}}, "input.modifications",
     "only allowed together with modifier"),
    ({"input": {"modifier": "Text2Image", "modifications": {"width": "wide"}}},
     "input.modifications.width", "expected an integer"),
    ({"input": {"modifier": "Text2Image", "modifications": {"width": 500}}},
     "input.modifications.width", "not a multiple of 8"),
    ({"input": {"modifier": "Text2Image", "modifications": {"width": 65536}}},
     "input.modifications.width", "above the maximum of 8192"),
    ({"input": {"modifier": "Text2Image", "modifications": {"colour": "red"}}},
     "input.modifications.colour", "unknown key"),
    ({"input": {"workflow_json": {"nodes": [], "links": [], "version": 0.4}}},
     "input.workflow_json", "Export (API)"),
    ({"input": {"workflow_json": TINY, "request_id": "../../etc"}}, "input.request_id",
     "it names a folder"),
])
def test_invalid_requests_get_400_naming_the_field(stack, body, field, words):
    _, wrapper = stack
    status, answer = generate(wrapper, body)
    assert status == 400, answer
    assert field in answer["errors"], answer
    assert words in answer["errors"][field]


def test_unknown_modifier_lists_known_ones(stack):
    _, wrapper = stack
    status, answer = generate(wrapper, {"input": {"modifier": "Txt2Img"}})
    assert status == 400
    message = answer["errors"]["input.modifier"]
    assert "Txt2Img" in message and "Text2Image" in message and "RawWorkflow" in message


def test_comfyui_validation_error_passes_through_intact(stack):
    _, wrapper = stack
    graph = json.loads(json.dumps(TINY))
    graph["1"]["inputs"]["width"] = 0
    status, answer = generate(wrapper, {"input": {"workflow_json": graph}})
    assert status == 400, answer
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    errors = answer["node_errors"]["1"]["errors"]
    assert errors[0]["type"] == "value_smaller_than_min"
    assert answer["node_errors"]["1"]["class_type"] == "EmptyImage"


def test_missing_checkpoint_is_a_400_with_value_not_in_list(stack):
    _, wrapper = stack
    status, answer = generate(wrapper, {"input": {"modifier": "RawWorkflow", "modifications": {
        "ckpt_name": "missing.safetensors", "steps": 1}}})
    assert status == 400
    assert answer["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"


# --- runtime failure, unknown ids -----------------------------------------------------------------
def test_node_failure_at_run_time_is_422_with_node_details(stack):
    sim, wrapper = stack
    graph = json.loads(json.dumps(TINY))
    graph["2"]["inputs"]["filename_prefix"] = "fails"  # a graph ComfyUI has not cached
    set_knobs(sim, fail_node="SaveImage")
    try:
        status, answer = generate(wrapper, {"input": {"workflow_json": graph}})
    finally:
        set_knobs(sim, fail_node=None)
    assert status == 422, answer
    assert answer["status"] == "failed"
    assert answer["error"]["node_id"] == "2" and answer["error"]["node_type"] == "SaveImage"
    assert "SaveImage" in answer["message"]
    # Its folder, made while the prompt ran so that outputs need only be linked, is gone again.
    assert answer["id"] and not (sim.output_dir / answer["id"]).exists()


def test_unknown_result_is_404(stack):
    _, wrapper = stack
    status, answer = get_json(wrapper.url + "/result/nope")
    assert status == 404 and "nope" in answer["error"]


# --- async, duplicates, cancel, SSE ---------------------------------------------------------------
def slow_body(request_id: str, steps: int = 200) -> dict:
    return {"input": {"request_id": request_id, "modifier": "Text2Image",
                      "modifications": {"steps": steps, "width": 64, "height": 64}}}


def test_async_result_duplicate_id_and_cancel_running(stack):
    _, wrapper = stack
    status, accepted = generate(wrapper, slow_body("dup-1"), path="/generate")
    assert status == 202 and accepted["id"] == "dup-1"
    status, again = generate(wrapper, slow_body("dup-1"), path="/generate")
    assert status == 409 and "dup-1" in again["error"]
    wait_until(lambda: get_json(wrapper.url + "/result/dup-1")[1].get("status") == "generating",
               10, "the request to start generating")
    status, _ = post_json(wrapper.url + "/cancel/dup-1", {})
    assert status == 200
    final = wait_until(lambda: (lambda r: r if r[1]["status"] == "cancelled" else None)(
        get_json(wrapper.url + "/result/dup-1")), 10, "cancellation")
    assert final[0] == 499


def test_cancel_a_queued_request(stack):
    _, wrapper = stack
    generate(wrapper, slow_body("q-running"), path="/generate")
    generate(wrapper, slow_body("q-waiting"), path="/generate")
    status, body = post_json(wrapper.url + "/cancel/q-waiting", {})
    assert status == 200 and body["status"] == "cancelled"
    post_json(wrapper.url + "/cancel/q-running", {})
    wait_until(lambda: get_json(wrapper.url + "/result/q-running")[1]["status"] == "cancelled",
               10, "the running one to be cancelled")


def test_stream_sends_queued_progress_and_final_result_in_order(stack):
    _, wrapper = stack
    request = urllib.request.Request(
        wrapper.url + "/generate/stream", method="POST",
        data=json.dumps(slow_body("sse-1", steps=6)).encode(),
        headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        name = None
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[-1] == "final_result"
    progress = [d["progress"] for n, d in events if n == "progress"]
    assert [p["step"] for p in progress][-1] == 6 and progress[-1]["max"] == 6
    assert names.index("progress") < names.index("final_result")
    assert events[-1][1]["result"]["status"] == "completed"


def test_client_disconnect_cancels_its_request(stack):
    _, wrapper = stack
    import socket

    body = json.dumps(slow_body("gone-1", steps=500)).encode()
    host, port = wrapper.url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /generate/sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_until(lambda: get_json(wrapper.url + "/result/gone-1")[1].get("status") == "generating",
               10, "generation to start")
    sock.close()
    wait_until(lambda: get_json(wrapper.url + "/result/gone-1")[1].get("status") == "cancelled",
               10, "the abandoned request to be cancelled")


# --- configurations of their own ------------------------------------------------------------------
def test_queue_full_is_503_with_retry_after(tmp_path, api_version):
    with start_simulator(tmp_path, "--step-seconds", "0.05", api_version=api_version) as sim, \
            start_wrapper(tmp_path, sim.url, sim.output_dir, API_QUEUE_SIZE="1") as wrapper:
        generate(wrapper, slow_body("full-1"), path="/generate")
        wait_until(lambda: get_json(wrapper.url + "/result/full-1")[1].get("status") == "generating",
                   10, "the first to run")
        assert generate(wrapper, slow_body("full-2"), path="/generate")[0] == 202
        req = urllib.request.Request(wrapper.url + "/generate", method="POST",
                                     data=json.dumps(slow_body("full-3")).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 503 and info.value.headers["Retry-After"]


def test_timeout_interrupts_and_answers_504(tmp_path, api_version):
    with start_simulator(tmp_path, "--step-seconds", "0.1", api_version=api_version) as sim, \
            start_wrapper(tmp_path, sim.url, sim.output_dir, API_REQUEST_TIMEOUT="1") as wrapper:
        started = time.monotonic()
        status, body = generate(wrapper, slow_body("slow-1", steps=100))
        assert status == 504 and body["status"] == "timeout"
        assert time.monotonic() - started < 10
        status, body = generate(wrapper, {"input": {"workflow_json": TINY}})
        assert status == 200, "the next request runs normally after the interrupt"


def test_body_over_limit_is_413(tmp_path, api_version):
    with start_simulator(tmp_path, api_version=api_version) as sim, \
            start_wrapper(tmp_path, sim.url, sim.output_dir, API_MAX_BODY_BYTES="2048") as wrapper:
        status, body = generate(wrapper, {"input": {"workflow_json": TINY, "pad": "x" * 5000}})
        assert status == 413 and "2048" in body["error"]


def test_comfyui_killed_mid_request_is_502_within_a_second(tmp_path, api_version):
    with start_simulator(tmp_path, "--step-seconds", "0.05", api_version=api_version) as sim, \
            start_wrapper(tmp_path, sim.url, sim.output_dir) as wrapper:
        result = {}

        def call():
            result["answer"] = generate(wrapper, slow_body("lost-1", steps=400))
            result["at"] = time.monotonic()

        thread = threading.Thread(target=call)
        thread.start()
        wait_until(lambda: get_json(wrapper.url + "/result/lost-1")[1].get("status")
                   == "generating", 10, "generation")
        time.sleep(0.2)
        killed_at = time.monotonic()
        sim.process.kill()
        thread.join(15)
        status, body = result["answer"]
        assert status == 502, body
        assert "ComfyUI" in body["message"]
        assert result["at"] - killed_at < allowance(2.5)


def test_results_survive_a_wrapper_restart(tmp_path, api_version):
    state = tmp_path / "state"
    with start_simulator(tmp_path, api_version=api_version) as sim:
        with start_wrapper(tmp_path, sim.url, sim.output_dir, state_dir=state) as wrapper:
            status, body = generate(wrapper, {"input": {"workflow_json": TINY,
                                                        "request_id": "keep-me"}})
            assert status == 200
        with start_wrapper(tmp_path, sim.url, sim.output_dir, state_dir=state) as wrapper:
            status, again = get_json(wrapper.url + "/result/keep-me")
            assert status == 200 and again["status"] == "completed"
            assert again["output"][0]["local_path"] == body["output"][0]["local_path"]


def test_operator_modifier_file_works_without_code_change(tmp_path, api_version):
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "Invert.json").write_text(json.dumps({
        "name": "InvertSquare",
        "workflow": {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32,
                                                                  "batch_size": 1, "color": 0}},
                     "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                     "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                                 "filename_prefix": "inv"}}},
        "bindings": {"size": {"targets": [["1", "width"], ["1", "height"]], "type": "integer",
                              "minimum": 8, "maximum": 512, "multiple_of": 8}}}))
    with start_simulator(tmp_path, api_version=api_version) as sim, \
            start_wrapper(tmp_path, sim.url, sim.output_dir, API_MODIFIERS_DIR=str(folder)) as w:
        status, body = generate(w, {"input": {"modifier": "InvertSquare",
                                              "modifications": {"size": 96}}})
        assert status == 200, body
        assert png_size(body["output"][0]["local_path"]) == (96, 96)
        status, body = generate(w, {"input": {"modifier": "InvertSquare",
                                              "modifications": {"size": 1024}}})
        assert status == 400 and "maximum of 512" in body["errors"]["input.modifications.size"]


def test_image_inputs_by_url_are_fetched_checked_and_uploaded(stack, tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sim, wrapper = stack
    status, first = generate(wrapper, {"input": {"workflow_json": TINY}})
    png = Path(first["output"][0]["local_path"]).read_bytes()

    class Files(BaseHTTPRequestHandler):
        def do_GET(self):
            body, kind = {"/in.png": (png, "image/png"),
                          "/page.html": (b"<html></html>", "text/html")}.get(
                self.path, (b"", ""))
            self.send_response(200 if body else 404)
            if kind:
                self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, body = generate(wrapper, {"input": {"modifier": "Image2Image", "modifications": {
            "input_image": f"{base}/in.png", "steps": 2}}})
        assert status == 200, body
        assert png_size(body["output"][0]["local_path"]) == (64, 48)
        for path, words in (("/page.html", "content type text/html is not an image"),
                            ("/missing.png", "answered HTTP 404")):
            status, body = generate(wrapper, {"input": {"modifier": "Image2Image",
                                                        "modifications": {
                                                            "input_image": base + path}}})
            assert status == 400, body
            assert words in body["errors"]["input"]
    finally:
        server.shutdown()
        server.server_close()


def test_base64_output_over_the_cap_is_reported_not_truncated(tmp_path, api_version):
    with start_simulator(tmp_path, api_version=api_version) as sim, \
            start_wrapper(tmp_path, sim.url, sim.output_dir, API_BASE64_MAX_BYTES="50") as w:
        status, body = generate(w, {"input": {"workflow_json": TINY,
                                              "return_outputs_as_base64": True}})
        assert status == 200
        out = body["output"][0]
        assert "data" not in out
        assert "over the 50 byte limit" in out["error"]
        assert Path(out["local_path"]).is_file()


# --- ComfyUI's own calls, old and new -------------------------------------------------------------
def history(sim) -> dict:
    return get_json(sim.url + "/history")[1]


def prompts_posted(sim) -> int:
    return sim.log_text().count("got prompt")


def uncached(color: int) -> dict:
    graph = json.loads(json.dumps(TINY))
    graph["1"]["inputs"]["color"] = color
    return graph


@pytest.mark.parametrize("lost", ["late answer", "dropped answer"])
def test_a_post_whose_answer_is_lost_runs_once_and_is_answered_once(tmp_path, api_version, lost):
    """ComfyUI queued the prompt, but its answer to POST /prompt came after the wrapper's
    api.submit_timeout, or never: one look-up by the prompt id the wrapper chose settles it."""
    with start_simulator(tmp_path, "--step-seconds", "0.01", api_version=api_version) as sim, \
            start_wrapper(tmp_path, sim.url, sim.output_dir, API_SUBMIT_TIMEOUT="0.5") as wrapper:
        assert generate(wrapper, {"input": {"workflow_json": uncached(1)}})[0] == 200
        posted, ran = prompts_posted(sim), set(history(sim))
        set_knobs(sim, **({"post_prompt_delay": 2.0} if lost == "late answer"
                          else {"post_prompt_drop": True}))
        try:
            status, body = generate(wrapper, {"input": {"workflow_json": uncached(2),
                                                        "request_id": "lost-answer"}})
        finally:
            set_knobs(sim, post_prompt_delay=0, post_prompt_drop=False)
        assert status == 200 and body["status"] == "completed", body
        assert prompts_posted(sim) == posted + 1, "posted once"
        assert set(history(sim)) - ran == {body["prompt_id"]}, "ran once"
        assert get_json(wrapper.url + "/result/lost-answer")[1]["status"] == "completed"
        assert "but ComfyUI has it" in wrapper.log()


def test_cancel_queued_and_running_prompts_with_the_calls_this_comfyui_has(stack, api_version):
    sim, wrapper = stack
    mark = len(sim.log_text())
    generate(wrapper, slow_body("c-running"), path="/generate")
    wait_until(lambda: get_json(wrapper.url + "/result/c-running")[1].get("status")
               == "generating", 10, "the first to run")
    generate(wrapper, slow_body("c-queued"), path="/generate")

    def handed_ahead():
        prompt_id = get_json(wrapper.url + "/result/c-queued")[1].get("prompt_id")
        pending = [item[1] for item in get_json(sim.url + "/queue")[1]["queue_pending"]]
        return prompt_id if prompt_id in pending else None

    queued_id = wait_until(handed_ahead, 10, "the second in ComfyUI's own queue")
    status, body = post_json(wrapper.url + "/cancel/c-queued", {})
    assert status == 200 and body["status"] == "cancelled"
    pending = [item[1] for item in get_json(sim.url + "/queue")[1]["queue_pending"]]
    assert queued_id not in pending
    running_id = get_json(wrapper.url + "/result/c-running")[1]["prompt_id"]
    assert post_json(wrapper.url + "/cancel/c-running", {})[0] == 200
    final = wait_until(lambda: (lambda r: r if r[1]["status"] == "cancelled" else None)(
        get_json(wrapper.url + "/result/c-running")), 10, "the running one to stop")
    assert final[0] == 499 and final[1]["message"] == "Cancelled while running."
    assert queued_id not in history(sim), "the queued prompt never ran"
    log = sim.log_text()[mark:]
    if api_version == "0.3.64":  # POST /queue {delete}, then POST /interrupt
        assert f"Interrupting prompt {running_id}" in log and "Cancelling" not in log
    else:  # POST /api/jobs/{id}/cancel
        assert f"Cancelling pending prompt {queued_id}" in log
        assert f"Cancelling running prompt {running_id}" in log
        assert "Interrupting prompt" not in log


def test_a_cancel_while_the_prompt_is_being_posted_stops_it(tmp_path, api_version):
    """The wrapper names the prompt before posting it: a cancel that arrives while ComfyUI has
    not answered yet stops it as soon as it does."""
    with start_simulator(tmp_path, "--step-seconds", "0.01", api_version=api_version) as sim, \
            start_wrapper(tmp_path, sim.url, sim.output_dir) as wrapper:
        assert generate(wrapper, {"input": {"workflow_json": uncached(3)}})[0] == 200
        posted = prompts_posted(sim)
        set_knobs(sim, post_prompt_delay=1.0)
        try:
            generate(wrapper, slow_body("mid-post", steps=500), path="/generate")
            wait_until(lambda: prompts_posted(sim) > posted, 10, "the POST to reach ComfyUI")
            assert post_json(wrapper.url + "/cancel/mid-post", {})[0] == 200
            final = wait_until(lambda: (lambda r: r if r[1]["status"] == "cancelled" else None)(
                get_json(wrapper.url + "/result/mid-post")), 15, "the cancel to take effect")
        finally:
            set_knobs(sim, post_prompt_delay=0)
        assert final[0] == 499
        entry = history(sim).get(final[1]["prompt_id"]) or {}
        events = [m[0] for m in (entry.get("status") or {}).get("messages", [])]
        assert "execution_success" not in events, "it did not run to the end"
