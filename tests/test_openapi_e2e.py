"""The API documents as served: by a running wrapper (simulator as ComfyUI) and the public port.

/openapi.json validates and carries an operator's own modifier; /docs is rendered by a real
headless Chromium (Debian's package) from files served here, and shows every operation; the
server-sent events of /generate/stream match the schemas the document gives them.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from api.contract.schemas import standalone
from simulator.testing import start_simulator
from tests.support import procs
from tests.support.procs import get_json, start_wrapper
from tests.support.workflows import OPERATOR_MODIFIER

pytestmark = pytest.mark.real_processes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openapi")
    modifiers = tmp / "modifiers"
    modifiers.mkdir()
    (modifiers / "Blank.json").write_text(json.dumps(OPERATOR_MODIFIER))
    with start_simulator(tmp, "--step-seconds", "0.01") as sim:
        with start_wrapper(tmp, sim.url, sim.output_dir, API_MODIFIERS_DIR=str(modifiers),
                           API_MAX_DIMENSION="512") as running:
            running.tmp = tmp
            yield running


def fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def test_served_document_validates_and_lists_the_operators_modifier(wrapper):
    status, document = get_json(wrapper.url + "/openapi.json")
    assert status == 200
    validate(document)
    schemas = document["components"]["schemas"]
    blank = schemas["Modifications_Blank"]
    assert blank["properties"]["width"] == {"type": "integer", "minimum": 8, "maximum": 512,
                                            "description": "Width in pixels.", "default": 64}
    assert blank["properties"]["colour"]["enum"] == [0, 16777215]
    assert {"$ref": "#/components/schemas/ModifierInput_Blank"} in schemas["Input"]["oneOf"]


def test_docs_page_and_its_files_are_served_from_this_machine(wrapper):
    status, kind, page = fetch(wrapper.url + "/docs")
    assert status == 200 and kind.startswith("text/html")
    text = page.decode()
    references = re.findall(r'(?:src|href|url)\s*[=:]\s*"([^"]+)"', text)
    assert "openapi.json" in references
    assert not [r for r in references if re.match(r"^(\w+:|//)", r)], \
        f"the page must load nothing from another host: {references}"
    for asset, expected in [("swagger-ui-bundle.js", "text/javascript"),
                            ("swagger-ui.css", "text/css")]:
        assert f'src="docs/{asset}"' in text or f'href="docs/{asset}"' in text
        status, kind, body = fetch(f"{wrapper.url}/docs/{asset}")
        assert status == 200 and kind.startswith(expected) and len(body) > 10_000
    status, body = get_json(wrapper.url + "/docs/..%2Fcore.py")
    assert status == 404, body


def events(raw: str) -> list[tuple[str, dict]]:
    found = []
    for block in raw.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((fields["event"], json.loads(fields["data"])))
    return found


def test_stream_events_match_their_documented_schemas(wrapper):
    document = get_json(wrapper.url + "/openapi.json")[1]
    schemas = document["components"]["schemas"]
    media = document["paths"]["/generate/stream"]["post"]["responses"]["200"]["content"]
    declared = {name: one["properties"]["data"]["contentSchema"]
                for one in media["text/event-stream"]["schema"]["oneOf"]
                for name in one["properties"]["event"]["enum"]}
    body = json.dumps({"input": {"modifier": "RawWorkflow",
                                 "modifications": {"steps": 3, "width": 64, "height": 64}}})
    request = urllib.request.Request(wrapper.url + "/generate/stream", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        seen = events(response.read().decode())
    names = [name for name, _ in seen]
    assert names[0] == "queued" and names[-1] == "final_result" and "progress" in names
    for name, data in seen:
        target = declared[name]["$ref"].rsplit("/", 1)[1]
        errors = [e.message for e in
                  Draft202012Validator(standalone(target, schemas)).iter_errors(data)]
        assert not errors, f"{name} event {data}: {errors}"
    assert seen[-1][1]["result"]["status"] == "completed"


# --- a real browser -------------------------------------------------------------------------------
def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return procs.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--no-default-browser-check", f"--user-data-dir={tmp_path}",
         # Swagger UI draws the page in JavaScript: give it (virtual) time before the dump
         "--virtual-time-budget=20000", *args],
        capture_output=True, text=True, timeout=120)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make system-tools)")
def test_docs_page_renders_every_operation_in_chromium(wrapper, tmp_path):
    document = get_json(wrapper.url + "/openapi.json")[1]
    expected = {(method.upper(), path) for path, item in document["paths"].items()
                for method in item}
    dom = chromium(tmp_path / "profile-dom", "--dump-dom", wrapper.url + "/docs")
    assert dom.returncode == 0, dom.stderr[-2000:]
    blocks = re.findall(r'class="opblock-summary-method">(\w+)</span>.*?'
                        r'data-path="([^"]+)"', dom.stdout, flags=re.S)
    shown = {(method, html.unescape(path).replace("\u200b", "")) for method, path in blocks}
    assert shown == expected, (expected - shown, dom.stdout[:3000])
    assert "comfy-worker API wrapper" in dom.stdout
    assert "Modifications_Blank" in dom.stdout          # the schemas list, operator's included

    screenshot = tmp_path / "docs.png"
    shot = chromium(tmp_path / "profile-shot", "--window-size=1280,1600",
                    f"--screenshot={screenshot}", wrapper.url + "/docs")
    assert shot.returncode == 0, shot.stderr[-2000:]
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000, len(png)
    keep = Path(wrapper.tmp) / "docs.png"
    keep.write_bytes(png)
    print(f"screenshot of /docs: {keep}")


def test_a_stream_client_that_hangs_up_cancels_its_request_and_is_no_bug(wrapper):
    """A client that leaves mid-stream cancels its request, and nothing is logged as a bug.

    (A long contract run once hit a write racing the hang-up, which escaped as a "bug in the
    wrapper"; it is a cancellation now. This test does not make that race happen on purpose.)"""
    import socket
    import struct
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(wrapper.url)
    ids = []
    for n in range(5):
        request_id = f"hangup-{n}"
        body = json.dumps({"input": {"request_id": request_id, "modifier": "RawWorkflow",
                                     "modifications": {"steps": 60, "width": 64,
                                                       "height": 64}}}).encode()
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
            sock.sendall(b"POST /generate/stream HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            seen = b""
            while b"event: progress" not in seen:
                chunk = sock.recv(65536)
                assert chunk, seen
                seen += chunk
            # hang up hard (RST) while progress events are still being written
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ids.append(request_id)
    deadline = time.monotonic() + 30
    for request_id in ids:
        while True:
            status, result = get_json(f"{wrapper.url}/result/{request_id}")
            if result.get("status") in ("cancelled", "completed", "failed"):
                break
            assert time.monotonic() < deadline, result
            time.sleep(0.1)
        assert status == 499 and result["status"] == "cancelled", result
    assert "bug in the wrapper" not in wrapper.log()
