"""`comfy-worker client generate|load` against a real worker (token mode) and its API wrapper.

The autoscaler route is covered in tests/test_autoscaler_e2e.py, next to the worker it needs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import sys
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner

from supervisor.commands.client_cli import (
    Target,
    client,
    parse_value,
    run_load,
    save_outputs,
)
from tests.support import procs
from tests.support.procs import ROOT, base_env, free_port, start_worker
from tests.support.workflows import TINY

TOKEN = "client-t0ken"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    with start_worker(tmp, "--step-seconds", "0.01", env={"WORKER_AUTH_TOKEN": TOKEN}) as w:
        yield w


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(client, list(args), env={"WORKER_AUTH_TOKEN": None, **(env or {})},
                              catch_exceptions=False)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC
    return struct.unpack(">II", head[16:24])


def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


# --- generate ------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_generate_with_a_modifier_saves_the_image(worker, tmp_path):
    out = tmp_path / "out"
    result = invoke("generate", "--url", worker.url, "--token", TOKEN, "--modifier", "Text2Image",
                    "--set", "prompt=a red fox", "--set", "width=64", "--set", "height=48",
                    "--set", "steps=3", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    (saved,) = out.iterdir()
    assert png_size(saved) == (64, 48)       # the numbers went as numbers, the prompt as text
    assert result.stdout.startswith("completed ")
    assert "generation" in result.stdout and "3 steps" in result.stdout
    assert "round trip" in result.stdout
    assert f"saved {saved}" in result.stdout
    assert "waiting for the worker" in result.stderr


@pytest.mark.e2e
def test_generate_json_output_has_the_result_without_base64(worker, tmp_path):
    result = invoke("generate", "--url", worker.url, "--token", TOKEN, "--workflow",
                    str(tiny_file(tmp_path)), "--out", str(tmp_path / "o"), "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["http_status"] == 200 and report["result"]["status"] == "completed"
    assert report["result"]["output"][0]["data"].endswith("base64 characters>")
    assert Path(report["saved"][0]).is_file()


@pytest.mark.e2e
def test_generate_as_a_subprocess_takes_the_token_from_the_environment(worker, tmp_path):
    out = tmp_path / "out"
    env = base_env(WORKER_AUTH_TOKEN=TOKEN)
    proc = procs.run([sys.executable, "-m", "supervisor.commands.client_cli", "generate", "--url",
                      worker.url, "--workflow", str(tiny_file(tmp_path)), "--out", str(out),
                      "--request-id", "from-a-file"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("completed from-a-file")
    (saved,) = out.iterdir()
    assert png_size(saved) == (32, 32)


@pytest.mark.e2e
def test_generate_through_the_main_command(worker, tmp_path):
    proc = procs.run([sys.executable, "-m", "supervisor.commands.cli", "client", "generate", "--url",
                      worker.url, "--token", TOKEN, "--workflow", str(tiny_file(tmp_path)),
                      "-q"], cwd=ROOT, env=base_env(), capture_output=True, text=True,
                     timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("completed ")


@pytest.mark.e2e
def test_wrong_token_exits_1_with_the_workers_reason(worker, tmp_path):
    result = invoke("generate", "--url", worker.url, "--workflow", str(tiny_file(tmp_path)),
                    "-q", env={"WORKER_AUTH_TOKEN": "nope"})
    assert result.exit_code == 1
    assert "HTTP 401: invalid bearer token" in result.stderr


@pytest.mark.e2e
def test_invalid_values_are_all_listed(worker):
    result = invoke("generate", "--url", worker.url, "--token", TOKEN, "--modifier",
                    "Text2Image", "--set", "width=13", "--set", "steps=0", "-q")
    assert result.exit_code == 1
    assert "HTTP 400" in result.stderr
    assert "width" in result.stderr and "steps" in result.stderr


@pytest.mark.e2e
def test_stream_from_the_wrapper_shows_steps_and_speed(worker, tmp_path):
    result = invoke("generate", "--url", worker.wrapper_url, "--stream", "--modifier",
                    "Text2Image", "--set", "steps=6", "--set", "width=64", "--set", "height=64",
                    "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    assert "step 6/6" in result.stderr
    assert "it/s" in result.stderr
    assert len(list((tmp_path / "out").iterdir())) == 1


@pytest.mark.e2e
def test_stream_against_the_public_port_says_what_to_do(worker, tmp_path):
    result = invoke("generate", "--url", worker.url, "--token", TOKEN, "--stream",
                    "--workflow", str(tiny_file(tmp_path)), "-q")
    assert result.exit_code == 1
    assert "offers only /generate/sync" in result.stderr


def test_unreachable_worker_exits_1(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke("generate", "--url", url, "--workflow", str(tiny_file(tmp_path)), "-q")
    assert result.exit_code == 1
    assert "request failed" in result.stderr and "ClientConnectorError" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--url", "http://x"], "either --modifier"),
    (["--url", "http://x", "--modifier", "M", "--workflow", "{tiny}"], "either --modifier"),
    (["--url", "http://x", "--workflow", "{tiny}", "--set", "a=1"], "needs --modifier"),
    (["--url", "http://x", "--modifier", "M", "--set", "novalue"], "is not key=value"),
    (["--modifier", "M"], "either --url"),
    (["--url", "http://x", "--autoscaler", "http://y", "--modifier", "M"], "either --url"),
    (["--autoscaler", "http://y", "--modifier", "M"], "needs --endpoint and --api-key"),
    (["--autoscaler", "http://y", "--endpoint", "e", "--api-key", "k", "--stream",
      "--modifier", "M"], "--stream needs --url"),
    (["--url", "x:3000", "--modifier", "M"], "must start with http://"),
    (["--url", "http://x", "--cost", "5", "--modifier", "M"], "it needs --autoscaler"),
    (["--autoscaler", "http://y", "--endpoint", "e", "--api-key", "k", "--cost", "-1",
      "--modifier", "M"], "--cost"),
    (["--url", "http://x", "--workflow", "{notjson}"], "is not JSON"),
])
def test_usage_errors_exit_2_without_sending(tmp_path, args, message):
    (tmp_path / "bad.json").write_text("{nope")
    args = [a.replace("{tiny}", str(tiny_file(tmp_path)))
            .replace("{notjson}", str(tmp_path / "bad.json")) for a in args]
    result = invoke("generate", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_set_values_are_json_when_they_parse():
    assert parse_value("512") == 512
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True
    assert parse_value('"512"') == "512"
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("a red fox") == "a red fox"
    assert parse_value("__RANDOM_INT__") == "__RANDOM_INT__"
    assert parse_value("NaN") == "NaN"        # not JSON: stays text
    assert parse_value("") == ""


# --- load ----------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_load_prints_counts_and_percentiles(worker, tmp_path):
    result = invoke("load", "--url", worker.url, "--token", TOKEN, "--workflow",
                    str(tiny_file(tmp_path)), "-n", "6", "--rps", "20", "--concurrency", "2")
    assert result.exit_code == 0, result.output
    assert "status: 200 x6" in result.stdout
    for name in ("p50", "p90", "p99", "max"):
        assert f"{name} " in result.stdout


@pytest.mark.e2e
def test_load_counts_failures_and_exits_1(worker, tmp_path):
    result = invoke("load", "--url", worker.url, "--token", "wrong", "--workflow",
                    str(tiny_file(tmp_path)), "-n", "3", "--rps", "0", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["status_counts"] == {"401": 3} and report["failed"] == 3
    assert "invalid bearer token" in report["first_errors"]["401"]


async def test_load_keeps_to_the_rate_and_the_concurrency_cap():
    in_flight = peak = 0
    seen_ids: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        seen_ids.append((await request.json())["input"].get("request_id"))
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.15)
        in_flight -= 1
        return web.json_response({"status": "completed", "output": []})

    app = web.Application()
    app.router.add_post("/generate/sync", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        target = Target(url=f"http://127.0.0.1:{port}")
        payload = {"input": {"workflow_json": TINY, "request_id": "r"}}
        report = await run_load(target, payload, count=8, rps=100, concurrency=3, timeout=10)
        paced = await run_load(target, payload, count=4, rps=10, concurrency=8, timeout=10)
    finally:
        await runner.cleanup()
    assert report.counts == {"200": 8} and peak == 3
    # The cap made the 8 requests take three rounds of 0.15 s.
    assert report.seconds >= 0.45
    # 4 starts at 10 per second: the last starts 0.3 s after the first.
    assert paced.seconds >= 0.3 + 0.15
    # A given request id is made unique per request (the worker refuses duplicates in flight).
    assert sorted(seen_ids[:8]) == [f"r-{i}" for i in range(8)]
    assert set(report.latencies()) >= {"p50", "p90", "p99", "max"}


# --- saving outputs ------------------------------------------------------------------------------
async def test_outputs_are_saved_from_base64_or_downloaded_and_names_stay_inside(tmp_path):
    async def image(request: web.Request) -> web.Response:
        return web.Response(body=PNG_MAGIC + b"downloaded")

    app = web.Application()
    app.router.add_get("/signed/image.png", image)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    result = {"output": [
        {"filename": "a.png", "data": base64.b64encode(b"inline").decode()},
        {"filename": "../../escape.png", "url": f"http://127.0.0.1:{port}/signed/image.png"},
        {"filename": "gone.png", "url": f"http://127.0.0.1:{port}/missing"},
        {"filename": "bad.png", "data": "!!not base64!!"},
        {"filename": "a.png", "data": base64.b64encode(b"second").decode()},
    ]}
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session:
            saved = await save_outputs(session, result, tmp_path / "out")
    finally:
        await runner.cleanup()
    files = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert files == {"a.png": b"inline", "escape.png": PNG_MAGIC + b"downloaded",
                     "a_1.png": b"second"}
    assert not (tmp_path / "escape.png").exists()
    notes = {s.name: s.note for s in saved if s.path is None}
    assert notes == {"gone.png": "download answered HTTP 404",
                     "bad.png": "its base64 data is corrupt"}
