"""A real HTTP file server with the faults a model download meets, for tests and perf scripts.

It runs its own event loop in a thread, so a synchronous test (or a daemon in another process)
can use it while the test waits. Files are bytes in memory or paths on disk (served with
sendfile, as a CDN would). Knobs, changeable while it runs: redirects, a required bearer token, a cut of the
connection after N bytes (for the next K answers), a delay per 64 KiB (a slow server), ignoring
`Range`, and files that are simply not there (404) until added. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from tests.support.net import free_port

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
CHUNK = 64 * 1024


@dataclass
class Seen:
    path: str
    range: str | None
    authorization: str | None
    status: int = 0


@dataclass
class FileServer:
    files: dict[str, bytes | Path] = field(default_factory=dict)
    token: str | None = None
    cut_after: int | None = None     # bytes into an answer's body
    cuts_left: int = 0
    chunk_delay: float = 0.0
    ignore_range: bool = False
    fail_status: int | None = None   # answer every request with this status
    redirects: dict[str, str] = field(default_factory=dict)  # name -> Location (a 302)
    headers: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FileServer":
        self.port = self.port or free_port()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True,
                                        name="fileserver")
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the file server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/{name:.+}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        started.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        record = Seen(name, request.headers.get("Range"), request.headers.get("Authorization"))
        self.seen.append(record)
        try:
            response = await self._answer(request, name)
        except ConnectionError:  # the client went away mid-answer
            response = web.Response(status=499)
        record.status = record.status or response.status
        return response

    async def _answer(self, request: web.Request, name: str) -> web.StreamResponse:
        if self.fail_status:
            return web.Response(status=self.fail_status, text="failing on purpose")
        if name in self.redirects:
            return web.Response(status=302, headers={"Location": self.redirects[name]})
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, text="token required")
        data = self.files.get(name)
        if data is None:
            return web.Response(status=404, text="no such file")
        plain = not (self.cut_after is not None and self.cuts_left > 0) and not self.chunk_delay
        if isinstance(data, Path) and plain and not self.ignore_range:
            return web.FileResponse(data, headers=self.headers)
        if isinstance(data, Path):
            data = data.read_bytes()
        total, start, status = len(data), 0, 200
        headers = dict(self.headers)
        match = _RANGE.match(request.headers.get("Range", "")) if not self.ignore_range else None
        if match:
            start = int(match.group(1))
            if start >= total:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{total}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{total - 1}/{total}"
        body = memoryview(data)[start:]
        self.seen[-1].status = status
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        limit = None
        if self.cut_after is not None and self.cuts_left > 0:
            self.cuts_left -= 1
            limit = self.cut_after
        sent = 0
        for offset in range(0, len(body), CHUNK):
            piece = body[offset:offset + CHUNK]
            if limit is not None and sent + len(piece) > limit:
                await response.write(bytes(piece[:limit - sent]))
                request.transport.close()  # the connection dies mid-file
                return response
            await response.write(bytes(piece))
            sent += len(piece)
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await response.write_eof()
        return response


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.support.fileserver --port P NAME=PATH ...`: serve files until killed."""
    import argparse
    import signal
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("files", nargs="+", metavar="NAME=PATH")
    args = parser.parse_args(argv)
    files: dict[str, bytes | Path] = {}
    for item in args.files:
        name, _, path = item.partition("=")
        files[name] = Path(path)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
    with FileServer(files=files, port=args.port):
        print(f"serving on 127.0.0.1:{args.port}", flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
