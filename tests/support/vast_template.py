"""The image started as a Vast.ai serverless template starts it, against a stand-in autoscaler.

`python -m tests.support.vast_template [--image TAG] [--build]` (root, podman; `make test-image` runs it
too, as a test). What it does is what docs/container.md tells an operator to put in the
template, with the stand-in autoscaler (tests/support/fake_autoscaler.py) where Vast's would be:

* launch mode "entrypoint": the image's own ENTRYPOINT (tini, then comfy-worker) with `run`;
* Vast's environment: REPORT_ADDR, CONTAINER_ID, MASTER_TOKEN, PUBLIC_IPADDR and
  VAST_TCP_PORT_3000 for the public port that `-p 3000:3000` opened, USE_SSL=true with the
  instance certificate at /etc/instance.crt and /etc/instance.key (a self-signed one made
  here, for 127.0.0.1, which the stand-in trusts);
* the state folder on a volume, so a restarted worker keeps its benchmark.

It passes when the worker reports ready (loadtime and max_perf) and a request signed by the
stand-in gets 200 over https, while an unsigned one gets 401. `check_update` starts it the same
way with `--restart on-failure` and asks for an update (POST /pyworker/update): the worker exits
75, tini passes that on, the runtime starts the container again and the worker reports ready.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import os
import secrets
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import image_harness as harness
from tests.support.fake_autoscaler import FakeAutoscaler

CERT, KEY = "/etc/instance.crt", "/etc/instance.key"  # where Vast's instances have them
WORKER_PORT = 3000
READY_WITHIN = 180.0


def vast_environment(report_addr: str, container_id: int, master_token: str, public_ip: str,
                     public_port: int) -> dict[str, str]:
    """The variables a Vast serverless instance gives the container, and the template's own."""
    return {
        # Vast's (per instance):
        "CONTAINER_ID": str(container_id),
        "MASTER_TOKEN": master_token,
        "PUBLIC_IPADDR": public_ip,
        f"VAST_TCP_PORT_{WORKER_PORT}": str(public_port),
        # The template's:
        "REPORT_ADDR": report_addr,
        "WORKER_PORT": str(WORKER_PORT),
        "USE_SSL": "true",   # the certificate: Vast's, at CERT and KEY (the daemon's default)
    }


def make_certificate(folder: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``ip``, as instance.crt and instance.key in ``folder``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "comfy-worker test instance")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
                ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crt, pem = folder / "instance.crt", folder / "instance.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    for path in (crt, pem):
        os.chown(path, harness.IMAGE_UID, harness.IMAGE_UID)
        path.chmod(0o600 if path is pem else 0o644)
    return crt, pem


def gateway_address() -> str:
    """How a container on podman's default network reaches this host."""
    return "host.containers.internal"


@dataclass
class Outcome:
    ready_seconds: float
    ready_report: dict[str, Any]
    signed_status: int
    signed_body: dict[str, Any]
    unsigned_status: int
    request_idx: int
    deleted: dict[str, Any]
    logs: str


@dataclass
class Instance:
    """The image running as a Vast instance, against a stand-in autoscaler."""

    fake: FakeAutoscaler
    container: harness.Container
    certificate: Path
    master_token: str

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certificate))

    async def ready(self, after: float = 0.0) -> dict[str, Any]:
        """The first ready report (loadtime and max_perf) received after `after` (time.time)."""
        try:
            return await self.fake.wait_for_status(
                lambda s: s["_at"] > after and s.get("loadtime", 0) > 0
                and s.get("max_perf", 0) > 0, timeout=READY_WITHIN)
        except (asyncio.TimeoutError, TimeoutError):
            raise AssertionError("no ready report within "
                                 f"{READY_WITHIN:g} s:\n{self.container.logs()[-4000:]}") \
                from None


async def start(image: str, folder: Path, *, log=print, runtime: list[str] = ()) -> Instance:
    """Start the image as the template does (plus `runtime`: options of podman run), against
    a stand-in autoscaler on this host; stop it with `stop`."""
    fake = FakeAutoscaler()
    await fake.start(host="0.0.0.0")  # the container comes in through podman's gateway
    public_ip, public_port = "127.0.0.1", harness.free_port()
    fake.worker_url = f"https://{public_ip}:{public_port}"
    crt, pem = make_certificate(folder, public_ip)
    volumes = harness.volume_folders(folder / "volumes")
    token = secrets.token_hex(16)
    env = {**vast_environment(f"http://{gateway_address()}:{fake.port}", 4242, token, public_ip,
                              public_port),
           **harness.simulator_env()}
    container = harness.Container(
        image, env, port=public_port,
        extra=[*harness.volume_args(volumes), "-v", f"{crt}:{CERT}:ro", "-v", f"{pem}:{KEY}:ro",
               *runtime])
    log(f"vast: {image} as container {container.name}, public URL {fake.worker_url}, "
        f"stand-in autoscaler on port {fake.port}")
    try:
        await asyncio.to_thread(container.start)
    except BaseException:
        await fake.stop()
        raise
    return Instance(fake, container, crt, token)


async def stop(instance: Instance) -> None:
    await asyncio.to_thread(instance.container.remove)
    await instance.fake.stop()


async def check(image: str, folder: Path, *, log=print) -> Outcome:
    """Start the image as the template does, against a stand-in; see the module doc."""
    instance = await start(image, folder, log=log)
    fake, container = instance.fake, instance.container
    try:
        ready = await instance.ready()
        ready_seconds = time.monotonic() - container.started_at
        log(f"vast: ready report after {ready_seconds:.1f} s: loadtime {ready['loadtime']:.1f} s,"
            f" max_perf {ready['max_perf']:g}, url {ready.get('url')}")
        trust = instance.trust()
        payload = {"input": {"modifier": "Text2Image", "modifications": {
            "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}}}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            auth = fake.make_auth_data(cost=100)   # what the vastai SDK's client sends
            async with session.post(f"{fake.worker_url}/generate/sync", ssl=trust,
                                    json={"auth_data": auth, "payload": payload}) as answer:
                signed_status, signed_body = answer.status, await answer.json()
            async with session.post(f"{fake.worker_url}/generate/sync", ssl=trust,
                                    json=payload) as answer:
                unsigned_status = answer.status
        log(f"vast: signed request -> {signed_status}, unsigned -> {unsigned_status}")
        deleted = await fake.wait_for_delete(
            lambda d: any(r.get("request_idx") == auth["request_idx"]
                          for r in d.get("requests", [])), timeout=30)
        return Outcome(ready_seconds, ready, signed_status, signed_body, unsigned_status,
                       auth["request_idx"], deleted, container.logs())
    finally:
        await stop(instance)


def died_with(name: str) -> int | None:
    """The exit code of the container's first death, from podman's events."""
    codes = harness.podman("events", "--stream=false", "--filter", f"container={name}",
                           "--filter", "event=died", "--format",
                           "{{.ContainerExitCode}}").stdout.split()
    return int(codes[0]) if codes else None


@dataclass
class Restarted:
    update_status: int
    exit_code: int | None   # the container's, as the runtime saw it before starting it again
    restart_count: int
    ready_again: dict[str, Any]
    logs: str


async def check_update(image: str, folder: Path, *, log=print) -> Restarted:
    """POST /pyworker/update to the image run with `--restart on-failure`: it exits 75 and the
    runtime starts it again, ready."""
    instance = await start(image, folder, log=log, runtime=["--restart", "on-failure"])
    container = instance.container
    try:
        await instance.ready()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async with session.post(f"{instance.fake.worker_url}/pyworker/update",
                                    ssl=instance.trust(), headers={
                                        "Authorization": f"Bearer {instance.master_token}"}
                                    ) as answer:
                update_status = answer.status
        asked = time.monotonic()
        log(f"vast: POST /pyworker/update -> {update_status}")
        while True:
            restarts = int((await asyncio.to_thread(
                harness.podman, "inspect", "--format", "{{.RestartCount}}", container.name
            )).stdout.strip() or 0)
            if restarts:
                break
            if time.monotonic() - asked > READY_WITHIN:
                raise AssertionError(f"not restarted within {READY_WITHIN:g} s:\n"
                                     f"{container.logs()[-4000:]}")
            await asyncio.sleep(0.2)
        restarted_at = time.time()
        exit_code = await asyncio.to_thread(died_with, container.name)
        again = await instance.ready(after=restarted_at)
        log(f"vast: exited {exit_code}, restarted by the runtime ({restarts}x), ready again "
            f"after {time.monotonic() - asked:.1f} s")
        return Restarted(update_status, exit_code, restarts, again, container.logs())
    finally:
        await stop(instance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.vast_template", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=harness.TAG)
    parser.add_argument("--build", action="store_true", help="build the image first")
    args = parser.parse_args(argv)
    reason = harness.unusable_reason()
    if reason:
        print(f"vast: cannot run here: {reason}", file=sys.stderr)
        return 2
    if args.build:
        print(harness.build_image(args.image).describe())
    with tempfile.TemporaryDirectory(prefix="comfy-worker-vast-") as folder:
        try:
            outcome = asyncio.run(check(args.image, Path(folder)))
        except AssertionError as exc:
            print(f"vast: FAILED: {exc}", file=sys.stderr)
            return 1
    ok = outcome.signed_status == 200 and outcome.unsigned_status == 401
    print("vast: PASSED" if ok else f"vast: FAILED: {outcome.signed_body}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
