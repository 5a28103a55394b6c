"""The asyncio ComfyUI client, over real sockets.

Every test that takes ``comfy_target`` runs twice: against the project's simulator
("sim") and against a real ComfyUI ("real", only when ``COMFYUI_TEST_URL`` is set;
``COMFYUI_TEST_OUTPUT_DIR`` is its output folder, if this machine can read it).
Those tests use model-free nodes only. Tests that need simulator knobs (crash,
fail-node, sampler steps) take ``sim_target`` instead and say "sim only".

WebSocket faults are made by a small TCP proxy in front of ComfyUI (``WsProxy``)
that can cut or stall the WebSocket right after a chosen frame; it also records
every HTTP request line, which shows whether the client polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import struct
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from api.comfy import (
    Cached,
    ClientTimeouts,
    ComfyClient,
    ComfyEvent,
    ComfyLost,
    ComfyUnreachable,
    Executed,
    Executing,
    ExecutionStarted,
    Finished,
    JobState,
    Progress,
    PromptPlace,
    PromptRejected,
    PromptStatus,
    PromptVanished,
    Queued,
    new_prompt_id,
)
from api.comfy.models import parse_node_outputs
from tests.support.comfy_modes import API_VERSIONS
from tests.support.net import free_port
from tests.support.timing import allowance, slowness

# A client bug tends to show as a hang: fail in a minute, not at the global timeout.
pytestmark = pytest.mark.timeout(60)

REAL_URL = os.environ.get("COMFYUI_TEST_URL", "").rstrip("/")
REAL_OUTPUT_DIR = os.environ.get("COMFYUI_TEST_OUTPUT_DIR")

# Short enough for tests, long enough for two loaded cores.
FAST = ClientTimeouts(connect=3.0, request=10.0, ws_idle=0.5, poll_interval=0.1, lost_after=1.0)
# For the happy path: a poll here would mean the client did not wait for the frame.
NO_POLL = ClientTimeouts(connect=3.0, request=10.0, ws_idle=60.0, poll_interval=0.1, lost_after=1.0)


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    kind: str  # "sim" or "real"
    url: str
    output_dir: Path | None
    sim: Any = None  # the simulator handle (sim only)
    api_version: str | None = None  # the simulator's ComfyUI API mode (sim only)

    @property
    def newer(self) -> bool:
        """The simulator speaks the newest ComfyUI read (jobs API, canonical prompt ids)."""
        return self.api_version not in (None, "0.3.64")

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80


def _sim_knobs(url: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    # Plain urllib: used from sync fixtures, outside any event loop.
    data = json.dumps(changes).encode() if changes is not None else None
    request = urllib.request.Request(
        f"{url}/__sim__/knobs", data=data, method="POST" if data else "GET",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture(scope="module")
def _shared_sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One simulator per API mode, started when a test first asks for it."""
    from simulator.testing import start_simulator

    with contextlib.ExitStack() as stack:
        sims: dict[str, Any] = {}

        def get(version: str) -> Any:
            if version not in sims:
                sims[version] = stack.enter_context(start_simulator(
                    tmp_path_factory.mktemp("comfy-sim"), api_version=version))
            return sims[version]

        yield get


@pytest.fixture(params=[*(f"sim-{v}" for v in API_VERSIONS),
                        pytest.param("real", marks=pytest.mark.real_comfyui)])
def comfy_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "real":
        if not REAL_URL:
            pytest.skip("COMFYUI_TEST_URL is not set: no real ComfyUI to test against")
        yield Target("real", REAL_URL, Path(REAL_OUTPUT_DIR) if REAL_OUTPUT_DIR else None)
        return
    sim = request.getfixturevalue("_shared_sims")(request.param.removeprefix("sim-"))
    knobs = _sim_knobs(sim.url)
    yield Target("sim", sim.url, Path(sim.output_dir), sim, sim.api_version)
    # Tests may change runtime knobs; put them back for the next test.
    _sim_knobs(sim.url, {"step_seconds": knobs["step_seconds"], "fail_node": knobs["fail_node"],
                         "crash_during_prompt": None, "hang_during_prompt": None})


@pytest.fixture
def sim_target(tmp_path: Path) -> Iterator[Target]:
    """A simulator of its own, for tests that kill or break it (sim only)."""
    from simulator.testing import start_simulator

    with start_simulator(tmp_path) as sim:
        yield Target("sim", sim.url, Path(sim.output_dir), sim)


async def set_knobs(target: Target, **changes: Any) -> None:
    assert target.kind == "sim"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{target.url}/__sim__/knobs", json=changes) as response:
            assert response.status == 200, await response.text()


# --------------------------------------------------------------------------- graphs


def _color() -> int:
    # A fresh colour per graph: a real ComfyUI would otherwise serve the nodes from its cache.
    return random.randint(0, 0xFFFFFF)


def image_graph(width: int = 64, height: int = 48, batch: int = 1, prefix: str = "client_test") -> dict:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": height, "batch_size": batch, "color": _color()}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def slow_graph(target: Target, prefix: str = "slow", *, blurs: int = 40, steps: int = 200) -> dict:
    """A graph that runs for seconds and has many interrupt points.

    On the simulator: a sampler whose steps the caller slows with knobs
    (``prepare_slow``); on a real ComfyUI: a chain of blurs (about 0.2 s each on a CPU).
    """
    if target.kind == "sim":
        return sampler_graph(steps=steps, prefix=prefix)
    graph: dict[str, Any] = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": _color()}},
    }
    previous = "1"
    for index in range(blurs):
        node = str(100 + index)
        graph[node] = {"class_type": "ImageBlur",
                       "inputs": {"image": [previous, 0], "blur_radius": 15, "sigma": 5.0}}
        previous = node
    graph["2"] = {"class_type": "SaveImage", "inputs": {"images": [previous, 0], "filename_prefix": prefix}}
    return graph


def sampler_graph(steps: int = 20, prefix: str = "sampled") -> dict:
    """ComfyUI's default text-to-image graph (the simulator has its checkpoint)."""
    return {
        "3": {"class_type": "KSampler",
              "inputs": {"seed": random.randint(0, 2**31), "steps": steps, "cfg": 8, "sampler_name": "euler",
                         "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0],
                         "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


async def prepare_slow(target: Target) -> None:
    if target.kind == "sim":
        await set_knobs(target, step_seconds=0.05)  # 200 steps: 10 s


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


async def read_output(client: ComfyClient, output: Any) -> bytes:
    """The file's bytes: from disk when the output folder is known, else via /view."""
    if output.local_path is not None:
        assert output.local_path.is_absolute()
        return output.local_path.read_bytes()
    return await client.view(output)


async def bounded(coro: Any, seconds: float = 20.0) -> Any:
    """Await ``coro`` but fail the test (rather than hang) when it never finishes."""
    return await asyncio.wait_for(coro, seconds)


def make_client(target: Target, timeouts: ClientTimeouts = FAST, url: str | None = None) -> ComfyClient:
    return ComfyClient(url or target.url, output_dir=target.output_dir, timeouts=timeouts)


class EventLog:
    """An async on_event callback that records events (and can act on them)."""

    def __init__(self, hook: Any = None) -> None:
        self.events: list[ComfyEvent] = []
        self.hook = hook

    async def __call__(self, event: ComfyEvent) -> None:
        self.events.append(event)
        if self.hook is not None:
            await self.hook(event)

    def of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


# --------------------------------------------------------------------------- the proxy


_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE) (\S+) HTTP/1\.[01]\r\n")


def _split_frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Whole WebSocket frames at the start of ``buffer`` and the incomplete rest."""
    frames, offset = [], 0
    while len(buffer) - offset >= 2:
        second = buffer[offset + 1]
        length, header = second & 0x7F, 2
        if length == 126:
            if len(buffer) - offset < 4:
                break
            length, header = int.from_bytes(buffer[offset + 2:offset + 4], "big"), 4
        elif length == 127:
            if len(buffer) - offset < 10:
                break
            length, header = int.from_bytes(buffer[offset + 2:offset + 10], "big"), 10
        if second & 0x80:
            header += 4
        if len(buffer) - offset < header + length:
            break
        frames.append(buffer[offset:offset + header + length])
        offset += header + length
    return frames, buffer[offset:]


class WsProxy:
    """A TCP proxy in front of ComfyUI that can break the WebSocket once.

    ``arm("cut")``: after forwarding the first frame containing ``trigger``, reset
    both sides of that connection. ``arm("stall")``: after it, forward nothing
    more to the client on that connection but keep it open. Later connections
    pass untouched. ``requests`` lists every HTTP request line seen.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[str] = []
        self.ws_connections = 0
        self.ws_open = 0  # WebSocket connections not closed yet
        self.action: str | None = None
        self.trigger = b'"execution_start"'
        self.fired = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None

    def arm(self, action: str, trigger: bytes = b'"execution_start"') -> None:
        self.action, self.trigger = action, trigger

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def count(self, prefix: str) -> int:
        return sum(1 for line in self.requests if line.startswith(prefix))

    async def __aenter__(self) -> WsProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, upstream_writer))
        pumps = [
            asyncio.create_task(self._to_server(client_reader, upstream_writer)),
            asyncio.create_task(self._to_client(upstream_reader, client_writer, upstream_writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for writer in (client_writer, upstream_writer):
                writer.transport.abort()
                self._writers.discard(writer)

    async def _to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            for match in _REQUEST_LINE.finditer(data):
                self.requests.append(f"{match.group(1).decode()} {match.group(2).decode()}")
            writer.write(data)
            await writer.drain()

    async def _to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: asyncio.StreamWriter
    ) -> None:
        websocket, stalled, buffer = False, False, b""
        try:
            while data := await reader.read(65536):
                if not websocket:
                    start = data.find(b"HTTP/1.1 101")
                    if start < 0:
                        writer.write(data)
                        await writer.drain()
                        continue
                    end = data.index(b"\r\n\r\n", start) + 4
                    writer.write(data[:end])
                    websocket, data = True, data[end:]
                    self.ws_connections += 1
                    self.ws_open += 1
                frames, buffer = _split_frames(buffer + data)
                for frame in frames:
                    if stalled:
                        continue
                    writer.write(frame)
                    if self.action and not self.fired.is_set() and self.trigger in frame:
                        self.fired.set()
                        if self.action == "cut":
                            await writer.drain()
                            return  # _serve resets both sides
                        stalled = True
                await writer.drain()
        finally:
            if websocket:
                self.ws_open -= 1


# --------------------------------------------------------------------------- tests: both targets


@pytest.mark.real_processes
async def test_success_returns_every_file_with_its_path(comfy_target: Target) -> None:
    log = EventLog()
    async with make_client(comfy_target) as client:
        result = await client.run_prompt(image_graph(64, 48, batch=2), on_event=log)
        assert result.status is PromptStatus.SUCCESS, result.error
        assert result.error is None
        assert [(o.node_id, o.output_type, o.type, o.mimetype) for o in result.outputs] == [
            ("2", "images", "output", "image/png")
        ] * 2
        assert len({o.filename for o in result.outputs}) == 2
        for output in result.outputs:
            if comfy_target.output_dir is not None:
                assert output.local_path == comfy_target.output_dir / output.subfolder / output.filename
                assert output.local_path.is_file()
            assert png_size(await read_output(client, output)) == (64, 48)
        assert result.history["outputs"]["2"]["images"][0]["filename"] == result.outputs[0].filename
        assert result.started_at is not None and result.finished_at is not None
        assert result.started_at <= result.finished_at

    kinds = [type(event) for event in log.events]
    assert kinds[0] is Queued and kinds[1] is ExecutionStarted and kinds[-1] is Finished
    assert Cached in kinds
    assert [e.node for e in log.of(Executing)] == ["1", "2"]
    assert log.of(Executed)[0].node == "2"
    assert log.of(Finished)[0].result is result
    assert all(event.prompt_id == result.prompt_id for event in log.events)


@pytest.mark.real_processes
async def test_happy_path_returns_on_the_final_frame_without_polling(comfy_target: Target) -> None:
    async with WsProxy(comfy_target.port) as proxy:
        async with make_client(comfy_target, NO_POLL, url=proxy.url) as client:
            started = time.monotonic()
            result = await bounded(client.run_prompt(image_graph(), on_event=lambda event: None))
            elapsed = time.monotonic() - started
    assert result.status is PromptStatus.SUCCESS
    assert elapsed < allowance(5.0)
    # One WebSocket, one POST, one history read after the final frame; no /queue polls.
    assert proxy.ws_connections == 1
    assert proxy.count("POST /prompt") == 1
    assert proxy.count("GET /history/") == 1
    assert proxy.count("GET /queue") == 0


@pytest.mark.real_processes
async def test_a_finished_prompts_socket_closes_when_its_owner_says_so(comfy_target: Target) -> None:
    async with WsProxy(comfy_target.port) as proxy:
        async with ComfyClient(proxy.url, output_dir=comfy_target.output_dir, timeouts=NO_POLL,
                               defer_closes=True) as client:
            for _ in range(2):
                result = await bounded(client.run_prompt(image_graph()))
                assert result.status is PromptStatus.SUCCESS
            await asyncio.sleep(0.3)  # time enough for a close in the background
            assert proxy.ws_open == 2  # each waits for the owner (the wrapper: its answer)
            client.close_deferred()
            await bounded(_until(lambda: proxy.ws_open == 0))
        # Without defer_closes a finished prompt's socket closes by itself.
        async with make_client(comfy_target, NO_POLL, url=proxy.url) as client:
            await bounded(client.run_prompt(image_graph()))
            await bounded(_until(lambda: proxy.ws_open == 0))
            assert proxy.ws_connections == 3


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.01)


@pytest.mark.real_processes
async def test_caller_chosen_prompt_id_is_used(comfy_target: Target) -> None:
    prompt_id = str(uuid.uuid4())
    async with make_client(comfy_target) as client:
        result = await client.run_prompt(image_graph(), prompt_id=prompt_id)
        assert result.prompt_id == prompt_id
        assert (await client.history(prompt_id)) is not None


@pytest.mark.parametrize(
    ("case", "error_type"),
    [
        ("unknown_class", "invalid_prompt"),
        ("no_outputs", "prompt_no_outputs"),
        ("too_small", "prompt_outputs_failed_validation"),
        ("too_big", "prompt_outputs_failed_validation"),
        ("missing_input", "prompt_outputs_failed_validation"),
        ("not_a_number", "prompt_outputs_failed_validation"),
        ("unknown_checkpoint", "prompt_outputs_failed_validation"),
    ],
)
@pytest.mark.real_processes
async def test_rejections_pass_comfyuis_body_through_intact(comfy_target: Target, case: str, error_type: str) -> None:
    graph = image_graph()
    node_error = None
    if case == "unknown_class":
        graph["1"]["class_type"] = "NoSuchNode"
    elif case == "no_outputs":
        del graph["2"]
    elif case == "too_small":
        graph["1"]["inputs"]["width"], node_error = 0, "value_smaller_than_min"
    elif case == "too_big":
        graph["1"]["inputs"]["height"], node_error = 10**6, "value_bigger_than_max"
    elif case == "missing_input":
        del graph["1"]["inputs"]["width"]
        node_error = "required_input_missing"
    elif case == "not_a_number":
        graph["1"]["inputs"]["width"], node_error = "wide", "invalid_input_type"
    elif case == "unknown_checkpoint":
        graph = sampler_graph()
        graph["4"]["inputs"]["ckpt_name"], node_error = "not-installed.safetensors", "value_not_in_list"

    # What ComfyUI itself answers to the same graph, posted by hand.
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{comfy_target.url}/prompt", json={"prompt": graph}) as response:
            assert response.status == 400
            expected = await response.json()

    async with make_client(comfy_target) as client:
        with pytest.raises(PromptRejected) as caught:
            await client.run_prompt(graph)
    rejected = caught.value
    assert rejected.status == 400
    assert rejected.body == expected
    if case == "unknown_class" and comfy_target.newer:
        error_type = "missing_node_type"  # what the newest ComfyUI calls it
    assert rejected.error_type == error_type
    assert rejected.error == expected["error"]
    assert rejected.node_errors == expected["node_errors"]
    if node_error is not None:
        (errors,) = [entry["errors"] for entry in rejected.node_errors.values()]
        assert node_error in [error["type"] for error in errors]


@pytest.mark.real_processes
async def test_graph_that_is_not_a_dict_is_refused_before_sending(comfy_target: Target) -> None:
    # ComfyUI would answer "no_prompt" (or a 500) for these; the client never sends them.
    async with make_client(comfy_target) as client:
        with pytest.raises(TypeError):
            await client.submit(None)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await client.run_prompt([])  # type: ignore[arg-type]


@pytest.mark.real_processes
async def test_runtime_error_reports_node_and_exception(comfy_target: Target) -> None:
    name = f"not_an_image_{uuid.uuid4().hex[:8]}.png"
    async with make_client(comfy_target) as client:
        uploaded = await client.upload_image(b"this is not a PNG", name)
        assert uploaded.name == name and uploaded.type == "input"
        graph = {
            "1": {"class_type": "LoadImage", "inputs": {"image": uploaded.name}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "never"}},
        }
        result = await client.run_prompt(graph)
    assert result.status is PromptStatus.FAILED
    assert result.outputs == []
    assert result.error is not None
    assert (result.error.node_id, result.error.node_type) == ("1", "LoadImage")
    assert result.error.exception_type
    assert result.error.exception_message
    assert any(kind == "execution_error" for kind, _data in result.messages)


@pytest.mark.real_processes
async def test_upload_then_load_image(comfy_target: Target) -> None:
    async with make_client(comfy_target) as client:
        made = await client.run_prompt(image_graph(40, 30, prefix="to_upload"))
        png = await read_output(client, made.outputs[0])
        uploaded = await client.upload_image(png, f"upload_{uuid.uuid4().hex[:8]}.png", subfolder="tests")
        assert uploaded.subfolder == "tests"
        graph = {
            "1": {"class_type": "LoadImage", "inputs": {"image": f"{uploaded.subfolder}/{uploaded.name}"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "loaded"}},
        }
        result = await client.run_prompt(graph)
        assert result.status is PromptStatus.SUCCESS, result.error
        assert png_size(await read_output(client, result.outputs[0])) == (40, 30)


@pytest.mark.real_processes
async def test_interrupt_stops_the_running_prompt(comfy_target: Target) -> None:
    await prepare_slow(comfy_target)
    async with make_client(comfy_target) as client:

        async def interrupt_once_running(event: ComfyEvent) -> None:
            if isinstance(event, (Executing, Progress)) and not interrupted:
                interrupted.append(time.monotonic())
                await client.interrupt(event.prompt_id)

        interrupted: list[float] = []
        result = await client.run_prompt(slow_graph(comfy_target), on_event=EventLog(interrupt_once_running))
        assert result.status is PromptStatus.INTERRUPTED
        assert result.error is None
        assert result.interrupted_node is not None
        assert result.outputs == []
        # It stops at the next node or step, not at the end of the graph (several seconds).
        assert time.monotonic() - interrupted[0] < allowance(3.0)
        assert result.prompt_id not in await client.queue()


@pytest.mark.real_processes
async def test_cancel_removes_a_queued_prompt_which_then_vanishes(comfy_target: Target) -> None:
    await prepare_slow(comfy_target)
    async with make_client(comfy_target) as client:
        blocker = await client.submit(slow_graph(comfy_target, prefix="blocker"))
        try:
            queued: asyncio.Queue[str] = asyncio.Queue()

            def on_event(event: ComfyEvent) -> None:
                if isinstance(event, Queued):
                    queued.put_nowait(event.prompt_id)

            waiting = asyncio.create_task(client.run_prompt(image_graph(prefix="never_runs"), on_event=on_event))
            queued_id = await asyncio.wait_for(queued.get(), 5)
            assert queued_id in (await client.queue()).pending
            await client.delete_queued([queued_id])
            started = time.monotonic()
            with pytest.raises(PromptVanished) as caught:
                await asyncio.wait_for(waiting, 10)
            assert caught.value.prompt_id == queued_id
            # Noticed by the first poll after ws_idle, not by waiting for the blocker.
            assert time.monotonic() - started < FAST.ws_idle + allowance(2.0)
        finally:
            await client.cancel(blocker.prompt_id)
        blocked = await client.wait(blocker.prompt_id)
        assert blocked.status is PromptStatus.INTERRUPTED


@pytest.mark.real_processes
async def test_websocket_cut_mid_prompt_still_gives_the_result(comfy_target: Target) -> None:
    async with WsProxy(comfy_target.port) as proxy:
        proxy.arm("cut")
        async with make_client(comfy_target, url=proxy.url) as client:
            result = await bounded(client.run_prompt(image_graph(32, 32, prefix="after_cut")))
            assert result.status is PromptStatus.SUCCESS
            assert png_size(await read_output(client, result.outputs[0])) == (32, 32)
    assert proxy.fired.is_set()
    assert proxy.ws_connections >= 2  # it reconnected


@pytest.mark.real_processes
async def test_websocket_cut_during_a_slow_prompt_still_finishes(comfy_target: Target) -> None:
    await prepare_slow(comfy_target)
    graph = slow_graph(comfy_target, prefix="slow_cut", blurs=5, steps=30)  # 1-2 s
    log = EventLog()
    async with WsProxy(comfy_target.port) as proxy:
        proxy.arm("cut")
        async with make_client(comfy_target, url=proxy.url) as client:
            result = await bounded(client.run_prompt(graph, on_event=log))
    assert proxy.ws_connections >= 2
    assert result.status is PromptStatus.SUCCESS
    assert len(result.outputs) == 1
    assert isinstance(log.events[-1], Finished)


@pytest.mark.real_processes
async def test_stalled_websocket_falls_back_to_polling(comfy_target: Target) -> None:
    async with WsProxy(comfy_target.port) as proxy:
        proxy.arm("stall")
        async with make_client(comfy_target, url=proxy.url) as client:
            started = time.monotonic()
            result = await bounded(client.run_prompt(image_graph(prefix="after_stall")))
            elapsed = time.monotonic() - started
    assert proxy.fired.is_set()
    assert proxy.ws_connections == 1  # nothing closed: the client had to notice the silence
    assert result.status is PromptStatus.SUCCESS
    assert len(result.outputs) == 1
    assert proxy.count("GET /history/") >= 1
    assert FAST.ws_idle * 0.9 <= elapsed < FAST.ws_idle + 3.0


@pytest.mark.real_processes
async def test_output_in_a_subfolder(comfy_target: Target) -> None:
    async with make_client(comfy_target) as client:
        result = await client.run_prompt(image_graph(prefix="client_tests/deeper/pic"))
        (output,) = result.outputs
        assert output.subfolder == "client_tests/deeper"
        if comfy_target.output_dir is not None:
            assert output.local_path == comfy_target.output_dir / "client_tests" / "deeper" / output.filename
            assert output.local_path.is_file()
        assert png_size(await read_output(client, output)) == (64, 48)


@pytest.mark.real_processes
async def test_latent_output_is_a_file_too(comfy_target: Target) -> None:
    graph = {
        "1": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64 + 8 * random.randint(0, 50), "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "client_latent"}},
    }
    async with make_client(comfy_target) as client:
        result = await client.run_prompt(graph)
        assert result.status is PromptStatus.SUCCESS, result.error
        (output,) = result.outputs
        assert (output.node_id, output.output_type, output.type) == ("2", "latents", "output")
        assert output.filename.endswith(".latent")
        assert len(await read_output(client, output)) > 0


@pytest.mark.real_processes
async def test_two_output_nodes_and_previews(comfy_target: Target) -> None:
    graph = image_graph(16, 16, prefix="first_out")
    graph["3"] = {"class_type": "EmptyImage",
                  "inputs": {"width": 24, "height": 8, "batch_size": 3, "color": _color()}}
    graph["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "second_out"}}
    graph["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    async with make_client(comfy_target) as client:
        result = await client.run_prompt(graph)
        assert result.status is PromptStatus.SUCCESS, result.error
        by_node: dict[str, list] = {}
        for output in result.outputs:
            by_node.setdefault(output.node_id, []).append(output)
        assert sorted((node, len(files)) for node, files in by_node.items()) == [("2", 1), ("4", 3)]
        for output in by_node["4"]:
            assert png_size(await read_output(client, output)) == (24, 8)
        # PreviewImage writes 'temp' files: previews, never outputs.
        assert [(p.node_id, p.type) for p in result.previews] == [("5", "temp")]


@pytest.mark.real_processes
async def test_probe_stats_and_checkpoints(comfy_target: Target) -> None:
    async with make_client(comfy_target) as client:
        await client.probe(5.0)
        stats = await client.system_stats()
        assert stats.is_simulator is (comfy_target.kind == "sim")
        assert stats.comfyui_version and stats.python_version
        assert stats.devices and stats.devices[0].vram_total > 0
        checkpoints = await client.list_checkpoints()
        if comfy_target.kind == "sim":
            assert "v1-5-pruned-emaonly.safetensors" in checkpoints
            assert await client.checkpoint_installed("v1-5-pruned-emaonly.safetensors")
        assert not await client.checkpoint_installed("certainly-not-installed.safetensors")
        info = await client.object_info("SaveImage")
        assert "images" in info["SaveImage"]["input"]["required"]
        assert await client.object_info("NoSuchNode") == {}


@pytest.mark.real_processes
async def test_wait_follows_a_submitted_prompt(comfy_target: Target) -> None:
    async with make_client(comfy_target) as client:
        client_id = uuid.uuid4().hex
        submission = await client.submit(image_graph(prefix="submitted"), client_id=client_id)
        assert submission.node_errors == {}
        result = await client.wait(submission.prompt_id, client_id=client_id)
        assert result.status is PromptStatus.SUCCESS
        assert len(result.outputs) == 1


# --------------------------------------------------------------------------- tests: no ComfyUI needed


async def test_nothing_listening_is_unreachable_at_once() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with ComfyClient(url, timeouts=FAST) as client:
        started = time.monotonic()
        with pytest.raises(ComfyUnreachable) as caught:
            await client.run_prompt(image_graph())
        assert "connect" in caught.value.reason
        with pytest.raises(ComfyUnreachable):
            await client.probe(2.0)
        with pytest.raises(ComfyUnreachable):
            await client.queue()
    assert time.monotonic() - started < allowance(2.0)


async def test_probe_of_a_server_that_never_answers_times_out() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ComfyClient(f"http://127.0.0.1:{port}", timeouts=FAST) as client:
            started = time.monotonic()
            with pytest.raises(ComfyUnreachable) as caught:
                await client.probe(0.5)
            assert "/system_stats" in caught.value.reason
            assert time.monotonic() - started < allowance(1.5)
    finally:
        for writer in accepted:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


def test_outputs_parsing_covers_every_list_and_refuses_escapes(tmp_path: Path) -> None:
    outputs = {
        "7": {
            "gifs": [{"filename": "clip_00001.webp", "subfolder": "anim", "type": "output", "format": "image/webp"}],
            "animated": [True],
            "text": ["a caption", "another"],
            "audio": [{"filename": "sound_00001_.flac", "subfolder": "", "type": "output"}],
        },
        "8": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"},
                         {"filename": "evil.png", "subfolder": "../../etc", "type": "output"}]},
    }
    parsed = parse_node_outputs(outputs, output_dir=tmp_path, temp_dir=None)
    assert [(f.node_id, f.output_type, f.filename, f.mimetype) for f in parsed.files] == [
        ("7", "gifs", "clip_00001.webp", "image/webp"),
        ("7", "audio", "sound_00001_.flac", "audio/flac"),
        ("8", "images", "evil.png", "image/png"),
    ]
    assert parsed.files[0].local_path == tmp_path / "anim" / "clip_00001.webp"
    assert parsed.files[2].local_path is None  # would escape the output folder
    assert [(t.node_id, t.output_type, t.text) for t in parsed.texts] == [
        ("7", "text", "a caption"), ("7", "text", "another")]
    assert [(p.filename, p.local_path) for p in parsed.previews] == [("p.png", None)]


# --------------------------------------------------------------------------- tests: sim only


@pytest.mark.real_processes
async def test_progress_events_carry_its_sim_only(sim_target: Target) -> None:
    await set_knobs(sim_target, step_seconds=0.02)
    log = EventLog()
    async with make_client(sim_target) as client:
        result = await client.run_prompt(sampler_graph(steps=20), on_event=log)
    assert result.status is PromptStatus.SUCCESS, result.error
    progress = [event for event in log.of(Progress) if event.node == "3"]
    assert [event.value for event in progress] == list(range(1, 21))
    assert {event.max for event in progress} == {20}
    assert progress[0].its_per_second is None  # one step gives no rate yet
    rates = [event.its_per_second for event in progress[5:]]
    floor = 10 / slowness()  # 50 it/s nominal; a busy machine oversleeps each step
    assert all(rate is not None and floor < rate < 60 for rate in rates), rates
    assert progress[-1].elapsed >= progress[5].elapsed > 0
    assert result.sampling.steps == 20
    assert result.sampling.its is not None and floor < result.sampling.its < 60
    assert 0.2 < result.sampling.seconds < allowance(2.0)


@pytest.mark.real_processes
async def test_fail_node_knob_reports_the_failing_node_sim_only(sim_target: Target) -> None:
    await set_knobs(sim_target, fail_node=["ImageInvert"])
    graph = image_graph()
    graph["3"] = {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    graph["2"]["inputs"]["images"] = ["3", 0]
    async with make_client(sim_target) as client:
        result = await client.run_prompt(graph)
    assert result.status is PromptStatus.FAILED
    assert result.error is not None
    assert (result.error.node_id, result.error.node_type) == ("3", "ImageInvert")
    assert result.error.exception_message and result.error.traceback


@pytest.mark.real_processes
async def test_comfyui_killed_mid_prompt_raises_lost_within_a_second_sim_only(sim_target: Target) -> None:
    await set_knobs(sim_target, step_seconds=0.05)
    killed: list[float] = []

    async def kill_when_sampling(event: ComfyEvent) -> None:
        if isinstance(event, Progress) and not killed:
            os.kill(sim_target.sim.process.pid, signal.SIGKILL)
            killed.append(time.monotonic())

    async with make_client(sim_target) as client:
        with pytest.raises(ComfyLost) as caught:
            await bounded(client.run_prompt(sampler_graph(steps=200), on_event=kill_when_sampling))
    took = time.monotonic() - killed[0]
    assert FAST.lost_after * 0.9 <= took < FAST.lost_after + allowance(1.0)
    assert caught.value.prompt_id is not None


@pytest.mark.real_processes
async def test_crash_knob_during_prompt_raises_lost_sim_only(sim_target: Target) -> None:
    await set_knobs(sim_target, crash_during_prompt="SIGKILL")
    async with make_client(sim_target) as client:
        started = time.monotonic()
        with pytest.raises(ComfyLost):
            await bounded(client.run_prompt(image_graph()))
    assert time.monotonic() - started < FAST.lost_after + allowance(2.0)


@pytest.mark.real_processes
async def test_hung_comfyui_fails_probe_and_prompt_sim_only(sim_target: Target) -> None:
    # The event loop of a hung ComfyUI answers nothing: not the WebSocket, not HTTP.
    hung = ClientTimeouts(connect=1.0, request=1.0, ws_idle=0.3, poll_interval=0.1, lost_after=1.0)
    async with make_client(sim_target, hung) as client:
        await client.probe(2.0)
        await set_knobs(sim_target, hang_during_prompt="block")
        started = time.monotonic()
        with pytest.raises(ComfyLost):
            await bounded(client.run_prompt(image_graph()))
        # ws_idle, then a poll that times out (request), then lost_after.
        assert time.monotonic() - started < hung.ws_idle + hung.request + hung.lost_after + allowance(1.5)
        started = time.monotonic()
        with pytest.raises(ComfyUnreachable):
            await client.probe(0.5)
        assert time.monotonic() - started < allowance(1.5)


# --------------------------------------------------------------------------- what ComfyUI is


@pytest.mark.real_processes
async def test_capabilities_say_which_comfyui_this_is(comfy_target: Target) -> None:
    async with make_client(comfy_target) as client:
        caps = await client.capabilities()
        stats = await client.system_stats()
        assert caps.version == stats.comfyui_version and caps.version_tuple is not None
        assert caps is await client.capabilities(), "learned once"
        if comfy_target.kind == "sim":
            assert caps.jobs_api is comfy_target.newer
            assert caps.canonical_prompt_ids is comfy_target.newer
            assert caps.assets is comfy_target.newer
            assert caps.version.startswith(comfy_target.api_version)
        client.forget_capabilities()
        assert (await client.capabilities()) is not caps, "learned again after a loss"


@pytest.mark.real_processes
async def test_lookup_and_cancel_through_the_calls_this_comfyui_has(comfy_target: Target) -> None:
    await prepare_slow(comfy_target)
    async with make_client(comfy_target) as client:
        done = await client.run_prompt(image_graph())
        assert (await client.lookup(done.prompt_id)).place is PromptPlace.DONE
        assert (await client.lookup(new_prompt_id())).place is PromptPlace.UNKNOWN
        blocker = await client.submit(slow_graph(comfy_target, prefix="blocker"))
        waiting = await client.submit(image_graph(prefix="never_runs"))
        try:
            assert (await client.lookup(waiting.prompt_id)).place is PromptPlace.QUEUED
            await bounded(_until_running(client, blocker.prompt_id))
            if (await client.capabilities()).jobs_api:
                page = await client.jobs(status=[JobState.PENDING, JobState.IN_PROGRESS])
                assert {j.id for j in page.jobs} >= {blocker.prompt_id, waiting.prompt_id}
                assert (await client.job(waiting.prompt_id)).status is JobState.PENDING
            await client.cancel(waiting.prompt_id)
            assert (await client.lookup(waiting.prompt_id)).place is PromptPlace.UNKNOWN
        finally:
            await client.cancel(blocker.prompt_id)
        assert (await client.wait(blocker.prompt_id)).status is PromptStatus.INTERRUPTED
        if (await client.capabilities()).jobs_api:
            assert (await client.job(blocker.prompt_id)).status is JobState.CANCELLED
            assert await client.cancel_job(blocker.prompt_id) is False, "finished: nothing to do"


async def _until_running(client: ComfyClient, prompt_id: str) -> None:
    while (await client.lookup(prompt_id)).place is not PromptPlace.RUNNING:
        await asyncio.sleep(0.05)


@pytest.mark.real_processes
async def test_a_lost_answer_to_post_prompt_is_settled_by_one_look_up(comfy_target: Target) -> None:
    if comfy_target.kind != "sim":
        pytest.skip("needs the simulator's post_prompt_drop knob")
    async with make_client(comfy_target) as client:
        await client.capabilities()
        await set_knobs(comfy_target, post_prompt_drop=True)
        try:
            result = await bounded(client.run_prompt(image_graph(prefix="dropped")))
        finally:
            await set_knobs(comfy_target, post_prompt_drop=False)
        assert result.status is PromptStatus.SUCCESS and result.outputs
        assert (await client.history(result.prompt_id)) is not None
