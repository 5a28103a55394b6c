"""`comfy-worker client`: send work to a worker and watch it, or replay it at a rate.

Two ways to reach a worker:

* straight to its URL (`--url`): the public port (bearer token from `--token` or
  `WORKER_AUTH_TOKEN`) or the API wrapper itself (which also has `/generate/stream`);
* through the autoscaler (`--autoscaler --endpoint --api-key`): `POST {autoscaler}/route/` with
  `{"endpoint", "api_key", "cost": 100}` (`--cost`; 100 is what the vastai SDK's client sends)
  answers with signed `auth_data` whose `url` is the chosen worker, and the request goes there
  as `{"auth_data": ..., "payload": {"input": ...}}`. An answer without a `url` (no worker
  ready yet) carries a `request_idx`; the client asks again with it until a worker is assigned
  or the time runs out.

Exit status (app.py's policy): 0 done, 1 the request failed (the worker's own message is
printed), 2 a wrong option.
All network work is asyncio + aiohttp; files are written in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import click

from supervisor.commands import app

#: The cost sent to /route/ with each request: the vastai SDK client's default. The worker
#: decides a request's workload itself (autoscaler.workload) and does not read it.
ROUTE_COST = 100
ROUTE_RETRY_MAX = 2.0           # seconds between /route/ retries while no worker is ready
SPINNER_INTERVAL = 0.1
DEFAULT_TIMEOUT = 660.0         # the worker's own request timeout (600 s) plus a margin
_STREAM_STATUS = {"completed": 200, "cancelled": 499, "timeout": 504}
_FAILURE_STATUS = {"invalid": 400, "execution": 422, "comfyui_lost": 502, "restarted": 502,
                   "disk_full": 507}


class ClientError(Exception):
    """The request could not be delivered or answered; the message says why."""


class RouteError(ClientError):
    """The autoscaler did not assign a worker."""


# --- what to send, and where ---------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where requests go: a worker URL, or an autoscaler endpoint."""

    url: str | None = None
    token: str | None = None
    autoscaler: str | None = None
    endpoint: str | None = None
    api_key: str | None = None
    cost: float = ROUTE_COST

    @property
    def via_autoscaler(self) -> bool:
        return self.autoscaler is not None

    def describe(self) -> str:
        if self.via_autoscaler:
            return f"endpoint {self.endpoint!r} via {self.autoscaler}"
        return str(self.url)


def parse_value(text: str) -> Any:
    """`--set` values: JSON when the text is JSON (512, true, [1, 2], "x"), else the text itself."""
    def refuse(constant: str) -> Any:  # NaN and Infinity are not JSON; keep them as text
        raise ValueError(constant)

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


def parse_assignments(items: tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--set")
        values[key.strip()] = parse_value(raw)
    return values


def load_workflow_file(path: str) -> dict[str, Any]:
    """The request input for `--workflow FILE`.

    An API-format graph becomes `workflow_json`; a saved request (`{"input": {...}}`, or the
    autoscaler's envelope) is replayed as it is.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--workflow") from None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{path} is not JSON: {exc.msg} at line {exc.lineno}",
                                 param_hint="--workflow") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} holds no JSON object", param_hint="--workflow")
    if isinstance(data.get("payload"), dict) and isinstance(data["payload"].get("input"), dict):
        return dict(data["payload"]["input"])
    if isinstance(data.get("input"), dict):
        return dict(data["input"])
    return {"workflow_json": data}


def build_payload(modifier: str | None, assignments: tuple[str, ...], workflow: str | None,
                  request_id: str | None) -> dict[str, Any]:
    if bool(modifier) == bool(workflow):
        raise click.UsageError("give either --modifier NAME (with --set key=value) or "
                               "--workflow FILE")
    if assignments and not modifier:
        raise click.UsageError("--set changes a modifier's values; it needs --modifier")
    if modifier:
        body: dict[str, Any] = {"modifier": modifier,
                                "modifications": parse_assignments(assignments)}
    else:
        assert workflow is not None
        body = load_workflow_file(workflow)
    if request_id:
        body["request_id"] = request_id
    return {"input": body}


# --- one request ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    """How one request ended: the worker's answer, or why there was none."""

    status: int | None
    body: dict[str, Any]
    seconds: float
    error: str | None = None
    worker_url: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.body.get("status", "completed") == "completed"

    @property
    def label(self) -> str:
        """Short text for counting outcomes: the HTTP status, or the transport problem."""
        if self.status is not None:
            return str(self.status)
        return (self.error or "no answer").split(":", 1)[0]

    def message(self) -> str:
        """The worker's own explanation, with every field problem it listed."""
        if self.status is None:
            return self.error or "no answer"
        error = self.body.get("error")
        # The wrapper's own failures put text in `error`; a workflow ComfyUI refused puts the
        # text in `message` and ComfyUI's error object in `error`.
        text = str(error if isinstance(error, str) and error else
                   self.body.get("message") or error or "")
        if self.body.get("state") and self.body.get("reason"):
            text += f" (worker {self.body['state']}: {self.body['reason']})"
        lines = [f"HTTP {self.status}: {text}".rstrip(": ")]
        if isinstance(error, dict) and error.get("details"):
            lines.append(f"  details: {error['details']}")
        errors = self.body.get("errors")
        if isinstance(errors, dict):
            lines += [f"  {k}: {v}" for k, v in errors.items()]
        node_errors = self.body.get("node_errors")
        if isinstance(node_errors, dict) and node_errors:
            lines.append(f"  node_errors: {json.dumps(node_errors)[:2000]}")
        return "\n".join(lines)


async def _answer_json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    raw = await response.read()
    try:
        data = json.loads(raw)
    except ValueError:
        return {"error": raw.decode("utf-8", "replace").strip()[:500] or response.reason or ""}
    return data if isinstance(data, dict) else {"error": f"unexpected answer: {data!r}"[:500]}


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ClientError("timed out")
    return left


async def route(session: aiohttp.ClientSession, target: Target, deadline: float
                ) -> dict[str, Any]:
    """Signed `auth_data` for one request, asking again while no worker is ready."""
    assert target.autoscaler is not None
    url = target.autoscaler.rstrip("/") + "/route/"
    cost = int(target.cost) if float(target.cost).is_integer() else target.cost
    body: dict[str, Any] = {"endpoint": target.endpoint, "api_key": target.api_key,
                            "cost": cost}
    delay = 0.2
    while True:
        try:
            async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(
                    total=min(_remaining(deadline), 30))) as response:
                answer = await _answer_json(response)
                if response.status != 200:
                    raise RouteError(f"the autoscaler's /route/ answered HTTP {response.status}"
                                     f": {answer.get('error') or answer.get('msg') or answer}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise RouteError(f"could not reach the autoscaler at {url}: "
                             f"{exc.__class__.__name__} {exc}".rstrip()) from None
        if answer.get("url") and answer.get("signature"):
            return answer
        if answer.get("request_idx") is None:
            raise RouteError(f"the autoscaler's /route/ gave no worker: {answer}")
        # No worker is ready yet: keep our place in line by asking again with our request_idx.
        body["request_idx"] = answer["request_idx"]
        if time.monotonic() + delay >= deadline:
            raise RouteError(f"no worker became ready for endpoint {target.endpoint!r} "
                             f"(the autoscaler still says {answer.get('status', 'waiting')})")
        await asyncio.sleep(delay)
        delay = min(delay * 2, ROUTE_RETRY_MAX)


async def _prepare(session: aiohttp.ClientSession, target: Target, payload: dict[str, Any],
                   base64_outputs: bool, deadline: float
                   ) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(worker base URL, body, headers) for one request."""
    headers = {"X-Return-Outputs-As-Base64": "1"} if base64_outputs else {}
    if target.via_autoscaler:
        auth = await route(session, target, deadline)
        return str(auth["url"]).rstrip("/"), {"auth_data": auth, "payload": payload}, headers
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    assert target.url is not None
    return target.url.rstrip("/"), payload, headers


async def send_sync(session: aiohttp.ClientSession, target: Target, payload: dict[str, Any], *,
                    base64_outputs: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """One request to `/generate/sync`; never raises for network reasons."""
    began = time.monotonic()
    deadline = began + timeout
    worker = None
    try:
        worker, body, headers = await _prepare(session, target, payload, base64_outputs,
                                               deadline)
        async with session.post(worker + "/generate/sync", json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=_remaining(deadline))
                                ) as response:
            answer = await _answer_json(response)
            return Outcome(response.status, answer, time.monotonic() - began, None, worker)
    except (ClientError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
        return _failed(exc, began, f"no answer within {timeout:g} s", worker)


async def _read_events(response: aiohttp.ClientResponse):
    """Server-sent events as (name, data) pairs."""
    name, data = "message", []
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                try:
                    yield name, json.loads("\n".join(data))
                except ValueError:
                    yield name, {"raw": "\n".join(data)}
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


async def send_stream(session: aiohttp.ClientSession, target: Target, payload: dict[str, Any],
                      on_event: Callable[[str, dict[str, Any]], None], *,
                      base64_outputs: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """One request to the wrapper's `/generate/stream`, reporting each event to `on_event`."""
    began = time.monotonic()
    deadline = began + timeout
    worker = None
    try:
        worker, body, headers = await _prepare(session, target, payload, base64_outputs,
                                               deadline)
        async with session.post(worker + "/generate/stream", json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=_remaining(deadline))
                                ) as response:
            if response.status in (404, 405):
                return Outcome(None, {}, time.monotonic() - began,
                               f"{worker} has no /generate/stream (HTTP {response.status}); the "
                               "worker's public port offers only /generate/sync: drop --stream, "
                               "or point --url at the API wrapper", worker)
            if response.content_type != "text/event-stream":
                return Outcome(response.status, await _answer_json(response),
                               time.monotonic() - began, None, worker)
            async for name, data in _read_events(response):
                on_event(name, data)
                if name == "final_result":
                    result = data.get("result") if isinstance(data.get("result"), dict) else {}
                    return Outcome(_stream_status(result), result, time.monotonic() - began,
                                   None, worker)
        return Outcome(None, {}, time.monotonic() - began,
                       "the stream ended without a final result", worker)
    except (ClientError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
        return _failed(exc, began, f"no result within {timeout:g} s", worker)


def _failed(exc: BaseException, began: float, timed_out: str, worker: str | None) -> Outcome:
    """The Outcome of a request that got no answer; never raised to the caller."""
    if isinstance(exc, ClientError):
        error = str(exc)
    elif isinstance(exc, asyncio.TimeoutError):
        error = f"timeout: {timed_out}"
    else:
        error = f"{exc.__class__.__name__}: {exc}"
    return Outcome(None, {}, time.monotonic() - began, error, worker)


def _stream_status(result: dict[str, Any]) -> int:
    """The HTTP status `/generate/sync` would have answered for this result."""
    status = str(result.get("status", ""))
    if status in _STREAM_STATUS:
        return _STREAM_STATUS[status]
    return _FAILURE_STATUS.get(str(result.get("failure", "")), 500)


# --- outputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Saved:
    name: str
    path: Path | None        # None when nothing could be saved
    note: str = ""


def _safe_name(name: Any, index: int) -> str:
    # The worker names the file; never let that name leave the output folder.
    base = os.path.basename(str(name or "")).strip() or f"output_{index}"
    return base if base not in (".", "..") else f"output_{index}"


def _free_path(folder: Path, name: str) -> Path:
    path = folder / name
    stem, suffix = path.stem, path.suffix
    for n in itertools.count(1):
        if not path.exists():
            return path
        path = folder / f"{stem}_{n}{suffix}"
    raise AssertionError("unreachable")


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = _free_path(folder, name)
    path.write_bytes(data)
    return path


async def save_outputs(session: aiohttp.ClientSession, result: dict[str, Any], folder: Path
                       ) -> list[Saved]:
    """Write each output to `folder`: from its base64 `data`, else downloaded from its `url`."""
    saved: list[Saved] = []
    outputs = result.get("output") if isinstance(result.get("output"), list) else []
    for index, entry in enumerate(outputs):
        if not isinstance(entry, dict):
            continue
        name = _safe_name(entry.get("filename"), index)
        data: bytes | None = None
        note = ""
        if entry.get("data"):
            try:
                data = base64.b64decode(entry["data"], validate=True)
            except (binascii.Error, ValueError):
                note = "its base64 data is corrupt"
        elif entry.get("url"):
            try:
                async with session.get(entry["url"], timeout=aiohttp.ClientTimeout(
                        total=300)) as response:
                    if response.status == 200:
                        data = await response.read()
                    else:
                        note = f"download answered HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                note = f"download failed: {exc.__class__.__name__} {exc}".rstrip()
        else:
            note = str(entry.get("error") or entry.get("upload_error") or
                       "the worker sent neither data nor url")
        if data is None:
            saved.append(Saved(name, None, note))
            continue
        path = await asyncio.to_thread(_write, folder, name, data)
        saved.append(Saved(name, path, f"{len(data)} bytes"))
    return saved


# --- showing progress ----------------------------------------------------------------------------
class Progress:
    """Elapsed time and, when streaming, the step and speed; on stderr.

    On a terminal one line is redrawn by a spinner task; otherwise each change is one line, so
    logs and tests see the same facts.
    """

    def __init__(self, enabled: bool, tty: bool | None = None):
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.began = time.monotonic()
        self.state = "waiting for the worker"
        self.detail = ""
        self._task: asyncio.Task | None = None
        self._last_line = ""
        self._last_shown: tuple[str, str] | None = None

    def start(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self._task = asyncio.create_task(self._spin())
        else:
            click.echo(f"{self.state} ...", err=True)

    async def _spin(self) -> None:
        for frame in itertools.cycle("|/-\\"):
            elapsed = time.monotonic() - self.began
            line = f"{frame} {elapsed:6.1f} s  {self.state}  {self.detail}".rstrip()
            click.echo("\r" + line.ljust(len(self._last_line)), err=True, nl=False)
            self._last_line = line
            await asyncio.sleep(SPINNER_INTERVAL)

    def event(self, name: str, data: dict[str, Any]) -> None:
        """A server-sent event of `/generate/stream`."""
        if name == "progress" and isinstance(data.get("progress"), dict):
            step = data["progress"]
            its = step.get("its")
            self.state = "generating"
            self.detail = f"step {step.get('step')}/{step.get('max')}" + (
                f"  {its:.2f} it/s" if isinstance(its, (int, float)) else "")
        elif name in ("queued", "status"):
            self.state = str(data.get("status") or name)
            position = data.get("queue_position") or {}
            self.detail = (f"position {position.get('position')} of {position.get('queue_size')}"
                           if self.state == "pending" and position.get("position") else "")
        elif name == "final_result":
            self.state, self.detail = "finished", ""
        else:
            return
        if self.enabled and not self.tty and (self.state, self.detail) != self._last_shown:
            self._last_shown = (self.state, self.detail)
            click.echo(f"{time.monotonic() - self.began:6.1f} s  {self.state}  "
                       f"{self.detail}".rstrip(), err=True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            click.echo("\r" + " " * len(self._last_line) + "\r", err=True, nl=False)


def _format_timings(result: dict[str, Any], round_trip: float) -> str:
    t = result.get("timings") if isinstance(result.get("timings"), dict) else {}
    parts = [f"{label} {t[key]} ms" for key, label in (
        ("queue_ms", "queued"), ("model_download_ms", "model download"),
        ("preprocess_ms", "preprocess"), ("generation_ms", "generation"),
        ("postprocess_ms", "postprocess"), ("total_ms", "total"))
        if t.get(key) is not None and not (key == "model_download_ms" and not t[key])]
    text = "timings: " + (", ".join(parts) if parts else "none reported")
    if t.get("steps"):
        text += f"; {t['steps']} steps" + (f" at {t['sampling_its']} it/s"
                                           if t.get("sampling_its") else "")
    return text + f"; round trip {round_trip:.2f} s"


def _without_data(result: dict[str, Any]) -> dict[str, Any]:
    """The result for printing: base64 payloads replaced by their size."""
    shown = dict(result)
    if isinstance(shown.get("output"), list):
        shown["output"] = [
            {**entry, "data": f"<{len(entry['data'])} base64 characters>"}
            if isinstance(entry, dict) and entry.get("data") else entry
            for entry in shown["output"]]
    return shown


# --- load ----------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    requested: int
    rps: float
    concurrency: int
    seconds: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        return Counter(outcome.label for outcome in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(1 for outcome in self.outcomes if not outcome.ok)

    def latencies(self) -> dict[str, float]:
        values = sorted(outcome.seconds for outcome in self.outcomes)
        if not values:
            return {}
        return {"p50": percentile(values, 50), "p90": percentile(values, 90),
                "p99": percentile(values, 99), "max": values[-1], "min": values[0],
                "mean": sum(values) / len(values)}

    def to_json(self) -> dict[str, Any]:
        first_errors: dict[str, str] = {}
        for outcome in self.outcomes:
            if not outcome.ok and outcome.label not in first_errors:
                first_errors[outcome.label] = outcome.message().splitlines()[0][:300]
        return {"requests": len(self.outcomes), "seconds": round(self.seconds, 3),
                "achieved_rps": round(len(self.outcomes) / self.seconds, 3)
                if self.seconds else None,
                "asked_rps": self.rps, "concurrency": self.concurrency,
                "status_counts": dict(sorted(self.counts.items())), "failed": self.failed,
                "latency_s": {k: round(v, 4) for k, v in self.latencies().items()},
                "first_errors": first_errors}


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (p100 is the maximum)."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def run_load(target: Target, payload: dict[str, Any], *, count: int, rps: float,
                   concurrency: int, timeout: float,
                   on_done: Callable[[LoadReport, int], None] | None = None) -> LoadReport:
    """Start `count` requests at `rps` per second (0: as fast as allowed), at most `concurrency`
    at a time; a request that would exceed the cap waits, so the rate achieved may be lower.
    """
    report = LoadReport(count, rps, concurrency)
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task] = set()
    began = time.monotonic()
    base_id = payload["input"].get("request_id")

    async def one(index: int, session: aiohttp.ClientSession) -> None:
        body = payload
        if base_id:  # the wrapper refuses a second request with an id still in use
            body = {"input": {**payload["input"], "request_id": f"{base_id}-{index}"}}
        try:
            report.outcomes.append(await send_sync(session, target, body, timeout=timeout))
        finally:
            slots.release()
            if on_done:
                on_done(report, len(running) - 1)

    connector = aiohttp.TCPConnector(limit=concurrency + 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        for index in range(count):
            if rps > 0:
                delay = began + index / rps - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            task = asyncio.create_task(one(index, session))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
    report.seconds = time.monotonic() - began
    return report


# --- the commands --------------------------------------------------------------------------------
def _target_options(func):
    options = [
        click.option("--url", help="Worker (public port) or API wrapper URL, e.g. "
                                   "http://host:3000."),
        click.option("--token", envvar="WORKER_AUTH_TOKEN", show_envvar=True,
                     help="Bearer token of a stand-alone worker."),
        click.option("--autoscaler", metavar="URL",
                     help="Autoscaler base URL; requests are routed by its /route/."),
        click.option("--endpoint", metavar="NAME", help="Endpoint name at the autoscaler."),
        click.option("--api-key", envvar="AUTOSCALER_API_KEY", show_envvar=True,
                     help="API key of the endpoint at the autoscaler."),
        click.option("--cost", type=click.FloatRange(min=0), default=None,
                     help=f"The cost sent to the autoscaler's /route/ with each request "
                          f"(default {ROUTE_COST}, what the vastai SDK's client sends). The "
                          "worker does not use it: it counts each request as its own "
                          "autoscaler.workload (100 by default)."),
        click.option("--modifier", metavar="NAME", help="Modifier (e.g. Text2Image)."),
        click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                     help="A modifier value; parsed as JSON when it is JSON, else text. "
                          "Repeatable."),
        click.option("--workflow", type=click.Path(dir_okay=False),
                     help="API-format workflow JSON file (or a saved {\"input\": ...} request)."),
        click.option("--request-id", help="Request id (default: the worker makes one)."),
        click.option("--timeout", type=click.FloatRange(min=0.1), default=DEFAULT_TIMEOUT,
                     show_default=True, help="Seconds to wait for one request."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def make_target(url: str | None, token: str | None, autoscaler: str | None,
                endpoint: str | None, api_key: str | None, cost: float | None = None) -> Target:
    if bool(url) == bool(autoscaler):
        raise click.UsageError("give either --url (a worker) or --autoscaler with --endpoint "
                               "and --api-key")
    if autoscaler:
        missing = [name for name, value in (("--endpoint", endpoint), ("--api-key", api_key))
                   if not value]
        if missing:
            raise click.UsageError(f"--autoscaler needs {' and '.join(missing)}")
        return Target(autoscaler=autoscaler.rstrip("/"), endpoint=endpoint, api_key=api_key,
                      cost=ROUTE_COST if cost is None else cost)
    if cost is not None:
        raise click.UsageError("--cost goes to the autoscaler's /route/: it needs --autoscaler")
    assert url is not None
    if not url.startswith(("http://", "https://")):
        raise click.UsageError(f"--url {url!r} must start with http:// or https://")
    return Target(url=url.rstrip("/"), token=token or None)


@app.group("client", context_settings={"help_option_names": ["-h", "--help"]})
def client() -> None:
    """Send requests to a worker, directly or through the autoscaler."""


@client.command("generate")
@_target_options
@click.option("--stream", is_flag=True,
              help="Use /generate/stream (the API wrapper only) and show step/max and it/s.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Save the outputs in this folder (asks the worker for base64).")
@click.option("--base64/--no-base64", "want_base64", default=None,
              help="Ask for outputs as base64 (default: when --out is given).")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def generate_command(url, token, autoscaler, endpoint, api_key, cost, modifier, assignments,
                     workflow, request_id, timeout, as_json, stream, out_dir, want_base64, quiet
                     ) -> app.Outcome:
    """Send one request, follow it, save its outputs and print its timings."""
    target = make_target(url, token, autoscaler, endpoint, api_key, cost)
    if stream and target.via_autoscaler:
        raise click.UsageError("--stream needs --url of an API wrapper: the worker's public "
                               "port (and so the autoscaler) offers only /generate/sync")
    payload = build_payload(modifier, assignments, workflow, request_id)
    base64_outputs = bool(out_dir) if want_base64 is None else want_base64
    return asyncio.run(_generate(target, payload, stream=stream, timeout=timeout,
                                 out_dir=Path(out_dir) if out_dir else None,
                                 base64_outputs=base64_outputs, as_json=as_json,
                                 show_progress=not quiet))


async def _generate(target: Target, payload: dict[str, Any], *, stream: bool, timeout: float,
                    out_dir: Path | None, base64_outputs: bool, as_json: bool,
                    show_progress: bool) -> app.Outcome:
    progress = Progress(show_progress)
    async with aiohttp.ClientSession() as session:
        progress.start()
        try:
            if stream:
                outcome = await send_stream(session, target, payload, progress.event,
                                            base64_outputs=base64_outputs, timeout=timeout)
            else:
                outcome = await send_sync(session, target, payload,
                                          base64_outputs=base64_outputs, timeout=timeout)
        finally:
            await progress.stop()
        saved = await save_outputs(session, outcome.body, out_dir) \
            if outcome.ok and out_dir is not None else []
    if as_json:
        click.echo(json.dumps({"http_status": outcome.status, "error": outcome.error,
                               "worker": outcome.worker_url,
                               "round_trip_s": round(outcome.seconds, 3),
                               "saved": [str(s.path) for s in saved if s.path],
                               "result": _without_data(outcome.body)}, indent=2))
    if not outcome.ok:
        raise app.Failed(f"request failed: {outcome.message()}")
    if not as_json:
        body = outcome.body
        click.echo(f"{body.get('status', 'completed')} {body.get('id', '')} "
                   f"({target.describe()})")
        click.echo("  " + _format_timings(body, outcome.seconds))
        for item in saved:
            click.echo(f"  saved {item.path} ({item.note})" if item.path else
                       f"  not saved {item.name}: {item.note}")
        if out_dir is None:
            for entry in body.get("output") or []:
                if isinstance(entry, dict):
                    where = entry.get("url") or entry.get("local_path") or ""
                    click.echo(f"  output {entry.get('filename')}: {where}")
    return app.Outcome.FAILED if any(item.path is None for item in saved) else app.Outcome.OK


@client.command("load")
@_target_options
@click.option("-n", "--requests", "count", type=click.IntRange(min=1), default=10,
              show_default=True, help="How many requests to send.")
@click.option("--rps", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Requests started per second (0: as fast as --concurrency allows).")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Most requests in flight at once.")
def load_command(url, token, autoscaler, endpoint, api_key, cost, modifier, assignments,
                 workflow, request_id, timeout, as_json, count, rps, concurrency
                 ) -> app.Outcome:
    """Replay one request COUNT times at a rate; print status counts and latency percentiles.

    Exits 1 when any request did not complete.
    """
    target = make_target(url, token, autoscaler, endpoint, api_key, cost)
    payload = build_payload(modifier, assignments, workflow, request_id)
    tty = sys.stderr.isatty() and not as_json

    def on_done(report: LoadReport, in_flight: int) -> None:
        if tty:
            click.echo(f"\r{len(report.outcomes)}/{count} done, {in_flight} in flight, "
                       f"{report.failed} failed", err=True, nl=False)

    report = asyncio.run(run_load(target, payload, count=count, rps=rps,
                                  concurrency=concurrency, timeout=timeout, on_done=on_done))
    if tty:
        click.echo("", err=True)
    summary = report.to_json()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        achieved = summary["achieved_rps"]
        click.echo(f"{summary['requests']} requests to {target.describe()} in "
                   f"{report.seconds:.2f} s ({achieved} per second; asked "
                   f"{'unlimited' if not rps else rps}, concurrency {concurrency})")
        click.echo("status: " + ", ".join(f"{label} x{n}"
                                          for label, n in summary["status_counts"].items()))
        lat = summary["latency_s"]
        click.echo("latency (s): " + "  ".join(f"{k} {lat[k]:.3f}"
                                                for k in ("p50", "p90", "p99", "max")))
        for label, text in summary["first_errors"].items():
            click.echo(f"  first {label}: {text}", err=True)
    return app.Outcome.FAILED if report.failed else app.Outcome.OK


if __name__ == "__main__":  # pragma: no cover
    client(prog_name="comfy-worker client")
