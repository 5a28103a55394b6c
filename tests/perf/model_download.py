"""Model download throughput and memory: our engine against curl, and the daemon's peak RSS.

One file (default 2 GiB, random bytes) is served from disk by a local HTTP server in its own
process. Then, for each of `--runs` rounds:
- curl fetches it to disk (`curl -sS -o FILE URL`): the reference; then curl again followed by
  `sync FILE` (our engine fsyncs before its rename), and curl piped through `tee FILE | sha256sum`
  then `sync FILE` (the same work as ours: hashed, on disk);
- our engine fetches it in a fresh process (stream to a part file, SHA-256 while streaming,
  fsync, verify, rename), timed around the download alone; the process's peak RSS comes from
  wait4(2).
Last, the whole daemon (`comfy-worker run`, the simulator as ComfyUI) starts with the file as a
`before_ready` manifest entry; its RSS is sampled from start to ready. Flat memory means the peak
does not grow with the file: it stays near the daemon's RSS before the download.

    .venv/bin/python -m tests.perf.model_download [--size-mb 2048] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.perf.common import (
    PerfError,
    clean_env,
    free_port,
    http_status,
    launch,
    note,
    run_script,
    serving,
    table,
    wait_until,
)
from tests.support import procs

MIB = 1024 * 1024
BLOCK = 16 * MIB


def make_file(path: Path, size: int) -> str:
    """Random-looking bytes (a random block, each copy varied) and their SHA-256."""
    digest = hashlib.sha256()
    block = bytearray(os.urandom(BLOCK))
    written = 0
    with open(path, "wb") as handle:
        while written < size:
            block[:8] = written.to_bytes(8, "little")
            piece = memoryview(block)[:min(BLOCK, size - written)]
            handle.write(piece)
            digest.update(piece)
            written += len(piece)
    return digest.hexdigest()


def drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def timed_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child process (peak RSS from wait4)."""
    started = time.monotonic()
    process = procs.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = process.stdout.read(), process.stderr.read()  # type: ignore[union-attr]
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise PerfError(f"{argv[0]} exited {process.returncode}: {err.decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, out.decode()


def engine_child(url: str, dest: str, sha256: str) -> int:
    """In the child: fetch once with the engine, print the seconds the download took."""
    import asyncio

    from api.modelstore.download import Downloader
    from api.modelstore.sources import HttpSource

    async def go() -> float:
        downloader = Downloader()
        started = time.monotonic()
        try:
            await downloader.fetch(HttpSource(url), Path(dest), sha256=sha256)
        finally:
            await downloader.close()
        return time.monotonic() - started

    print(json.dumps({"seconds": asyncio.run(go())}))
    return 0


def measure_daemon(workdir: Path, url: str, sha256: str, size: int) -> dict[str, Any]:
    import psutil

    comfy_port, wrapper_port, public_port = free_port(), free_port(), free_port()
    base = workdir / "daemon-comfyui"
    manifest = workdir / "manifest.toml"
    manifest.write_text(f'[[models]]\nurl = "{url}"\npath = "checkpoints/perf.safetensors"\n'
                        f'sha256 = "{sha256}"\n')
    command = [sys.executable, "-m", "simulator", "--listen", "127.0.0.1", "--port",
               str(comfy_port), "--base-directory", str(base)]
    env = clean_env(
        COMFYUI_COMMAND=json.dumps(command), COMFYUI_CWD=str(workdir),
        COMFYUI_URL=f"http://127.0.0.1:{comfy_port}", WRAPPER_URL=f"http://127.0.0.1:{wrapper_port}",
        WORKER_HOST="127.0.0.1", WORKER_PORT=str(public_port),
        WORKER_STATE_DIR=str(workdir / "daemon-state"), WORKER_LOG_DIR=str(workdir / "logs"),
        WORKER_ADMIN_SOCKET=str(workdir / "admin.sock"), UNSECURED="true", GPU_REQUIRED="false",
        BENCHMARK_ENABLED="false", METRICS_PORT="0", MODELS_MANIFEST=str(manifest),
        WORKER_DRAIN_TIMEOUT="3", SUPERVISOR_CHILD_STOP_TIMEOUT="3")
    daemon = launch("the daemon", [sys.executable, "-m", "supervisor.commands.cli", "run"], env,
                    workdir / "daemon.log", f"http://127.0.0.1:{public_port}", new_session=True)
    process = psutil.Process(daemon.process.pid)
    samples: list[tuple[float, float]] = []
    started = time.monotonic()

    def ready() -> bool:
        if daemon.process.poll() is not None:
            raise PerfError(f"the daemon exited; log tail:\n{daemon.log_tail()}")
        try:
            samples.append((time.monotonic() - started, process.memory_info().rss / MIB))
        except psutil.Error:
            return False
        return http_status(daemon.url + "/health", timeout=1) == 200

    with serving(daemon, lambda: True, 30, grace=15):
        wait_until(ready, 600, "the daemon to provision the model and be ready", interval=0.05)
    seconds = time.monotonic() - started
    placed = base / "models/checkpoints/perf.safetensors"
    if not placed.exists() or placed.stat().st_size != size:
        raise PerfError("the daemon did not place the model file")
    return {"seconds_to_ready": round(seconds, 2), "rss_at_ready_mib": round(samples[-1][1], 1),
            "rss_peak_mib": round(max(rss for _, rss in samples), 1),
            "samples": len(samples)}


def measure(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    if not shutil.which("curl"):
        raise PerfError("curl is not installed (apt-get install curl)")
    size = args.size_mb * MIB
    source = workdir / "source.bin"
    note(f"writing a {args.size_mb} MiB file ...")
    sha256 = make_file(source, size)
    port = free_port()
    server = launch("the file server", [sys.executable, "-m", "tests.support.fileserver",
                                        "--port", str(port), f"model.bin={source}"],
                    clean_env(), workdir / "fileserver.log", f"http://127.0.0.1:{port}")
    url = f"{server.url}/model.bin"
    rounds = []
    with serving(server, lambda: http_status(url.replace("model.bin", "none")) == 404, 30):
        for index in range(args.runs):
            curl_dest = workdir / "curl.bin"
            curl_s, curl_rss, _ = timed_child(["curl", "-sS", "--fail", "-o", str(curl_dest), url])
            drop(curl_dest)
            # Our engine fsyncs before the rename; curl does not. The fair disk reference:
            sync_s, _, _ = timed_child(["sh", "-c", 'curl -sS --fail -o "$1" "$2" && sync "$1"',
                                        "sh", str(curl_dest), url])
            drop(curl_dest)
            # Like for like: curl's bytes hashed by sha256sum on the way to the disk, then synced.
            hashed_s, _, _ = timed_child(
                ["sh", "-c", 'curl -sS --fail "$2" | tee "$1" | sha256sum >/dev/null && sync "$1"',
                 "sh", str(curl_dest), url])
            drop(curl_dest)
            dest = workdir / "models" / "perf.safetensors"
            dest.parent.mkdir(exist_ok=True)
            wall, rss, out = timed_child(
                [sys.executable, "-m", "tests.perf.model_download", "--child", url,
                 str(dest), sha256], clean_env())
            engine_s = json.loads(out.strip().splitlines()[-1])["seconds"]
            drop(dest)
            rounds.append({"curl_s": round(curl_s, 3), "engine_s": round(engine_s, 3),
                           "engine_process_s": round(wall, 3),
                           "curl_mb_s": round(size / curl_s / 1e6, 1),
                           "engine_mb_s": round(size / engine_s / 1e6, 1),
                           "ratio": round(curl_s / engine_s, 3),
                           "curl_fsync_mb_s": round(size / sync_s / 1e6, 1),
                           "ratio_fsync": round(sync_s / engine_s, 3),
                           "curl_sha_fsync_mb_s": round(size / hashed_s / 1e6, 1),
                           "ratio_sha_fsync": round(hashed_s / engine_s, 3),
                           "engine_peak_rss_mib": round(rss, 1),
                           "curl_peak_rss_mib": round(curl_rss, 1)})
            note(f"round {index + 1}: curl {rounds[-1]['curl_mb_s']} MB/s, engine "
                 f"{rounds[-1]['engine_mb_s']} MB/s (with SHA-256), ratio {rounds[-1]['ratio']}")
        daemon = measure_daemon(workdir, url, sha256, size) if not args.no_daemon else None
    ratios = sorted(r["ratio"] for r in rounds)
    fsync_ratios = sorted(r["ratio_fsync"] for r in rounds)
    sha_ratios = sorted(r["ratio_sha_fsync"] for r in rounds)
    return {"size_mib": args.size_mb, "rounds": rounds,
            "median_ratio": ratios[len(ratios) // 2],
            "median_ratio_fsync": fsync_ratios[len(fsync_ratios) // 2],
            "median_ratio_sha_fsync": sha_ratios[len(sha_ratios) // 2], "daemon": daemon,
            "cpus": os.cpu_count()}


def render(report: dict[str, Any]) -> str:
    lines = [f"Model download, {report['size_mib']} MiB from a local HTTP server "
             f"({report['cpus']} CPUs)", ""]
    lines.append(table(["round", "curl", "curl+fsync", "curl+sha256sum+fsync",
                        "engine (sha256+fsync)", "engine peak RSS MiB"],
                       [[str(i + 1), r["curl_mb_s"], r["curl_fsync_mb_s"],
                         r["curl_sha_fsync_mb_s"], r["engine_mb_s"], r["engine_peak_rss_mib"]]
                        for i, r in enumerate(report["rounds"])]))
    lines.append("(MB/s)")
    lines.append("")
    lines.append(f"median engine throughput over curl: {report['median_ratio']}; over curl then "
                 f"fsync: {report['median_ratio_fsync']}; over curl | sha256sum then fsync: "
                 f"{report['median_ratio_sha_fsync']} (target >= 0.8)")
    daemon = report.get("daemon")
    if daemon:
        lines.append(f"daemon: ready {daemon['seconds_to_ready']} s after start, having "
                     f"downloaded {report['size_mib']} MiB; peak RSS {daemon['rss_peak_mib']} "
                     f"MiB, {daemon['rss_at_ready_mib']} MiB at ready "
                     f"({daemon['samples']} samples)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return engine_child(*argv[1:4])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=2048, help="file size in MiB (2048)")
    parser.add_argument("--runs", type=int, default=3, help="rounds of curl + engine (3)")
    parser.add_argument("--no-daemon", action="store_true", help="skip the daemon RSS part")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--time-limit", type=float, default=900.0, help="(unused) for run_script")
    args = parser.parse_args(argv)
    return run_script("model_download", args, lambda workdir: measure(workdir, args), render)


if __name__ == "__main__":
    raise SystemExit(main())
