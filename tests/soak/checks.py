"""What the soak recorded, checked against what a user may expect, and the figures it prints.

Data and presentation apart: `verdict()` builds one `SoakReport`; `render()` writes it for people
and `to_json()` for machines.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

#: Every status a request may end with in the soak, as docs/api.md#status-codes documents them
#: (400 is not sent here; no fault fills a disk, so no 507).
DOCUMENTED = {200, 400, 422, 499, 502, 503, 504}
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


@dataclass
class SoakReport:
    seed: int
    seconds: float
    requests: int
    answers: Counter = field(default_factory=Counter)
    refused: int = 0          # no connection: the daemon was stopped on purpose (not accepted)
    lost: list[str] = field(default_factory=list)
    undocumented: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    outputs_checked: int = 0
    outputs_uploaded: int = 0
    outputs_upload_error: int = 0
    output_problems: list[str] = field(default_factory=list)
    half_written: list[str] = field(default_factory=list)
    webhooks_expected: int = 0
    webhooks_missing: list[str] = field(default_factory=list)
    webhooks_bad_signature: int = 0
    webhook_duplicates: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    stranger_prompts: int = 0
    orphans: list[str] = field(default_factory=list)
    rss: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        found = []
        if self.lost:
            found.append(f"{len(self.lost)} request(s) lost (no answer)")
        if self.answers.get("500"):
            found.append(f"{self.answers['500']} answer(s) were HTTP 500")
        if self.undocumented:
            found.append(f"undocumented statuses: {self.undocumented[:5]}")
        if self.duplicates:
            found.append(f"more than one answer for {self.duplicates[:5]}")
        if self.output_problems:
            found.append(f"{len(self.output_problems)} output problem(s): "
                         f"{self.output_problems[:3]}")
        if self.half_written:
            found.append(f"half-written files: {self.half_written[:3]}")
        if self.webhooks_missing:
            found.append(f"{len(self.webhooks_missing)} finished request(s) without a webhook: "
                         f"{self.webhooks_missing[:5]}")
        if self.webhooks_bad_signature:
            found.append(f"{self.webhooks_bad_signature} webhook(s) with a bad signature")
        if self.stranger_prompts:
            found.append(f"{self.stranger_prompts} prompt(s) sent to the stranger on the port")
        if self.orphans:
            found.append(f"orphan processes: {self.orphans[:3]}")
        broken = [f"{f['kind']}: {f['note']}" for f in self.faults if not f["ok"]]
        if broken:
            found.append(f"faults not handled: {broken[:3]}")
        return found

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "seconds": round(self.seconds, 1), "requests": self.requests,
                "answers": dict(sorted(self.answers.items())), "refused": self.refused,
                "lost": len(self.lost), "latency_s": self.latency,
                "outputs": {"checked": self.outputs_checked, "uploaded": self.outputs_uploaded,
                            "upload_error": self.outputs_upload_error,
                            "problems": self.output_problems[:20]},
                "webhooks": {"expected": self.webhooks_expected,
                             "missing": self.webhooks_missing[:20],
                             "bad_signature": self.webhooks_bad_signature,
                             "duplicate_deliveries": self.webhook_duplicates},
                "faults": self.faults,
                "faults_by_kind": dict(Counter(f["kind"] for f in self.faults)),
                "stranger_prompts": self.stranger_prompts, "orphans": self.orphans,
                "rss_mib": self.rss, "half_written": self.half_written,
                "failures": self.failures, "passed": not self.failures}


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def check_answers(report: SoakReport, outcomes: list[tuple[str, Any]]) -> None:
    """`outcomes`: (request id, client Outcome) for every request sent."""
    seen = Counter(rid for rid, _ in outcomes)
    report.duplicates = [rid for rid, n in seen.items() if n > 1]
    latencies = []
    for rid, outcome in outcomes:
        if outcome.status is None:
            if "ClientConnectorError" in (outcome.error or "") or \
                    "Cannot connect" in (outcome.error or ""):
                report.refused += 1  # never accepted: the daemon was down on purpose
            else:
                report.lost.append(f"{rid}: {outcome.error}")
            continue
        report.answers[str(outcome.status)] += 1
        latencies.append(outcome.seconds)
        if outcome.status not in DOCUMENTED:
            report.undocumented.append(f"{rid}: {outcome.status}")
    if latencies:
        report.latency = {"p50": round(percentile(latencies, 50), 3),
                          "p99": round(percentile(latencies, 99), 3),
                          "max": round(max(latencies), 3)}


def check_outputs(report: SoakReport, outcomes: list[tuple[str, Any]], s3: Any,
                  bucket: str) -> None:
    """Blocking (files, S3): every 200's files whole on disk, and in S3 or with upload_error."""
    for rid, outcome in outcomes:
        if outcome.status != 200:
            continue
        for item in outcome.body.get("output") or []:
            if item.get("type") == "text":
                continue
            report.outputs_checked += 1
            path = Path(item.get("local_path") or "")
            try:
                data = path.read_bytes()
            except OSError as exc:
                report.output_problems.append(f"{rid}: {path}: {exc.strerror}")
                continue
            if not data.endswith(_IEND):
                report.output_problems.append(f"{rid}: {path} is not a whole PNG")
            if item.get("upload_error"):
                report.outputs_upload_error += 1
            elif item.get("url"):
                try:
                    head = s3.head_object(Bucket=bucket, Key=f"{rid}/{item['filename']}")
                except Exception as exc:
                    report.output_problems.append(f"{rid}: uploaded but not in S3 ({exc})")
                    continue
                if head.get("ContentLength") != len(data):
                    report.output_problems.append(f"{rid}: S3 copy has "
                                                  f"{head.get('ContentLength')} bytes, disk "
                                                  f"{len(data)}")
                report.outputs_uploaded += 1
            else:
                report.output_problems.append(f"{rid}: neither url nor upload_error")


def check_half_written(report: SoakReport, folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith((".partial", ".tmp")):
                report.half_written.append(os.path.join(root, name))


def check_webhooks(report: SoakReport, finished: list[str], hits: list[Any]) -> None:
    """Every request the wrapper finished got at least one correctly signed webhook."""
    report.webhooks_expected = len(finished)
    good = {hit.request_id for hit in hits if hit.signature_ok}
    report.webhooks_missing = [rid for rid in finished if rid not in good]
    report.webhooks_bad_signature = sum(1 for hit in hits if not hit.signature_ok)
    deliveries = Counter(hit.delivery for hit in hits)
    report.webhook_duplicates = sum(n - 1 for n in deliveries.values() if n > 1)


def find_orphans(marker: str) -> list[str]:
    """Processes still alive whose command line names the soak's folder."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if marker in line and proc.info["pid"] != os.getpid():
            found.append(f"pid {proc.info['pid']}: {line[:120]}")
    return found


def render(report: SoakReport) -> str:
    data = report.to_json()
    lines = [f"soak: seed {report.seed}, {report.seconds:.0f} s, {report.requests} requests",
             "answers by status: " + ", ".join(f"{k} x{v}" for k, v in
                                              sorted(report.answers.items())),
             f"not accepted (daemon stopped on purpose): {report.refused}",
             f"lost: {len(report.lost)}",
             f"latency of answered requests: p50 {report.latency.get('p50', '?')} s, "
             f"p99 {report.latency.get('p99', '?')} s, max {report.latency.get('max', '?')} s",
             f"outputs of 200s: {report.outputs_checked} checked whole on disk; "
             f"{report.outputs_uploaded} in S3, {report.outputs_upload_error} with upload_error",
             f"webhooks: {report.webhooks_expected} finished requests, "
             f"{len(report.webhooks_missing)} without a signed delivery, "
             f"{report.webhook_duplicates} duplicate deliveries, "
             f"{report.webhooks_bad_signature} bad signatures",
             "faults by kind: " + ", ".join(f"{k} x{v}" for k, v in
                                           sorted(data["faults_by_kind"].items()))]
    for fault in report.faults:
        lines.append(f"  {fault['at']:6.1f} s {fault['kind']:<16} "
                     f"{'ok ' if fault['ok'] else 'BAD'} {fault['note']}")
    for row in report.rss:
        lines.append(f"RSS {row['process']} (pid {row['pid']}): {row['first']:.1f} -> "
                     f"{row['last']:.1f} MiB over {row['seconds']:.0f} s "
                     f"({row['last'] - row['first']:+.1f})")
    lines.append(f"orphan processes after the run: {len(report.orphans)}")
    lines.append("PASSED" if not report.failures else
                 "FAILED:\n  " + "\n  ".join(report.failures))
    return "\n".join(lines)


def dump(report: SoakReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2))
