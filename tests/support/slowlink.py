"""A TCP relay that can hold connections: a real server (moto's S3) behind a link the test
controls, so a request can be caught while it uploads.

`hold()` makes new data wait; `release()` lets it through. Runs in threads, for sync tests.
"""

from __future__ import annotations

import socket
import threading

from tests.support.net import free_port


class SlowLink:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._open = threading.Event()
        self._open.set()
        self.held = threading.Event()   # set once a connection waited at the hold
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self) -> None:
        self.held.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self._open.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, waits: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if waits and not self._open.is_set():
                    self.held.set()
                    self._open.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
