"""Hypothesis throws malformed bodies and odd headers at the public port and at the API wrapper.

Whatever arrives: never a 500, never a crash (the daemon and both children keep their pids),
and afterwards the worker is still ready and a valid request still works. One worker serves the
whole module; requests go through http.client so hypothesis stays synchronous.
"""

from __future__ import annotations

import http.client
import socket
import time
import json
import os
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.bodies import documents
from tests.support.procs import get_json, post_json, start_worker
from tests.support.workflows import TINY

pytestmark = pytest.mark.e2e

TOKEN = "fuzz-t0ken"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))  # raise it for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
# What a malformed or refused request may get; 500 (a bug), 502 (a child lost) never.
ALLOWED = {200, 400, 401, 404, 409, 413, 415, 417, 422}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    # Small limits keep the valid requests hypothesis stumbles on quick.
    env = {"WORKER_AUTH_TOKEN": TOKEN, "API_MAX_DIMENSION": "128", "API_MAX_STEPS": "4",
           "API_INPUT_TIMEOUT": "2", "WEBHOOK_TIMEOUT": "2", "API_REQUEST_TIMEOUT": "20",
           # Hang detection is not under test here; on a loaded machine the test defaults
           # (3 s) restarted ComfyUI mid-run and requests waited out the restart.
           "SUPERVISOR_PROBE_TIMEOUT": "5", "SUPERVISOR_HANG_TIMEOUT": "30"}
    with start_worker(tmp, "--step-seconds", "0.001", env=env) as running:
        running.pids = pids(running)
        yield running


def pids(worker) -> tuple[int, int | None, int | None]:
    return (worker.process.pid, worker.child_pid("comfyui"), worker.child_pid("wrapper"))


# --- strategies: the bodies (tests/support/bodies.py), cut, nested and padded; the headers --------
def deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    return opener * depth + closer * depth


raw_bodies = st.one_of(
    documents.map(lambda d: json.dumps(d).encode()),
    documents.map(lambda d: json.dumps(d).encode()).flatmap(
        lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda n: b[:n])),   # cut short
    st.binary(max_size=300),
    st.integers(1, 20_000).map(lambda n: deep(n, b"[", b"]")),
    st.integers(1, 5_000).map(lambda n: b'{"input": ' + b'{"a": ' * n + b"1" + b"}" * (n + 1)),
    st.integers(0, 2_000_000).map(lambda n: json.dumps(
        {"input": {"modifier": "Text2Image", "modifications": {
            "prompt": "x" * n, "steps": 1, "width": 16, "height": 16}}}).encode()),
    st.integers(0, 500_000).map(lambda n: b'{"input": "' + b"\xff\xfe" * n + b'"}'),
    st.sampled_from([b"", b" ", b"null", b"NaN", b"1e999999", b'"\\ud800"', b"{}",
                     b'{"input": {"modifier": "Text2Image", "modifications": {"steps": NaN}}}',
                     b'{"input": {}, "input": {"modifier": 1}}', b"\xef\xbb\xbf{}"]),
)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                             blacklist_characters="\x7f"), max_size=60)
content_types = st.sampled_from([
    None, "application/json", "text/plain", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz", "application/json; charset=latin-1",
    "application/json; charset=utf-16", "", "*/*"]) | header_text
authorizations = st.sampled_from([
    None, f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer  {TOKEN} ", "Bearer", "Bearer ",
    "Bearer wrong", "Basic Zm9vOmJhcg==", TOKEN, f"Bearer {TOKEN}x", f"Token {TOKEN}"]) | \
    header_text.map(lambda t: "Bearer " + t)
extra_headers = st.dictionaries(
    st.sampled_from(["X-Return-Outputs-As-Base64", "X-Include-ComfyUI-Response", "Accept",
                     "Content-Encoding", "Expect", "X-Forwarded-For"]),
    header_text | st.sampled_from(["1", "true", "gzip", "deflate", "identity", "100-continue"]),
    max_size=3)


# --- sending -------------------------------------------------------------------------------------
def send(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    status, _, payload = exchange(url, path, body, headers)
    return status, payload


def exchange(url: str, path: str, body: bytes, headers: dict[str, str]
             ) -> tuple[int, str, bytes]:
    """(status, content type, body) of one POST."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def build_headers(content_type: str | None, authorization: str | None,
                  extra: dict[str, str]) -> dict[str, str]:
    headers = dict(extra)
    if content_type is not None:
        headers["Content-Type"] = content_type
    if authorization is not None:
        headers["Authorization"] = authorization
    return headers


def check_answer(status: int, content_type: str, payload: bytes, what: str) -> None:
    assert status in ALLOWED, f"{what}: HTTP {status}: {payload[:500]!r}"
    if status == 200:
        return
    if content_type.startswith("application/json"):
        # Every refusal of ours explains itself.
        body = json.loads(payload)
        assert isinstance(body, dict) and body.get("error"), body
    else:
        # aiohttp refuses some requests itself (a body it cannot decode, an odd Expect), in
        # plain text and before any handler runs; nothing else may answer without JSON.
        assert status in (400, 417) and content_type.startswith("text/plain"), \
            f"{what}: HTTP {status} {content_type}: {payload[:500]!r}"


def assert_still_serving(worker) -> None:
    assert worker.process.poll() is None, worker.log()[-3000:]
    assert pids(worker) == worker.pids, "a process was restarted"
    status, health = get_json(worker.url + "/health")
    assert status == 200, health
    assert get_json(worker.wrapper_url + "/health")[0] == 200
    status, body = post_json(worker.url + "/generate/sync", {"input": {"workflow_json": TINY}},
                             {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["status"] == "completed", body


# --- tests ---------------------------------------------------------------------------------------
@FUZZ
@given(body=raw_bodies, content_type=content_types, authorization=authorizations,
       extra=extra_headers)
def test_public_port_never_fails_on_odd_requests(worker, body, content_type, authorization,
                                                 extra):
    headers = build_headers(content_type, authorization, extra)
    status, answer_type, payload = exchange(worker.url, "/generate/sync", body, headers)
    check_answer(status, answer_type, payload, f"public port, headers {headers}")


@FUZZ
@given(body=raw_bodies, content_type=content_types, extra=extra_headers,
       path=st.sampled_from(["/generate/sync", "/generate/stream"]))
def test_wrapper_never_fails_on_odd_requests(worker, body, content_type, extra, path):
    headers = build_headers(content_type, None, extra)
    status, answer_type, payload = exchange(worker.wrapper_url, path, body, headers)
    if path == "/generate/stream" and status == 200:
        # Accepted: the stream must end with the result, whatever the result is.
        assert b"event: final_result" in payload, payload[-500:]
    else:
        check_answer(status, answer_type, payload, f"wrapper {path}, headers {headers}")


# Minimal cases the fuzzing found (each answered 500 and logged a traceback per request).
@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer \x80"},          # not UTF-8: the token gate failed to encode it
    {"Authorization": f"Bearer {TOKEN}\xe9"},
    {"Expect": "\x80"},                        # aiohttp's default Expect handler echoes it
    {"Content-Encoding": "gzip"},              # a body that is not gzip (now: 415 at the door)
    {"Content-Encoding": "deflate"},
], ids=["auth-x80", "auth-token-xe9", "expect-x80", "gzip-plain", "deflate-plain"])
@pytest.mark.parametrize("side", ["public", "wrapper"])
def test_odd_headers_found_by_fuzzing_are_refused_cleanly(worker, headers, side):
    url = worker.url if side == "public" else worker.wrapper_url
    status, payload = send(url, "/generate/sync", b'{"input": {}}', headers)
    assert status in {400, 401, 415, 417}, f"{side} {headers}: HTTP {status}: {payload[:300]!r}"


def test_worker_is_still_ready_and_serving_afterwards(worker):
    assert_still_serving(worker)
    # A bug caught by an error middleware is logged even when the client saw another status.
    logs = worker.log() + "".join(p.read_text(errors="replace")
                                  for p in (worker.log_path.parent / "logs").glob("*.log"))
    assert "bug while serving" not in logs


def _send_in_two_parts(url: str, path: str, body: bytes, headers: dict[str, str],
                       pause: float) -> bytes:
    """One POST whose body arrives `pause` seconds after its headers (two TCP segments); the
    raw answer's first bytes, or b"" when nothing comes within 10 s."""
    parts = urlsplit(url)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\n{head}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(pause)
        sock.sendall(body)
        try:
            return sock.recv(200)
        except socket.timeout:
            return b""


@pytest.mark.parametrize("coding", ["deflate", "gzip", "br"])
def test_a_compressed_body_is_refused_at_once_on_both_ports(worker, coding):
    # aiohttp's own decompression once left such a request waiting forever when the body came
    # after its headers and did not decompress; now every content coding is a 415 at the door.
    headers = {"Content-Type": "application/json", "Content-Encoding": coding,
               "Authorization": f"Bearer {TOKEN}"}
    for url in (worker.wrapper_url, worker.url):
        for pause in (0.0, 0.2):
            answer = _send_in_two_parts(url, "/generate/sync", b'{"i', headers, pause)
            assert answer.startswith(b"HTTP/1.1 415"), (url, pause, answer)
    # A plain body still goes through as before.
    status, _ = post_json(worker.url + "/generate/sync", {"input": {}},
                          headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 400
