"""A real moto S3 server in a child process, for tests that talk to S3 over HTTP.

The ``moto_server`` fixture (one server per test module; tests/conftest.py registers this
module as a plugin, so a test just names it)::

    def test_x(moto_server):
        moto_server.create_bucket("b")
        ...

Credential checking: moto accepts any credentials until IAM authentication is switched on.
It counts requests and starts checking signatures once the count reaches
``INITIAL_NO_AUTH_ACTION_COUNT`` (an environment variable of the server process, infinite by
default). The server also exposes ``POST /moto-api/reset-auth`` with a new count as the body,
which resets the counter; posting ``0`` turns checking on at once, ``inf`` turns it off. With
checking on, a request must be signed with an access key of an IAM user that moto knows and
whose policies allow the action, so ``create_iam_user`` makes such a user first (while checking
is still off) and ``iam_auth()`` switches checking on for a ``with`` block.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.support.net import free_port
from tests.support.procs import popen

# moto ignores credentials until auth is on, but boto3 still wants some to sign with.
ANY_KEY_ID = "AKIAMOTOTESTANYKEY00"
ANY_SECRET = "moto-test-any-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class IamKey:
    access_key_id: str
    secret_access_key: str


class MotoServer:
    """One ``python -m moto.server`` process bound to 127.0.0.1 on a free port."""

    def __init__(self, auth_after: int | None = None) -> None:
        # auth_after=N starts the process with INITIAL_NO_AUTH_ACTION_COUNT=N: the first N
        # requests pass unchecked, later ones need valid IAM credentials.
        self.auth_after = auth_after
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ)
        if self.auth_after is not None:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(self.auth_after)
        else:
            env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        # A port picked here may be taken before moto binds it; try a few.
        last_error = ""
        for _ in range(3):
            self.port = free_port()
            self._process = popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            last_error = self._wait_ready(timeout)
            if not last_error:
                return
            self.stop()
        raise RuntimeError(f"moto server did not start: {last_error}")

    def _wait_ready(self, timeout: float) -> str:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                stderr = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                return f"exited with {self._process.returncode}: {stderr[-2000:]}"
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json", timeout=1):
                    return ""
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
        return f"no answer on {self.endpoint_url} within {timeout}s"

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if process.stderr:
            process.stderr.close()

    # -- helpers for tests -------------------------------------------------------------------

    def client(self, service: str = "s3", key: IamKey | None = None) -> Any:
        return boto3.session.Session(
            aws_access_key_id=key.access_key_id if key else ANY_KEY_ID,
            aws_secret_access_key=key.secret_access_key if key else ANY_SECRET,
            region_name=REGION,
        ).client(
            service,
            endpoint_url=self.endpoint_url,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def create_iam_user(self, name: str, actions: str = "s3:*") -> IamKey:
        """An IAM user allowed ``actions`` on every resource, and a fresh access key for it."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
        iam.put_user_policy(UserName=name, PolicyName="allow-all", PolicyDocument=json.dumps(policy))
        created = iam.create_access_key(UserName=name)["AccessKey"]
        return IamKey(created["AccessKeyId"], created["SecretAccessKey"])

    def set_auth_after(self, count: float) -> None:
        """Reset moto's request counter; checking starts after ``count`` more requests."""
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth", data=str(count).encode(),
            method="POST",
            # Not form-encoded: moto reads the raw body as the number.
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()

    @contextlib.contextmanager
    def iam_auth(self) -> Iterator[None]:
        """Check credentials inside the block; off again afterwards."""
        self.set_auth_after(0)
        try:
            yield
        finally:
            self.set_auth_after(float("inf"))


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
