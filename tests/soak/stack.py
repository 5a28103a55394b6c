"""The soak's stack: the daemon (simulator as ComfyUI, our wrapper), a moto S3 server behind a
proxy that can be cut, a webhook receiver that can be stopped (the stranger for ComfyUI's port is in
tests/support/stranger.py).

Everything listens on 127.0.0.1 on free ports; every process started here is stopped here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support import procs
from tests.support.net import free_port

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "soak-outputs"
KEY_ID, SECRET_KEY, REGION = "AKIASOAKTESTKEY00000", "soak-secret", "us-east-1"


# --- S3: moto, behind a proxy that can be cut ------------------------------------------------------
class Moto:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.folder / "moto.log", "wb")
        self.process = procs.popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                    "-p", str(self.port)], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.client().create_bucket(Bucket=BUCKET)
                return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"moto did not start on {self.url}")

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=KEY_ID,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class TcpProxy:
    """Forwards a port to another; `down()` refuses and cuts every connection, `up()` reopens."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                 reuse_address=True)

    async def down(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in list(self.writers):
            writer.close()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                sink.close()
                self.writers.discard(sink)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


# --- webhooks ---------------------------------------------------------------------------------------
@dataclass
class Hit:
    delivery: str
    request_id: str
    status: str
    signature_ok: bool


class WebhookReceiver:
    def __init__(self, secret: str) -> None:
        self.port = free_port()
        self.secret = secret
        self.hits: list[Hit] = []
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        self.hits.append(Hit(request.headers.get("X-Webhook-Delivery", ""), str(data.get("id")),
                             str(data.get("status")), hmac.compare_digest(
                                 expected, request.headers.get("X-Webhook-Signature", ""))))
        return web.json_response({"ok": True})

    async def up(self) -> None:
        if self.runner is None:
            app = web.Application()
            app.router.add_post("/hook", self._hook)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await self.site.start()

    async def down(self) -> None:
        if self.site is not None:
            await self.site.stop()
            self.site = None

    async def close(self) -> None:
        await self.down()
        if self.runner is not None:
            await self.runner.cleanup()


# --- the daemon -------------------------------------------------------------------------------------
@dataclass
class Worker:
    folder: Path
    s3_url: str
    webhook_url: str
    webhook_secret: str
    token: str = "soak-token"
    comfy_port: int = field(default_factory=free_port)
    wrapper_port: int = field(default_factory=free_port)
    public_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def comfy_url(self) -> str:
        return f"http://127.0.0.1:{self.comfy_port}"

    @property
    def crash_flag(self) -> Path:
        return self.folder / "comfyui-crash-at-start"

    @property
    def output_dir(self) -> Path:
        return self.folder / "comfy" / "output"

    @property
    def admin_socket(self) -> Path:
        return self.folder / "admin.sock"

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(
            ("S3_", "WEBHOOK_", "COMFY", "WORKER_", "API_", "BENCHMARK_", "GPU_", "SUPERVISOR_",
             "METRICS_", "REPORT_ADDR", "NOTIFY_SOCKET", "WATCHDOG_", "UNSECURED"))}
        simulator = [sys.executable, "-m", "simulator", "--listen", "127.0.0.1", "--port",
                     str(self.comfy_port), "--base-directory", str(self.folder / "comfy"),
                     "--step-seconds", "0.05"]
        command = [sys.executable, "-m", "tests.soak.comfy_shim", str(self.crash_flag), *simulator]
        return {**keep, "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), keep.get("PYTHONPATH", ""))
                                              if p),
                "COMFYUI_COMMAND": json.dumps(command), "COMFYUI_CWD": str(ROOT),
                "COMFYUI_URL": self.comfy_url, "COMFYUI_OUTPUT_DIR": str(self.output_dir),
                "WRAPPER_URL": f"http://127.0.0.1:{self.wrapper_port}",
                "WORKER_HOST": "127.0.0.1", "WORKER_PORT": str(self.public_port),
                "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(self.metrics_port),
                "WORKER_STATE_DIR": str(self.folder / "state"),
                "WORKER_LOG_DIR": str(self.folder / "logs"),
                "WORKER_ADMIN_SOCKET": str(self.admin_socket),
                "WORKER_AUTH_TOKEN": self.token, "WORKER_QUEUE_SIZE": "50",
                "WORKER_DRAIN_TIMEOUT": "10", "GPU_REQUIRED": "false",
                "BENCHMARK_ENABLED": "false",
                "SUPERVISOR_PROBE_INTERVAL": "0.5", "SUPERVISOR_PROBE_TIMEOUT": "1",
                "SUPERVISOR_HANG_TIMEOUT": "3", "SUPERVISOR_STALL_TIMEOUT": "20",
                "SUPERVISOR_BACKOFF_INITIAL": "0.2", "SUPERVISOR_BACKOFF_MAX": "1",
                "SUPERVISOR_FAILED_COOLDOWN": "3", "SUPERVISOR_CHILD_STOP_TIMEOUT": "3",
                "API_REQUEST_TIMEOUT": "90",
                "S3_ACCESS_KEY_ID": KEY_ID, "S3_SECRET_ACCESS_KEY": SECRET_KEY,
                "S3_BUCKET_NAME": BUCKET, "S3_REGION": REGION, "S3_ENDPOINT_URL": self.s3_url,
                "S3_RETRIES": "1",
                "WEBHOOK_URL": self.webhook_url, "WEBHOOK_SECRET": self.webhook_secret,
                "WEBHOOK_ALLOW_PRIVATE_TARGETS": "true", "WEBHOOK_RETRIES": "100",
                "WEBHOOK_BACKOFF_INITIAL": "0.2", "WEBHOOK_BACKOFF_MAX": "2",
                "WEBHOOK_TIMEOUT": "5"}

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "daemon.log", "ab")
        self.process = procs.popen([sys.executable, "-m", "supervisor.commands.cli", "run"],
                                   cwd=ROOT, env=self.env(), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, as systemd stops it; wait for the exit."""
        process = self.process
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(10)

    async def status(self) -> dict[str, Any] | None:
        from supervisor.reporting.admin import admin_request

        try:
            return await admin_request(self.admin_socket, "GET", "/status", timeout=5)
        except Exception:
            return None

    async def child_pid(self, name: str) -> int | None:
        status = await self.status()
        return (status or {}).get("children", {}).get(name, {}).get("pid")

    async def health(self, session: aiohttp.ClientSession) -> tuple[int | None, dict]:
        try:
            async with session.get(self.url + "/health",
                                   timeout=aiohttp.ClientTimeout(total=3)) as response:
                return response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None, {}

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 90) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (await self.health(session))[0] == 200:
                return True
            await asyncio.sleep(0.25)
        return False
