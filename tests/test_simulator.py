"""The ComfyUI simulator, driven as a real process over real HTTP and WebSocket."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import struct
import time
import uuid
import zlib
from typing import Any

import aiohttp
import pytest

from simulator.images import read_image_info, read_png_text, write_png
from simulator.testing import (
    SimulatorHandle,
    launch_simulator,
    start_simulator,
    stop_process,
    wait_ready,
)
from tests.support.timing import allowance

pytestmark = pytest.mark.timeout(60)

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


def text_to_image(steps: int = 3, seed: int = 1, ckpt: str = CHECKPOINT, prefix: str = "t2i") -> dict[str, Any]:
    """ComfyUI's default API example graph."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red barn", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def empty_to_save(width: int = 64, height: int = 32, color: int = 0xFF0000, prefix: str = "ComfyUI") -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1,
                                                      "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    # ComfyUI flags the simulator does not model must be accepted.
    with start_simulator(tmp_path_factory.mktemp("sim"), "--step-seconds", "0.01", "--cpu",
                         "--disable-auto-launch", "--preview-method", "auto") as handle:
        yield handle


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


@pytest.fixture
async def knobs(sim: SimulatorHandle, http: aiohttp.ClientSession):
    """Change knobs for one test; the original values come back afterwards."""
    original = await (await http.get(f"{sim.url}/__sim__/knobs")).json()
    runtime = {k: v for k, v in original.items() if k not in ("startup_delay", "crash_at_start")}

    async def change(**values: Any) -> dict[str, Any]:
        response = await http.post(f"{sim.url}/__sim__/knobs", json=values)
        assert response.status == 200, await response.text()
        return (await response.json())["knobs"]

    yield change
    await http.post(f"{sim.url}/__sim__/knobs", json=runtime)


class Run:
    """One prompt followed over its own WebSocket."""

    def __init__(self, client_id: str, prompt_id: str, status: int, body: dict[str, Any],
                 events: list[dict[str, Any]]):
        self.client_id, self.prompt_id, self.status, self.body, self.events = client_id, prompt_id, status, body, events

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["type"] == kind]


async def collect_until_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str,
                             events: list[dict[str, Any]], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        message = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        assert message.type == aiohttp.WSMsgType.TEXT, message
        event = json.loads(message.data)
        events.append(event)
        data = event["data"]
        if event["type"] == "executing" and data["node"] is None and data.get("prompt_id") == prompt_id:
            return


async def run_prompt(http: aiohttp.ClientSession, sim: SimulatorHandle, prompt: dict[str, Any],
                     client_id: str | None = None) -> Run:
    client_id = client_id or uuid.uuid4().hex
    async with http.ws_connect(f"{sim.ws_url}?clientId={client_id}") as ws:
        hello = json.loads((await ws.receive(timeout=5)).data)
        assert hello["type"] == "status" and hello["data"]["sid"] == client_id
        response = await http.post(f"{sim.url}/prompt", json={"prompt": prompt, "client_id": client_id})
        body = await response.json()
        events: list[dict[str, Any]] = []
        if response.status == 200:
            await collect_until_done(ws, body["prompt_id"], events)
        return Run(client_id, body.get("prompt_id", ""), response.status, body, events)


async def history(http: aiohttp.ClientSession, sim: SimulatorHandle, prompt_id: str) -> dict[str, Any]:
    return (await (await http.get(f"{sim.url}/history/{prompt_id}")).json())[prompt_id]


def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = (b"\x00" + bytes(rgb) * width) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# --- a successful prompt -------------------------------------------------------------------

@pytest.mark.real_processes
async def test_empty_image_to_save_image_follows_comfyui_event_order(sim, http):
    other_client = uuid.uuid4().hex
    async with http.ws_connect(f"{sim.ws_url}?clientId={other_client}") as bystander:
        run = await run_prompt(http, sim, empty_to_save(prefix="order/img"))
        await asyncio.sleep(0.05)
        seen_by_other = []
        while not bystander.closed:
            try:
                seen_by_other.append(json.loads((await bystander.receive(timeout=0.1)).data)["type"])
            except asyncio.TimeoutError:
                break

    assert run.status == 200 and run.body["node_errors"] == {} and isinstance(run.body["number"], int)
    assert run.types() == [
        "status", "status", "execution_start", "execution_cached",
        "progress_state", "executing", "progress_state",
        "progress_state", "executing", "executed", "progress_state",
        "execution_success", "status", "executing",
    ]
    assert [e["node"] for e in run.of("executing")] == ["1", "2", None]
    assert run.of("execution_cached")[0]["nodes"] == []
    image = {"filename": "img_00001_.png", "subfolder": "order", "type": "output"}
    assert run.of("executed") == [{"node": "2", "display_node": "2", "output": {"images": [image]},
                                   "prompt_id": run.prompt_id}]
    # Execution events go only to the submitting client; queue status is broadcast.
    assert set(seen_by_other) == {"status"}

    entry = await history(http, sim, run.prompt_id)
    assert entry["outputs"] == {"2": {"images": [image]}}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                           "execution_success"]
    assert entry["prompt"][1:2] == [run.prompt_id]
    assert entry["prompt"][3:] == [{"client_id": run.client_id}, ["2"]]

    saved = sim.output_dir / "order" / "img_00001_.png"
    info = read_image_info(str(saved))
    assert (info.width, info.height, info.rgb) == (64, 32, (255, 0, 0))
    assert json.loads(read_png_text(str(saved))["prompt"])["1"]["class_type"] == "EmptyImage"

    view = await http.get(f"{sim.url}/view", params={"filename": "img_00001_.png", "subfolder": "order",
                                                     "type": "output"})
    assert view.status == 200 and view.headers["Content-Type"] == "image/png"
    assert await view.read() == saved.read_bytes()


@pytest.mark.real_processes
async def test_text_to_image_reports_each_sampler_step_and_decodes_at_latent_size(sim, http):
    run = await run_prompt(http, sim, text_to_image(steps=4, seed=11, prefix="t2i/steps"))
    assert run.status == 200
    assert [e["node"] for e in run.of("executing")] == ["4", "5", "7", "6", "3", "8", "9", None]
    assert run.of("progress") == [{"value": i, "max": 4, "prompt_id": run.prompt_id, "node": "3"}
                                  for i in range(1, 5)]
    sampler_states = [e["nodes"]["3"]["state"] for e in run.of("progress_state") if "3" in e["nodes"]]
    assert sampler_states[0] == "running" and sampler_states[-1] == "finished"
    info = read_image_info(str(sim.output_dir / "t2i" / "steps_00001_.png"))
    assert (info.width, info.height) == (128, 64)


@pytest.mark.real_processes
async def test_identical_prompt_is_served_from_cache_and_a_new_one_counts_up(sim, http):
    first = await run_prompt(http, sim, empty_to_save(color=0x00FF00, prefix="cache/img"))
    again = await run_prompt(http, sim, empty_to_save(color=0x00FF00, prefix="cache/img"))
    assert again.of("execution_cached")[0]["nodes"] == ["1", "2"]
    assert [e["node"] for e in again.of("executing")] == [None]
    assert again.of("executed")[0]["output"] == first.of("executed")[0]["output"]
    changed = await run_prompt(http, sim, empty_to_save(color=0x0000FF, prefix="cache/img"))
    assert changed.of("executed")[0]["output"]["images"][0]["filename"] == "img_00002_.png"
    assert sorted(p.name for p in (sim.output_dir / "cache").iterdir()) == ["img_00001_.png", "img_00002_.png"]


@pytest.mark.real_processes
async def test_save_latent_and_preview_image_outputs(sim, http):
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "latents/sim"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    run = await run_prompt(http, sim, prompt)
    outputs = (await history(http, sim, run.prompt_id))["outputs"]
    assert outputs["2"] == {"latents": [{"filename": "sim_00001_.latent", "subfolder": "latents", "type": "output"}]}
    latent = (sim.output_dir / "latents" / "sim_00001_.latent").read_bytes()
    header = json.loads(latent[8:8 + struct.unpack("<Q", latent[:8])[0]])
    assert header["latent_tensor"]["shape"] == [2, 4, 8, 8]
    preview = outputs["4"]["images"][0]
    assert preview["type"] == "temp" and preview["filename"].startswith("ComfyUI_temp_")
    view = await http.get(f"{sim.url}/api/view", params={"filename": preview["filename"], "type": "temp"})
    assert view.status == 200


# --- validation errors -----------------------------------------------------------------------

def with_input(prompt: dict[str, Any], node: str, name: str, value: Any) -> dict[str, Any]:
    prompt = copy.deepcopy(prompt)
    prompt[node]["inputs"][name] = value
    return prompt


NODE_ERROR_CASES = {
    "value_smaller_than_min": (with_input(empty_to_save(), "1", "width", 0), "1", "Value 0 smaller than min of 1",
                               "width"),
    "value_bigger_than_max": (with_input(empty_to_save(), "1", "height", 20000), "1",
                              "Value 20000 bigger than max of 16384", "height"),
    "invalid_input_type": (with_input(empty_to_save(), "1", "width", "wide"), "1",
                           "Failed to convert an input value to a INT value",
                           "width, wide, invalid literal for int() with base 10: 'wide'"),
    "required_input_missing": ({"1": empty_to_save()["1"], "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}},
                               "2",
                               "Required input is missing", "images"),
    "value_not_in_list": (text_to_image(ckpt="sdxl.safetensors"), "4", "Value not in list",
                          f"ckpt_name: 'sdxl.safetensors' not in ['{CHECKPOINT}']"),
    "exception_during_validation": (with_input(empty_to_save(), "2", "images", ["99", 0]), "2",
                                    "Exception when validating node", "'99'"),
    "exception_during_inner_validation": (
        {**empty_to_save(), "3": {"class_type": "ImageInvert", "inputs": {"image": ["99", 0]}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}},
        "3", "Exception when validating inner node", "'99'"),
    "return_type_mismatch": (
        {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}},
        "2", "Return type mismatch between linked nodes", "images, received_type(LATENT) mismatch input_type(IMAGE)"),
    "custom_validation_failed": (
        {"1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}},
        "1", "Custom validation failed for node", "image - Invalid image file: nope.png"),
}


@pytest.mark.real_processes
@pytest.mark.parametrize("kind", sorted(NODE_ERROR_CASES))
async def test_node_validation_errors_have_comfyui_shape(sim, http, kind):
    prompt, node_id, message, details = NODE_ERROR_CASES[kind]
    response = await http.post(f"{sim.url}/prompt", json={"prompt": prompt, "client_id": "v"})
    assert response.status == 400
    body = await response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["error"]["message"] == "Prompt outputs failed validation"
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    assert list(body["node_errors"]) == [node_id]
    node_error = body["node_errors"][node_id]
    assert node_error["class_type"] == prompt[node_id]["class_type"]
    assert node_error["dependent_outputs"] == [next(k for k, v in prompt.items()
                                                    if v["class_type"] == "SaveImage")]
    [error] = node_error["errors"]
    assert (error["type"], error["message"], error["details"]) == (kind, message, details)


@pytest.mark.real_processes
async def test_min_error_carries_input_config_and_received_value(sim, http):
    response = await http.post(f"{sim.url}/prompt", json={"prompt": with_input(empty_to_save(), "1", "width", 0)})
    error = (await response.json())["node_errors"]["1"]["errors"][0]
    assert error["extra_info"] == {"input_name": "width", "received_value": 0, "input_config": [
        "INT", {"default": 512, "min": 1, "max": 16384, "step": 1}]}


@pytest.mark.parametrize("payload, error", [
    ({"client_id": "x"}, {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                          "extra_info": {}}),
    ({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}},
     {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNode does not exist.",
      "details": "Node ID '#1'", "extra_info": {}}),
    ({"prompt": {"7": {"inputs": {}}}},
     {"type": "invalid_prompt", "message": "Cannot execute because a node is missing the class_type property.",
      "details": "Node ID '#7'", "extra_info": {}}),
    ({"prompt": {"1": empty_to_save()["1"]}},
     {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}),
])
@pytest.mark.real_processes
async def test_prompt_level_errors_are_exact(sim, http, payload, error):
    response = await http.post(f"{sim.url}/api/prompt", json=payload)
    assert response.status == 400
    assert await response.json() == {"error": error, "node_errors": {}}


@pytest.mark.real_processes
async def test_body_that_is_not_json_is_a_plain_500(sim, http):
    response = await http.post(f"{sim.url}/prompt", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 500
    assert response.content_type == "text/plain"


@pytest.mark.real_processes
async def test_one_bad_output_of_two_still_queues_the_good_one(sim, http):
    prompt = {**empty_to_save(prefix="partial/ok"),
              "3": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "partial/bad"}}}
    run = await run_prompt(http, sim, prompt)
    assert run.status == 200
    assert run.body["node_errors"]["3"]["dependent_outputs"] == ["4"]
    assert run.of("execution_success") and (sim.output_dir / "partial" / "ok_00001_.png").exists()
    assert not (sim.output_dir / "partial" / "bad_00001_.png").exists()


# --- failures and control -------------------------------------------------------------------

@pytest.mark.real_processes
async def test_runtime_failure_sends_execution_error_and_records_it(sim, http, knobs):
    await knobs(fail_node="ImageInvert")
    prompt = {**empty_to_save(color=0x123456), "3": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "fail/x"}}}
    run = await run_prompt(http, sim, prompt)
    assert run.types()[-3:] == ["execution_error", "status", "executing"]
    assert "execution_success" not in run.types()
    [error] = run.of("execution_error")
    assert error["node_id"] == "3" and error["node_type"] == "ImageInvert" and error["executed"] == ["1"]
    assert error["exception_type"] == "RuntimeError"
    assert error["exception_message"].startswith("Simulated failure in ImageInvert")
    assert isinstance(error["traceback"], list) and error["traceback"]
    assert list(error["current_inputs"]) == ["image"] and sorted(error["current_outputs"]) == ["1", "2", "3"]
    assert {"prompt_id", "timestamp"} <= set(error)
    status = (await history(http, sim, run.prompt_id))["status"]
    assert (status["status_str"], status["completed"]) == ("error", False)
    assert status["messages"][-1][0] == "execution_error"
    assert not (sim.output_dir / "fail").exists()


@pytest.mark.real_processes
async def test_interrupt_stops_the_running_prompt_at_the_next_step(sim, http, knobs):
    await knobs(step_seconds=0.05)
    client_id = uuid.uuid4().hex
    async with http.ws_connect(f"{sim.ws_url}?clientId={client_id}") as ws:
        await ws.receive(timeout=5)
        response = await http.post(f"{sim.url}/prompt", json={"prompt": text_to_image(steps=200, seed=99),
                                                               "client_id": client_id})
        prompt_id = (await response.json())["prompt_id"]
        events: list[dict[str, Any]] = []
        while not any(e["type"] == "progress" for e in events):
            events.append(json.loads((await ws.receive(timeout=5)).data))
        # Another prompt's id leaves it running.
        assert (await http.post(f"{sim.url}/interrupt", json={"prompt_id": "someone-else"})).status == 200
        await asyncio.sleep(0.15)
        asked = time.monotonic()
        assert (await http.post(f"{sim.url}/interrupt", json={"prompt_id": prompt_id})).status == 200
        await collect_until_done(ws, prompt_id, events)
        stopped_after = time.monotonic() - asked
    progress = [e["data"]["value"] for e in events if e["type"] == "progress"]
    assert len(progress) >= 3 and progress[-1] < 200
    assert stopped_after < allowance(1.0)
    types = [e["type"] for e in events]
    assert types[-3:] == ["execution_interrupted", "status", "executing"]
    interrupted = events[-3]["data"]
    assert (interrupted["node_id"], interrupted["node_type"]) == ("3", "KSampler")
    assert sorted(interrupted["executed"]) == ["4", "5", "6", "7"]
    status = (await history(http, sim, prompt_id))["status"]
    assert status["status_str"] == "error" and status["messages"][-1][0] == "execution_interrupted"


@pytest.mark.real_processes
async def test_prompts_run_one_at_a_time_in_queue_order(sim, http, knobs):
    await knobs(step_seconds=0.03)
    client_id = uuid.uuid4().hex
    async with http.ws_connect(f"{sim.ws_url}?clientId={client_id}") as ws:
        await ws.receive(timeout=5)
        ids = []
        for seed in (1001, 1002, 1003):
            response = await http.post(f"{sim.url}/prompt", json={"prompt": text_to_image(steps=20, seed=seed),
                                                                   "client_id": client_id})
            ids.append((await response.json())["prompt_id"])
        queue = await (await http.get(f"{sim.url}/queue")).json()
        assert [item[1] for item in queue["queue_running"]] == [ids[0]]
        assert [item[1] for item in queue["queue_pending"]] == ids[1:]
        assert queue["queue_running"][0][3] == {"client_id": client_id}
        assert (await http.post(f"{sim.url}/queue", json={"delete": [ids[2]]})).status == 200
        events: list[dict[str, Any]] = []
        await collect_until_done(ws, ids[1], events, timeout=20)
    order = [(e["type"], e["data"]["prompt_id"]) for e in events
             if e["type"] in ("execution_start", "execution_success")]
    assert order == [("execution_start", ids[0]), ("execution_success", ids[0]),
                     ("execution_start", ids[1]), ("execution_success", ids[1])]
    assert (await (await http.get(f"{sim.url}/history/{ids[2]}")).json()) == {}
    queue = await (await http.get(f"{sim.url}/api/queue")).json()
    assert queue == {"queue_running": [], "queue_pending": []}


# --- files -----------------------------------------------------------------------------------

async def upload(http: aiohttp.ClientSession, sim: SimulatorHandle, name: str, content: bytes,
                 **fields: str) -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    form.add_field("image", content, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    return await http.post(f"{sim.url}/upload/image", data=form)


@pytest.mark.real_processes
async def test_upload_renames_on_clash_and_load_image_reads_the_size(sim, http):
    red, blue = png_bytes(40, 30, (255, 0, 0)), png_bytes(20, 10, (0, 0, 255))
    first = await upload(http, sim, "pic.png", red)
    assert (first.status, await first.json()) == (200, {"name": "pic.png", "subfolder": "", "type": "input"})
    assert (await (await upload(http, sim, "pic.png", blue)).json())["name"] == "pic (1).png"
    assert (await (await upload(http, sim, "pic.png", red)).json())["name"] == "pic.png"  # same bytes: reused
    in_sub = await (await upload(http, sim, "pic.png", blue, subfolder="sub", overwrite="true")).json()
    assert in_sub == {"name": "pic.png", "subfolder": "sub", "type": "input"}
    assert (sim.input_dir / "pic (1).png").read_bytes() == blue

    listed = await (await http.get(f"{sim.url}/object_info/LoadImage")).json()
    assert {"pic.png", "pic (1).png"} <= set(listed["LoadImage"]["input"]["required"]["image"][0])

    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "pic (1).png"}},
              "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                           "width": 40, "height": 0, "crop": "disabled"}},
              "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "loaded/x"}}}
    run = await run_prompt(http, sim, prompt)
    assert run.of("execution_success"), run.events
    info = read_image_info(str(sim.output_dir / "loaded" / "x_00001_.png"))
    assert (info.width, info.height, info.rgb) == (40, 20, (255, 255, 0))


@pytest.mark.parametrize("params, status", [
    ({"filename": "pic.png", "type": "input"}, 200),
    ({"filename": "pic.png", "subfolder": "sub", "type": "input"}, 200),
    ({"filename": "missing.png", "type": "input"}, 404),
    ({"type": "input"}, 404),
    ({"filename": "../secret.png", "type": "input"}, 400),
    ({"filename": "/etc/passwd", "type": "input"}, 400),
    ({"filename": "pic.png", "type": "bogus"}, 400),
    ({"filename": "passwd", "subfolder": "../../../../etc", "type": "input"}, 403),
])
@pytest.mark.real_processes
async def test_view_serves_files_and_refuses_escapes(sim, http, params, status):
    (sim.input_dir / "sub").mkdir(exist_ok=True)
    for path in (sim.input_dir / "pic.png", sim.input_dir / "sub" / "pic.png"):
        if not path.exists():
            write_png(str(path), 2, 2, (1, 2, 3))
    response = await http.get(f"{sim.url}/view", params=params)
    assert response.status == status


# --- introspection and knobs -----------------------------------------------------------------

@pytest.mark.real_processes
async def test_object_info_lists_configured_checkpoints_and_follows_the_knob(sim, http, knobs):
    everything = await (await http.get(f"{sim.url}/object_info")).json()
    expected = {"EmptyImage", "SaveImage", "PreviewImage", "LoadImage", "ImageInvert", "ImageScale",
                "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
                "SaveLatent", "VAEEncode", "ImageBlur", "PrimitiveInt", "PrimitiveString"}
    assert expected <= set(everything)
    ksampler = everything["KSampler"]
    assert ksampler["input_order"]["required"][:3] == ["model", "seed", "steps"]
    assert ksampler["output"] == ["LATENT"] and ksampler["output_node"] is False
    assert everything["SaveImage"]["output_node"] is True
    assert everything["SaveImage"]["input"]["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert everything["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [CHECKPOINT]

    await knobs(checkpoints=["b.safetensors", "a.ckpt"])
    one = await (await http.get(f"{sim.url}/api/object_info/CheckpointLoaderSimple")).json()
    assert one["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["a.ckpt", "b.safetensors"]
    assert await (await http.get(f"{sim.url}/object_info/NoSuchNode")).json() == {}


@pytest.mark.real_processes
async def test_system_stats_marks_the_simulator_and_reports_the_device_knob(sim, http, knobs):
    stats = await (await http.get(f"{sim.url}/system_stats")).json()
    assert stats["system"]["simulator"] is True and stats["system"]["comfyui_version"].endswith("-sim")
    assert stats["devices"][0]["type"] == "cpu" and stats["devices"][0]["index"] is None
    await knobs(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", vram_total_mb=81559)
    device = (await (await http.get(f"{sim.url}/api/system_stats")).json())["devices"][0]
    assert (device["type"], device["name"], device["index"]) == ("cuda", "NVIDIA H100 80GB HBM3", 0)
    assert device["vram_total"] == 81559 * 1024 * 1024 and 0 < device["vram_free"] <= device["vram_total"]


@pytest.mark.real_processes
async def test_knobs_are_readable_and_changes_are_validated(sim, http, knobs):
    current = await (await http.get(f"{sim.url}/__sim__/knobs")).json()
    assert current["step_seconds"] == 0.01 and current["checkpoints"] == [CHECKPOINT]
    for bad, knob in (({"step_seconds": -1}, "step_seconds"), ({"no_such_knob": 1}, "no_such_knob"),
                      ({"startup_delay": 3}, "startup_delay"), ({"crash_during_prompt": "SIGNOPE"},
                                                                 "crash_during_prompt")):
        response = await http.post(f"{sim.url}/__sim__/knobs", json=bad)
        assert response.status == 400 and (await response.json())["knob"] == knob
    changed = await knobs(slow_factor=3, fail_node="KSampler, VAEDecode")
    assert changed["slow_factor"] == 3.0 and changed["fail_node"] == ["KSampler", "VAEDecode"]
    assert (await (await http.get(f"{sim.url}/__sim__/knobs")).json())["step_seconds"] == 0.01


# --- process faults --------------------------------------------------------------------------

@pytest.mark.real_processes
@pytest.mark.parametrize("spec, returncode", [("3", 3), ("SIGKILL", -signal.SIGKILL)])
def test_crash_at_start_exits_with_the_requested_status(tmp_path, spec, returncode):
    handle = launch_simulator(tmp_path, "--crash-at-start", spec)
    assert handle.process.wait(timeout=15) == returncode
    assert "Simulated crash at start" in handle.log_text()


@pytest.mark.real_processes
def test_startup_delay_keeps_the_port_closed_until_ready(tmp_path):
    started = time.monotonic()
    handle = launch_simulator(tmp_path, "--startup-delay", "0.8")
    try:
        wait_ready(handle, timeout=15)
        assert time.monotonic() - started >= 0.8
        log = handle.log_text()
        assert log.index("Starting server") < log.index(f"To see the GUI go to: http://127.0.0.1:{handle.port}")
    finally:
        assert stop_process(handle.process) == -signal.SIGTERM


@pytest.mark.real_processes
async def test_crash_during_prompt_kills_the_process_after_it_started(tmp_path, http):
    with start_simulator(tmp_path, "--crash-during-prompt", "7") as crashing:
        events: list[str] = []
        async with http.ws_connect(f"{crashing.ws_url}?clientId=c") as ws:
            await http.post(f"{crashing.url}/prompt", json={"prompt": empty_to_save(), "client_id": "c"})
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                events.append(json.loads(message.data)["type"])
        assert await asyncio.to_thread(crashing.process.wait, 10) == 7
        assert "execution_start" in events and "execution_success" not in events
        assert not list(crashing.output_dir.iterdir())


@pytest.mark.real_processes
async def test_hang_during_prompt_stops_answering_until_sigterm(tmp_path, http):
    with start_simulator(tmp_path, "--hang-during-prompt") as hanging:
        async with http.ws_connect(f"{hanging.ws_url}?clientId=h") as ws:
            await http.post(f"{hanging.url}/prompt", json={"prompt": empty_to_save(), "client_id": "h"})
            while True:  # the hang comes right after the output node is announced
                event = json.loads((await ws.receive(timeout=10)).data)
                if event["type"] == "executing" and event["data"]["node"] == "2":
                    break
            with pytest.raises(asyncio.TimeoutError):
                await http.get(f"{hanging.url}/system_stats", timeout=aiohttp.ClientTimeout(total=1.0))
            # Stopped while the socket is open: a polite close would wait for the hung server.
            started = time.monotonic()
            assert await asyncio.to_thread(hanging.stop) == -signal.SIGTERM
            assert time.monotonic() - started < allowance(2.0)


def test_comfyui_command_line_flags_become_knobs():
    from simulator.cli import build_parser, knobs_from_args

    args, unknown = build_parser().parse_known_args([
        "--listen", "127.0.0.1", "--port", "8188", "--cpu", "--disable-auto-launch", "--preview-method", "auto",
        "--device-type", "cuda", "--device-name", "NVIDIA L4", "--checkpoints", "a.safetensors,b.safetensors",
        "--fail-node", "KSampler", "--fail-node", "VAEDecode,SaveImage", "--crash-during-prompt", "SIGSEGV",
        "--hang-during-prompt", "--step-seconds", "0.2", "--slow-factor", "2"])
    assert unknown == ["--disable-auto-launch", "--preview-method", "auto"]
    knobs = knobs_from_args(args).to_json()
    assert knobs["device_type"] == "cuda" and knobs["device_name"] == "NVIDIA L4"
    assert knobs["checkpoints"] == ["a.safetensors", "b.safetensors"]
    assert knobs["fail_node"] == ["KSampler", "VAEDecode", "SaveImage"]
    assert (knobs["crash_during_prompt"], knobs["hang_during_prompt"]) == ("SIGSEGV", "block")
    assert (knobs["step_seconds"], knobs["slow_factor"]) == (0.2, 2.0)


@pytest.mark.real_processes
def test_strict_base_directory_fails_like_comfyui_without_custom_nodes(tmp_path):
    handle = launch_simulator(tmp_path, "--strict-base-directory")
    assert handle.process.wait(timeout=15) == 1
    assert "custom_nodes" in handle.log_text()
    (handle.base_dir / "custom_nodes").mkdir()
    with start_simulator(tmp_path, "--strict-base-directory") as sim:
        assert sim.process.poll() is None
