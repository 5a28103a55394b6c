"""The image's HEALTHCHECK: GET /health/live on the worker's own public port.

Exit 0 when the daemon answers alive, 1 otherwise (what docker and podman expect). The port and
TLS come from the worker's settings (TOML file and environment), so a probe follows
WORKER_PORT and USE_SSL without being told. Liveness only: a worker that is starting,
benchmarking or unhealthy is alive; one whose event loop is stuck is not.
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.request

from config import SettingsError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"live: {exc}", file=sys.stderr)
        return 1
    scheme = "https" if settings.worker.use_ssl else "http"
    url = f"{scheme}://127.0.0.1:{settings.worker.port}/health/live"
    context = None
    if settings.worker.use_ssl:
        # The certificate names the public address, not loopback; this probe only asks the
        # daemon in this container whether it is alive, and sends nothing secret.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as answer:
            body = json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        print(f"live: {url} answered {exc.code}: {exc.read()[:200]!r}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"live: {url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body))
    return 0 if body.get("alive") else 1


if __name__ == "__main__":
    sys.exit(main())
