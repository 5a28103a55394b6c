"""The operator's health report: one snapshot, rendered as a text table or as JSON.

`HealthReport` holds what `comfy-worker health` learnt: the daemon's own snapshot (the admin
socket's ``GET /status``) when the daemon answered, or what could be read directly from this host
when it did not. `render_table` and `render_json` only format it; nothing here does I/O, so every
case can be rendered in a test from a plain dict.

The verdict maps to the exit codes that monitoring systems expect (Nagios style):
0 healthy, 1 degraded, 2 unhealthy, 3 unknown (the daemon could not be asked). On a multi-GPU
host that reads over the whole host: 0 every instance serves, 1 some are out, 2 none serves.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import click

from api.modelstore.progress import human_bytes
from supervisor.commands.app import Verdict
from supervisor.commands.sparkline import sparkline
from supervisor.gpu.model import ClockEventReason

#: The report's verdict; its value is the exit code of `comfy-worker health` (app.py's policy).
Health = Verdict


#: Worker state (supervisor.state.WorkerState values) -> verdict. A worker that is starting,
#: benchmarking or stopping takes no work, so for a load balancer it is not healthy yet.
_STATE_HEALTH = {
    "ready": Health.HEALTHY,
    "degraded": Health.DEGRADED,
    "unhealthy": Health.UNHEALTHY,
    "starting": Health.UNHEALTHY,
    "provisioning": Health.UNHEALTHY,
    "benchmarking": Health.UNHEALTHY,
    "stopping": Health.UNHEALTHY,
}

_HEALTH_COLOUR = {Health.HEALTHY: "green", Health.DEGRADED: "yellow",
                  Health.UNHEALTHY: "red", Health.UNKNOWN: "magenta"}
_CHILD_COLOUR = {"ready": "green", "starting": "yellow", "restarting": "yellow",
                 "unhealthy": "red", "failed": "red", "stopped": None}
_LEVEL_COLOUR = {"ok": "green", "degraded": "yellow", "unhealthy": "red"}
# Clock reasons that cost speed because something is wrong (heat, power, the board itself).
_BAD_REASONS = {"hw_slowdown", "hw_thermal_slowdown", "sw_thermal_slowdown", "hw_power_brake"}
_CAPPED_REASONS = {"sw_power_cap"}
_CHILD_TITLES = {"comfyui": "ComfyUI", "wrapper": "wrapper"}
#: How many events the table shows (JSON carries all the daemon keeps).
EVENTS_SHOWN = 10


def judge(status: dict[str, Any]) -> tuple[Health, str, str]:
    """(verdict, label, reason) for a daemon snapshot; the label is what the table prints.

    Only the worker state decides: the daemon already folded the children, the GPU and the
    benchmark into it, and the report must not disagree with ``GET /health``.
    """
    worker = status.get("worker") if isinstance(status, dict) else None
    if not isinstance(worker, dict) or not isinstance(worker.get("state"), str):
        return Health.UNKNOWN, "UNKNOWN", "the daemon's answer has no worker state"
    state = worker["state"]
    reason = str(worker.get("reason") or "")
    health = _STATE_HEALTH.get(state, Health.UNKNOWN)
    if health is Health.UNKNOWN:
        return health, f"UNKNOWN ({state})", reason or f"unknown worker state {state!r}"
    if state in ("ready", "degraded", "unhealthy"):
        return health, health.name, reason
    return health, f"{health.name} ({state})", reason


@dataclass(frozen=True)
class HealthReport:
    """Everything one `comfy-worker health` run shows, for the table and for ``--json``.

    ``status`` is the daemon's snapshot when ``reachable``; otherwise it holds the local
    observations: ``gpu`` (same shape as the daemon's ``gpu`` section) and ``comfyui``
    (``{"processes": [...]}``).
    """

    health: Health
    label: str
    reason: str
    reachable: bool
    socket: str
    status: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why the daemon could not be asked
    taken_at: float = field(default_factory=time.time)

    @classmethod
    def from_daemon(cls, status: dict[str, Any], socket: str) -> "HealthReport":
        health, label, reason = judge(status)
        return cls(health, label, reason, True, socket, status)

    @classmethod
    def daemon_down(cls, error: str, socket: str, *, gpu: dict[str, Any] | None = None,
                    comfyui: dict[str, Any] | None = None) -> "HealthReport":
        local = {"gpu": gpu or {"status": "not read"},
                 "comfyui": comfyui or {"processes": []}}
        return cls(Health.UNKNOWN, "UNKNOWN", error, False, socket, local, error)

    def to_dict(self) -> dict[str, Any]:
        """The daemon's snapshot with the verdict and how it was reached on top."""
        head = {"health": {"verdict": self.health.name, "label": self.label,
                           "reason": self.reason, "exit_code": int(self.health)},
                "daemon": {"reachable": self.reachable, "socket": self.socket,
                           "error": self.error},
                "taken_at": self.taken_at}
        return {**head, **self.status}


def render_json(report: HealthReport, *, indent: int | None = 2) -> str:
    return json.dumps(report.to_dict(), indent=indent, default=str)


# --- formatting helpers ---------------------------------------------------------------------------
Style = Callable[..., str]  # style(text, colour=None, bold=False)


def _styler(color: bool) -> Style:
    def style(text: str, colour: Any = None, bold: bool = False) -> str:
        if not color or (colour is None and not bold):
            return text
        return click.style(text, fg=colour, bold=bold)
    return style


def _num(value: Any, digits: int = 0) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "?"
    return f"{value:.{digits}f}"


def duration(seconds: Any) -> str:
    """A compact human duration: 42 s, 5 min, 3 h 12 min, 2 d 4 h."""
    if not isinstance(seconds, (int, float)):
        return "-"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _clock(at: Any, now: float) -> str:
    """A wall-clock time, with the date when it is not within the last day."""
    if not isinstance(at, (int, float)):
        return "-"
    fmt = "%H:%M:%S" if now - at < 86400 else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(at))


def _ago(at: Any, now: float) -> str:
    if not isinstance(at, (int, float)):
        return "-"
    return f"{_clock(at, now)}, {duration(now - at)} ago"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], style: Style,
           indent: str = "  ") -> list[str]:
    """Left-aligned columns. A cell is text or (text, colour); colour is applied after padding
    so escape codes never shift the columns. The last column is not padded."""
    plain_rows = [[(c, None) if not isinstance(c, tuple) else c for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in plain_rows:
        for i, (text, _) in enumerate(row):
            widths[i] = max(widths[i], len(text))
    last = len(headers) - 1
    lines = [indent + "  ".join(h if i == last else h.ljust(widths[i])
                                for i, h in enumerate(headers)).rstrip()]
    for row in plain_rows:
        cells = []
        for i, (text, colour) in enumerate(row):
            padded = text if i == last else text.ljust(widths[i])
            cells.append(style(padded, colour) if colour else padded)
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _section(title: str, style: Style, detail: str = "") -> str:
    head = style(title, None, True) if title else ""
    return f"{head}  {detail}".rstrip() if detail else head


# --- sections -------------------------------------------------------------------------------------
def _reason_label(value: str) -> str:
    try:
        return ClockEventReason(value).label
    except ValueError:
        return value


def _gpu_rows(gpus: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for g in gpus:
        index = str(g.get("index", "?"))
        if g.get("state", "available") != "available":
            rows.append([index, (f"{g.get('state')}: {g.get('error') or 'no reading'}", "red"),
                         "", "", "", "", "", ""])
            continue
        t = g.get("temperature") or {}
        p = g.get("power") or {}
        c = g.get("clocks") or {}
        e = g.get("ecc") or {}
        link = g.get("pcie") or {}
        name = str(g.get("name") or "?").removeprefix("NVIDIA ")
        rows.append([index, name, _temp_cell(t), _power_cell(p), _clock_cell(c),
                     _throttle_cell(c), _ecc_cell(e, g.get("remapped_rows") or {},
                                                  g.get("retired_pages") or {}),
                     _pcie_cell(link, (g.get("utilization") or {}).get("gpu_pct"))])
    return rows


def _temp_cell(t: dict[str, Any]) -> tuple[str, Any]:
    current, slow, shut = t.get("current_c"), t.get("slowdown_c"), t.get("shutdown_c")
    text = f"{_num(current)}/{_num(slow)}" if slow is not None else _num(current)
    colour = None
    if isinstance(current, (int, float)):
        if isinstance(shut, (int, float)) and current >= shut - 2 or \
                isinstance(slow, (int, float)) and current >= slow:
            colour = "red"
        elif isinstance(slow, (int, float)) and current >= slow - 5:
            colour = "yellow"
    return text, colour


def _power_cell(p: dict[str, Any]) -> tuple[str, Any]:
    draw, limit, default = p.get("draw_w"), p.get("enforced_limit_w"), p.get("default_limit_w")
    if draw is None and limit is None:
        return "n/a", None
    text = f"{_num(draw)}/{_num(limit)}"
    capped = isinstance(limit, (int, float)) and isinstance(default, (int, float)) and \
        limit < default
    if capped:
        text += f" (default {_num(default)})"
    return text, "yellow" if capped else None


def _clock_cell(c: dict[str, Any]) -> tuple[str, Any]:
    sm, sm_max = c.get("sm_mhz"), c.get("sm_max_mhz")
    if sm is None:
        return "n/a", None
    return f"{_num(sm)}/{_num(sm_max)}", None


def _throttle_cell(c: dict[str, Any]) -> tuple[str, Any]:
    reasons = c.get("event_reasons")
    if reasons is None:
        return "n/a", None
    if not reasons:
        return "none", None
    names = set(reasons)
    colour = "red" if names & _BAD_REASONS else ("yellow" if names & _CAPPED_REASONS else None)
    return ", ".join(_reason_label(r) for r in reasons), colour


def _ecc_cell(e: dict[str, Any], rows: dict[str, Any], pages: dict[str, Any]) -> tuple[str, Any]:
    if e.get("enabled") is None:
        text, colour = "n/a", None
    elif not e["enabled"]:
        text, colour = "off", None
    else:
        corrected, uncorrected = e.get("volatile_corrected"), e.get("volatile_uncorrected")
        text = f"{_num(corrected)}/{_num(uncorrected)}"
        colour = "red" if isinstance(uncorrected, int) and uncorrected > 0 else None
    extra = []
    if rows.get("failure"):
        extra.append("remap FAILED")
        colour = "red"
    elif rows.get("pending"):
        extra.append("remap pending")
        colour = colour or "yellow"
    if pages.get("pending"):
        extra.append("retire pending")
        colour = colour or "yellow"
    return " ".join([text, *extra]), colour


def _pcie_cell(link: dict[str, Any], util: Any) -> tuple[str, Any]:
    gen, width, max_gen, max_width = (link.get(k) for k in ("gen", "width", "max_gen",
                                                             "max_width"))
    if gen is None and width is None:
        return "n/a", None
    text = f"Gen{_num(gen)} x{_num(width)} (Gen{_num(max_gen)} x{_num(max_width)})"
    below = (isinstance(gen, int) and isinstance(max_gen, int) and gen < max_gen) or \
        (isinstance(width, int) and isinstance(max_width, int) and width < max_width)
    # An idle GPU lowers its link generation on purpose; only flag it while the GPU works.
    busy = isinstance(util, (int, float)) and util >= 30
    return text, "yellow" if below and busy else None


def _gpu_section(gpu: dict[str, Any], style: Style, *, local: bool) -> list[str]:
    source = "from the daemon"
    if local:
        fake = gpu.get("source") if isinstance(gpu, dict) else None
        source = f"read directly from {fake}" if fake and fake != "nvml" else \
            "read directly from NVML"
    if not isinstance(gpu, dict) or "verdict" not in gpu:
        state = gpu.get("status") if isinstance(gpu, dict) else None
        return [_section("GPU", style, f"{state or 'not monitored'} ({source})")]
    verdict = gpu.get("verdict") or {}
    level = str(verdict.get("level", "?"))
    snap = gpu.get("snapshot") or {}
    nvml = snap.get("status") or {}
    parts = [f"verdict {style(level, _LEVEL_COLOUR.get(level))}"]
    if snap.get("driver_version"):
        parts.append(f"driver {snap['driver_version']}, CUDA {snap.get('cuda_version') or '?'}")
    if gpu.get("age_s") is not None:
        parts.append(f"read {gpu['age_s']} s ago")
    parts.append(source)
    if gpu.get("required") is False:
        parts.append("GPU not required")
    lines = [_section("GPU", style, "; ".join(parts))]
    if gpu.get("error"):
        lines.append(style(f"  cannot read the GPUs: {gpu['error']}", "red"))
    if nvml and nvml.get("state") not in (None, "available"):
        lines.append(style(f"  NVML {nvml.get('state')}: {nvml.get('error') or ''}".rstrip(),
                           "red"))
    gpus = snap.get("gpus") or []
    if gpus:
        lines += _table(["GPU", "NAME", "TEMP/SLOW °C", "POWER/LIMIT W", "SM/MAX MHz",
                         "THROTTLE", "ECC C/U", "PCIE (MAX)"], _gpu_rows(gpus), style)
    elif nvml.get("state") == "available":
        lines.append("  no NVIDIA GPU found")
    colour = _LEVEL_COLOUR.get(level)
    for reason in verdict.get("reasons") or []:
        lines.append(style(f"  ! {reason}", colour))
    for note in verdict.get("notes") or []:
        lines.append(f"  - {note}")
    watch = gpu.get("event_watch")
    if isinstance(watch, dict) and watch.get("state") not in (None, "running"):
        lines.append(f"  - XID events not watched ({watch.get('state')}"
                     f"{': ' + watch['detail'] if watch.get('detail') else ''})")
    return lines


def _history_section(gpu: dict[str, Any], style: Style) -> list[str]:
    """Sparklines of the last minutes of each GPU: temperature against its slowdown line, power
    against its limit, SM clock against its maximum. A cell at or over the line is red."""
    history = gpu.get("history") if isinstance(gpu, dict) else None
    if not isinstance(history, dict) or not history:
        return []
    lines = []
    for index, series in sorted(history.items(), key=lambda item: int(item[0])):
        ages = series.get("age_s") or []
        span = f"last {duration(max(ages))}" if ages else ""
        lines.append(_section(f"GPU {index} history", style, f"{span}, oldest left"))
        rows = (("temp", series.get("temperature_c"), series.get("slowdown_c"), 20.0, "°C",
                 "slowdown"),
                ("power", series.get("power_w"), series.get("power_limit_w"), 0.0, "W", "limit"),
                ("SM", series.get("sm_clock_mhz"), series.get("sm_clock_max_mhz"), 0.0, "MHz",
                 "max"))
        for name, values, line, low, unit, line_name in rows:
            values = list(values or [])
            known = [v for v in values if v is not None]
            if not known:
                continue
            high = max([*known, *([line] if line else [])])
            cells = sparkline(values, min(low, *known), high)
            if line and name != "SM":  # heat or power at the line is the problem
                cells = "".join(style(c, "red") if v is not None and v >= line * 0.98 else c
                                for c, v in zip(cells, values))
            last = known[-1]
            ref = f" ({line_name} {_num(line)})" if line else ""
            lines.append(f"  {name:<6}{cells}  {_num(min(known))}..{_num(max(known))}, "
                         f"now {_num(last)} {unit}{ref}")
    return lines


def _child_rows(children: dict[str, Any], now: float) -> list[list[Any]]:
    rows = []
    for key, c in children.items():
        state = str(c.get("state", "?"))
        last = c.get("last_exit")
        if isinstance(last, dict):
            last_text = f"{last.get('description') or '?'} ({duration(now - last['at'])} ago)" \
                if isinstance(last.get("at"), (int, float)) else str(last.get("description"))
        else:
            last_text = "-"
        restarts = c.get("restarts", 0)
        rows.append([_CHILD_TITLES.get(key, key), (state, _CHILD_COLOUR.get(state)),
                     str(c.get("pid") or "-"), duration(c.get("uptime_s")),
                     (str(restarts), "yellow" if restarts else None), last_text])
    return rows


def _children_section(children: dict[str, Any], style: Style, now: float,
                      logs: bool) -> list[str]:
    if not isinstance(children, dict) or not children:
        return [_section("PROCESSES", style, "none reported")]
    lines = [_section("PROCESSES", style)]
    lines += _table(["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT"],
                    _child_rows(children, now), style)
    for key, c in children.items():
        if c.get("state") != "ready" and c.get("reason"):
            lines.append(style(f"  {_CHILD_TITLES.get(key, key)}: {c['reason']}",
                               _CHILD_COLOUR.get(str(c.get("state")))))
    if logs:
        for key, c in children.items():
            tail = c.get("tail") or []
            lines.append("")
            lines.append(f"  {_CHILD_TITLES.get(key, key)} log, last {len(tail)} lines:")
            lines += [f"    | {line}" for line in tail] or ["    (nothing logged yet)"]
    return lines


_STATE_COLOUR = {"ready": "green", "degraded": "yellow", "unhealthy": "red", "starting": "yellow",
                 "provisioning": "yellow", "benchmarking": "yellow", "stopping": None}
_BENCH_COLOUR = {"pass": "green", "slow": "red", "error": "red", "no_reference": "yellow"}


def _comfyui_lines(instances: Any, style: Style) -> list[str]:
    """Which ComfyUI runs (from /system_stats), how its flags are known, its assets."""
    if not isinstance(instances, list) or not instances:
        return []
    versions = sorted({str(i.get("comfyui_version") or "not read yet") for i in instances})
    first = instances[0]
    flags, assets = first.get("comfyui_flags") or {}, first.get("assets") or {}
    facts = [" / ".join(versions)]
    if flags:
        facts.append("flags asked of it (--help)" if flags.get("exact")
                     else f"flags: {flags.get('source')}")
    if assets:
        facts.append(f"assets {assets.get('mode')} ({assets.get('why')})")
    lines = ["comfyui: " + "; ".join(facts)]
    if flags.get("warning"):
        lines.append(style(f"  {flags['warning']}", "yellow"))
    return lines


def _instance_rows(instances: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for i in instances:
        gpu = i.get("gpu") or {}
        children = i.get("children") or {}
        comfy, wrapper = children.get("comfyui") or {}, children.get("wrapper") or {}
        bench = i.get("benchmark") or {}
        state = str(i.get("state", "?"))
        bstatus = str(bench.get("status", "-"))
        its = f"{_num(bench['its'], 1)} it/s " if bench.get("its") is not None else ""
        where = "-" if gpu.get("index") is None else f"{gpu['index']} {gpu.get('name') or ''}"
        temp = gpu.get("temperature_c")
        comfy_state = str(comfy.get("state", "?"))
        restarts = comfy.get("restarts", 0)
        rows.append([
            str(i.get("instance", "?")), where.strip(),
            ("-" if temp is None else f"{_num(temp)}°C",
             _LEVEL_COLOUR.get(str(gpu.get("verdict")))),
            (state, _STATE_COLOUR.get(state)),
            (f"{comfy_state} pid {comfy.get('pid') or '-'} restarts {restarts}",
             _CHILD_COLOUR.get(comfy_state) if not restarts or comfy_state != "ready"
             else "yellow"),
            (str(wrapper.get("state", "?")), _CHILD_COLOUR.get(str(wrapper.get("state")))),
            (f"{its}{bstatus}", _BENCH_COLOUR.get(bstatus)),
            f"{i.get('served', 0)} ({i.get('in_flight', 0)} now)"])
    return rows


def _instances_section(instances: Any, style: Style) -> list[str]:
    """A row per instance (a multi-GPU host runs one ComfyUI and wrapper per GPU)."""
    if not isinstance(instances, list) or len(instances) < 2:
        return []
    serving = sum(1 for i in instances if i.get("state") in ("ready", "degraded"))
    lines = [_section("INSTANCES", style, f"{serving} of {len(instances)} serving")]
    lines += _table(["#", "GPU", "TEMP", "STATE", "COMFYUI", "WRAPPER", "BENCHMARK", "SERVED"],
                    _instance_rows(instances), style)
    for i in instances:
        if i.get("state") != "ready" and i.get("reason"):
            lines.append(style(f"  {i.get('instance')}: {i['reason']}",
                               _STATE_COLOUR.get(str(i.get("state")))))
    return lines


def _instance_logs(instances: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for i in instances:
        for key, c in (i.get("children") or {}).items():
            tail = c.get("tail") or []
            lines.append("")
            lines.append(f"  instance {i.get('instance')} {_CHILD_TITLES.get(key, key)} log, "
                         f"last {len(tail)} lines:")
            lines += [f"    | {line}" for line in tail] or ["    (nothing logged yet)"]
    return lines


def _queue_section(queue: dict[str, Any], style: Style) -> list[str]:
    if not isinstance(queue, dict):
        return []
    lines = [_section("QUEUE", style,
                      f"in flight {queue.get('in_flight', 0)}, waiting {queue.get('waiting', 0)}"
                      f" (max {queue.get('max_waiting', '?')})")]
    wrapper = queue.get("wrapper") or {}
    if wrapper.get("status"):
        text = f"  wrapper: {wrapper['status']}"
        if wrapper.get("reason"):
            text += f" ({wrapper['reason']})"
        lines.append(text)
    comfy = queue.get("comfyui") or {}
    if comfy.get("running"):
        since = comfy.get("seconds_since_progress")
        lines.append(f"  ComfyUI runs prompt {comfy['running']}, {comfy.get('pending', 0)} queued"
                     + (f", last progress {_num(since, 1)} s ago" if since is not None else ""))
    served = queue.get("served") or {}
    ok = sum(v for k, v in served.items() if str(k).startswith("2"))
    failed = {k: v for k, v in served.items() if not str(k).startswith("2") and v}
    text = f"  requests: {int(ok)} served, {int(sum(failed.values()))} failed"
    if failed:
        text += " (" + ", ".join(f"HTTP {k} x{int(v)}" for k, v in sorted(failed.items())) + ")"
    lines.append(style(text, "yellow") if failed else text)
    return lines


def _benchmark_section(bench: Any, style: Style, now: float) -> list[str]:
    if not isinstance(bench, dict) or not bench:
        return [_section("BENCHMARK", style, "no report")]
    status = str(bench.get("status", "?"))
    colour = {"pass": "green", "slow": "red", "error": "red",
              "no_reference": "yellow"}.get(status)
    head = style(status, colour)
    if bench.get("reason") and bench["reason"] != status:
        head += f": {bench['reason']}"
    lines = [_section("BENCHMARK", style, head)]
    facts = []
    if bench.get("max_perf") is not None:
        facts.append(f"max_perf {_num(bench['max_perf'], 3)} req/s")
    if bench.get("its") is not None:
        facts.append(f"{_num(bench['its'], 1)} it/s")
    if isinstance(bench.get("timestamp"), (int, float)) and bench["timestamp"] > 0:
        facts.append(f"measured {_ago(bench['timestamp'], now)}"
                     + (" (cached)" if bench.get("from_cache") else ""))
    if facts:
        lines.append("  " + "; ".join(facts))
    for cause in bench.get("causes") or []:
        if cause not in str(bench.get("reason") or ""):
            lines.append(f"  - {cause}")
    return lines


def _models_section(models: Any, style: Style) -> list[str]:
    if not isinstance(models, dict) or models.get("status") in (None, "none"):
        return [_section("MODELS", style, "no manifest")]
    status = str(models.get("status"))
    colour = {"ready": "green", "background": "green", "provisioning": "yellow",
              "failing": "red"}.get(status)
    head = style(status, colour)
    if models.get("reason"):
        head += f": {models['reason']}"
    lines = [_section("MODELS", style, head)]
    rows = []
    for item in models.get("files") or []:
        state = str(item.get("state"))
        shown = item.get("verified") or state
        if item.get("progress"):
            p = item["progress"]
            shown = f"{state} {human_size(p.get('done_bytes'))}/{human_size(p.get('total_bytes'))}"
        size = human_size(item.get("size")) if item.get("size") else ""
        rows.append([str(item.get("path")), str(item.get("when")),
                     (shown, "red" if item.get("error") else None), size,
                     str(item.get("error") or "")])
    if rows:
        lines += _table(["PATH", "WHEN", "STATE", "SIZE", "LAST ERROR"], rows, style)
    return lines


def _disk_section(disk: Any, style: Style) -> list[str]:
    """The disk guard: one row per filesystem the worker writes to (snapshot["disk"])."""
    if not isinstance(disk, dict) or not disk.get("filesystems"):
        return []
    level = str(disk.get("level"))
    colour = {"ok": "green", "degraded": "yellow", "unhealthy": "red"}.get(level)
    head = style({"ok": "ok", "degraded": "warning", "unhealthy": "critical"}.get(level, level),
                 colour)
    lines = [_section("DISK", style, head)]
    rows = []
    for fs in disk["filesystems"]:
        state = str(fs.get("level"))
        shown = {"ok": "ok", "degraded": "warning", "unhealthy": "critical"}.get(state, state)
        rows.append([str(fs.get("path", "")), str(fs.get("holds", "")),
                     (f"{_num(fs.get('percent_full'))}%", {"degraded": "yellow",
                                                          "unhealthy": "red"}.get(state)),
                     human_size(fs.get("free_bytes")), shown, str(fs.get("retention") or "")])
    lines += _table(["PATH", "HOLDS", "FULL", "FREE", "LEVEL", "RETENTION"], rows, style)
    return lines


def human_size(count: Any) -> str:
    return human_bytes(count) if isinstance(count, (int, float)) else "?"


def _events(status: dict[str, Any]) -> list[tuple[float, str, str, Any]]:
    """Daemon events (crashes, restarts) and GPU events (XIDs, ECC), oldest first."""
    found: list[tuple[float, str, str, Any]] = []
    for e in status.get("events") or []:
        if isinstance(e, dict):
            text = str(e.get("event", ""))
            colour = "red" if "failed" in text or "-> restarting" in text else None
            found.append((float(e.get("at") or 0), str(e.get("source", "?")), text, colour))
    gpu = status.get("gpu") if isinstance(status.get("gpu"), dict) else {}
    for e in gpu.get("events") or []:
        if not isinstance(e, dict):
            continue
        index = e.get("gpu_index")
        what = f"XID {e.get('xid')}: {e.get('meaning')}" if e.get("kind") == "xid" else \
            str(e.get("meaning") or e.get("kind"))
        severity = str(e.get("severity", ""))
        colour = {"critical": "red", "warning": "yellow"}.get(severity)
        found.append((float(e.get("time") or 0), f"GPU {'?' if index is None else index}",
                      f"{what} [{severity}]", colour))
    found.sort(key=lambda item: item[0])
    return found


def _events_section(status: dict[str, Any], style: Style, now: float) -> list[str]:
    events = _events(status)
    if not events:
        return [_section("EVENTS", style, "none")]
    shown = events[-EVENTS_SHOWN:]
    more = f"last {len(shown)} of {len(events)}" if len(events) > len(shown) else ""
    lines = [_section("EVENTS", style, more)]
    lines += _table(["TIME", "SOURCE", "EVENT"],
                    [[_clock(at, now), source, (text, colour)]
                     for at, source, text, colour in shown], style)
    return lines


def _local_processes_section(comfyui: dict[str, Any], style: Style, now: float) -> list[str]:
    procs = comfyui.get("processes") or []
    if comfyui.get("error"):
        return [_section("COMFYUI", style, f"could not look: {comfyui['error']}")]
    if not procs:
        return [_section("COMFYUI", style, "no ComfyUI process found on this host")]
    lines = [_section("COMFYUI", style,
                      f"{len(procs)} process(es) found, not supervised while the daemon is down")]
    lines += _table(["PID", "UPTIME", "COMMAND"],
                    [[str(p.get("pid")), duration(p.get("uptime_s")),
                      " ".join(p.get("cmdline") or [])] for p in procs], style)
    return lines


# --- the whole report -----------------------------------------------------------------------------
def render_table(report: HealthReport, *, logs: bool = False, color: bool = False,
                 now: float | None = None, history: bool = False) -> str:
    """The operator's view: the verdict first, then GPU, processes, queue, benchmark, events.

    `history`: add sparklines of the GPUs' last minutes (what `--watch` shows)."""
    style = _styler(color)
    now = report.taken_at if now is None else now
    colour = _HEALTH_COLOUR[report.health]
    verdict = style(report.label, colour, True)
    # The daemon joins several reasons with "; "; one per line reads better than one long line.
    reasons = [r for r in report.reason.split("; ") if r] if report.reason else []
    if len(reasons) > 1:
        lines = [f"{verdict}: {len(reasons)} problems"] + [f"  * {r}" for r in reasons]
    else:
        lines = [f"{verdict}: {report.reason}" if report.reason else verdict]
    status = report.status
    if not report.reachable:
        lines.append(f"daemon: {style('DOWN', 'red', True)} (admin socket {report.socket}); "
                     "showing what this host shows directly")
        lines.append("")
        lines += _gpu_section(status.get("gpu") or {}, style, local=True)
        lines.append("")
        lines += _local_processes_section(status.get("comfyui") or {}, style, now)
        return "\n".join(lines) + "\n"

    worker = status.get("worker") or {}
    facts = [f"pid {worker.get('pid', '?')}", f"up {duration(worker.get('uptime_s'))}"]
    if isinstance(worker.get("since"), (int, float)):
        facts.append(f"{worker.get('state')} since {_ago(worker['since'], now)}")
    if worker.get("draining"):
        facts.append(style("draining", "yellow"))
    if status.get("auth"):
        facts.append(f"auth {status['auth']}")
    lines.append("daemon: " + ", ".join(facts))
    lines += _comfyui_lines(status.get("instances"), style)
    gpu_block = _gpu_section(status.get("gpu") or {}, style, local=False)
    if history:
        gpu_block += _history_section(status.get("gpu") or {}, style)
    instances = status.get("instances")
    several = isinstance(instances, list) and len(instances) > 1
    for block in (gpu_block,
                  _instances_section(instances, style)
                  + (_instance_logs(instances) if logs else []) if several else
                  _children_section(status.get("children") or {}, style, now, logs),
                  _queue_section(status.get("queue") or {}, style),
                  _models_section(status.get("models"), style),
                  _disk_section(status.get("disk"), style),
                  [] if several else _benchmark_section(status.get("benchmark"), style, now),
                  _events_section(status, style, now)):
        if not block:
            continue
        lines.append("")
        lines += block
    return "\n".join(lines) + "\n"
