"""Build and run the comfy-worker image with podman, here, without an image registry.

The tests (tests/test_image.py), `make image` and the Vast-template check share this module:

* podman runs with a containers.conf of its own (runc, capped ulimits; see ``CONTAINERS_CONF``)
  written to the cache folder and named by ``CONTAINERS_CONF`` in podman's environment, so the
  host's podman configuration is left as it is;
* the base image is a minimal Debian made from Debian's packages (mmdebstrap, then
  ``podman import``), cached as a tarball and as a podman image, both keyed by what went into it;
* the wheelhouse (every dependency as a wheel) is made on the host with pip, and the image is
  built from a clean copy of the checkout (the files git knows, as a fresh clone has them, plus
  uncommitted edits) with that wheelhouse in it.

`python -m tests.support.image_harness build [--base IMAGE] [--tag TAG]` builds and prints the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/comfy-worker:test"
IMAGE_UID = 10001  # the image's user (Dockerfile: ARG UID)

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "tini")
MMDEBSTRAP_ARGS = ("--variant=minbase",
                   "--dpkgopt=path-exclude=/usr/share/man/*",
                   "--dpkgopt=path-exclude=/usr/share/doc/*",
                   "--dpkgopt=path-exclude=/usr/share/locale/*",
                   "--dpkgopt=path-include=/usr/share/locale/locale.alias",
                   "--aptopt=Acquire::Languages \"none\"")

# crun fails on this kind of host's cgroup mix, and podman's default ulimits are above what the
# host allows an unprivileged container (runc then refuses to start it).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""


def cache_dir() -> Path:
    """Outside the clone, so that a fresh clone (and `git clean`) keeps the slow base."""
    folder = os.environ.get("COMFY_WORKER_IMAGE_CACHE")
    if folder:
        path = Path(folder)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
            "comfy-worker-image"
    path.mkdir(parents=True, exist_ok=True)
    return path


def podman_env() -> dict[str, str]:
    conf = cache_dir() / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, check: bool = True, timeout: float = 600,
           capture: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], env=podman_env(), text=True, timeout=timeout,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None)
    if check and result.returncode != 0:
        raise HarnessError(f"podman {' '.join(args[:3])}... exited {result.returncode}: "
                           f"{(result.stderr or '')[-2000:]}")
    return result


class HarnessError(Exception):
    """A step of building or running the image failed; the message has the tool's output."""


def unusable_reason() -> str | None:
    """Why the image cannot be built and run here, or None when it can."""
    for tool, package in (("podman", "podman"), ("mmdebstrap", "mmdebstrap"),
                          ("runc", "runc")):
        if shutil.which(tool) is None:
            return (f"{tool} is not installed (`apt-get install {package}`, or `make "
                    "system-tools` as root, installs it)")
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman does not answer: {exc}"
    if info.returncode != 0:
        return f"podman cannot run here: {(info.stderr or '').strip()[-500:]}"
    return None


# --- the base image ------------------------------------------------------------------------------
def base_key() -> str:
    text = json.dumps([SUITE, BASE_PACKAGES, MMDEBSTRAP_ARGS])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_tag() -> str:
    return f"localhost/comfy-worker-base:{SUITE}-{base_key()}"


def ensure_base(log=print) -> tuple[str, float]:
    """The Debian base image's tag, made when missing; and the seconds spent making it."""
    tag = base_tag()
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag, 0.0
    began = time.monotonic()
    tarball = cache_dir() / f"base-{SUITE}-{base_key()}.tar"
    if not tarball.exists():
        log(f"image: making the {SUITE} base with mmdebstrap ({', '.join(BASE_PACKAGES)}); "
            "it is cached after this")
        partial = tarball.with_name(f"{tarball.stem}.{os.getpid()}.tar")  # two runs may race
        result = subprocess.run(["mmdebstrap", *MMDEBSTRAP_ARGS, "--format=tar",
                                 f"--include={','.join(BASE_PACKAGES)}", SUITE, str(partial)],
                                text=True, capture_output=True, timeout=1200)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise HarnessError(f"mmdebstrap exited {result.returncode}: "
                               f"{result.stderr[-2000:]}")
        partial.rename(tarball)
    podman("import", str(tarball), tag)
    return tag, time.monotonic() - began


# --- the wheelhouse and the build context --------------------------------------------------------
def _requirements_stamp() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()
                          + sys.version.encode()).hexdigest()


def ensure_wheelhouse(python: str = sys.executable) -> Path:
    """``<cache>/wheelhouse``: every dependency of the project as a wheel, for this Python.

    Made again when pyproject.toml (or the Python) changed; the project's own wheel is left out,
    the image builds that from source."""
    folder = cache_dir() / "wheelhouse"
    stamp = folder / ".stamp"
    if stamp.exists() and stamp.read_text() == _requirements_stamp():
        return folder
    fresh = Path(tempfile.mkdtemp(prefix="wheelhouse-", dir=cache_dir()))
    result = subprocess.run([python, "-m", "pip", "wheel", "-q", "-w", str(fresh), str(ROOT),
                             "setuptools>=77", "wheel"], text=True, capture_output=True,
                            timeout=900)
    if result.returncode != 0:
        shutil.rmtree(fresh, ignore_errors=True)
        raise HarnessError(f"pip wheel exited {result.returncode}: {result.stderr[-2000:]}")
    for own in fresh.glob("comfy_worker-*.whl"):
        own.unlink()
    (fresh / ".stamp").write_text(_requirements_stamp())
    # Swapped in whole, so a run beside this one never reads a half-made wheelhouse.
    old = folder.with_name(f"{folder.name}.old.{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    fresh.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def clean_context(into: Path, wheelhouse: Path) -> Path:
    """A build context as a fresh clone has it (plus uncommitted edits), with the wheelhouse."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if not source.is_file():
            continue  # deleted in the work tree, not yet committed
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    shutil.copytree(wheelhouse, into / "wheelhouse", ignore=shutil.ignore_patterns(".stamp"))
    return into


def tree_digest(folder: Path, only: str | None = None) -> str:
    """A digest of every file's path and content under ``folder`` (see the Dockerfile's
    SOURCE_DIGEST: the old buildah here reuses stale COPY layers without it): of the top-level
    folder ``only``, or of everything but it and the folders that never go into the image."""
    digest = hashlib.sha256()
    unused = ("tests", "docs", ".ci", "ComfyUI")

    def wanted(path: Path) -> bool:
        top = path.relative_to(folder).parts[0]
        return path.is_file() and (top == only if only else top not in unused)

    for path in sorted(filter(wanted, folder.rglob("*"))):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Build:
    tag: str
    base: str
    seconds: float          # podman build alone
    base_seconds: float     # making the base (0 when it was cached)
    size_bytes: int
    base_size_bytes: int

    @property
    def added_bytes(self) -> int:
        return self.size_bytes - self.base_size_bytes

    def describe(self) -> str:
        mib = 1024 * 1024
        base = f", base made or imported in {self.base_seconds:.0f} s" if self.base_seconds \
            else ""
        return (f"image {self.tag}: built in {self.seconds:.1f} s{base}; "
                f"{self.size_bytes / mib:.0f} MiB, of which comfy-worker adds "
                f"{self.added_bytes / mib:.0f} MiB to the base {self.base} "
                f"({self.base_size_bytes / mib:.0f} MiB)")


def image_size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def build_image(tag: str = TAG, base: str | None = None, *, no_cache: bool = False,
                target: str | None = None, extra: dict[str, str] | None = None,
                log=print) -> Build:
    """Build ``tag``; ``extra`` adds files (path in the context: text) to the clean copy."""
    base_seconds = 0.0
    # Images of sources long gone (each change of the sources leaves one): a day's worth stay
    # as the layer cache.
    podman("image", "prune", "-f", "--filter", "until=24h", check=False)
    if base is None:
        base, base_seconds = ensure_base(log)
    wheelhouse = ensure_wheelhouse()
    with tempfile.TemporaryDirectory(prefix="comfy-worker-context-") as folder:
        context = clean_context(Path(folder), wheelhouse)
        for name, text in (extra or {}).items():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            (context / name).write_text(text)
        args = ["build", "--format", "docker", "--build-arg", f"BASE_IMAGE={base}",
                "--build-arg", f"SOURCE_DIGEST={tree_digest(context)}",
                "--build-arg", f"COMFYUI_DIGEST={tree_digest(context, 'ComfyUI')}", "-t", tag]
        if no_cache:
            args.append("--no-cache")
        if target:
            args += ["--target", target]
        began = time.monotonic()
        podman(*args, str(context), timeout=1800)
        seconds = time.monotonic() - began
    return Build(tag, base, seconds, base_seconds, image_size(tag), image_size(base))


# --- running it ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def simulator_env(step_seconds: float = 0.05) -> dict[str, str]:
    """The settings that make the simulator (part of the installed package) play ComfyUI in the
    image: its writable folders on the container's /tmp, its outputs on the output volume."""
    command = ["/opt/comfy-worker/venv/bin/python", "-m", "simulator", "--listen", "127.0.0.1",
               "--port", "{port}", "--base-directory", "/tmp/comfyui", "--output-directory",
               "/opt/ComfyUI/output", "--step-seconds", str(step_seconds)]
    return {"COMFYUI_COMMAND": json.dumps(command), "COMFYUI_CWD": "/tmp",
            "GPU_REQUIRED": "false"}


def volume_folders(base: Path) -> dict[str, Path]:
    """Host folders for the image's volumes, owned by the image's user."""
    folders = {"state": base / "state", "logs": base / "logs", "output": base / "output"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, IMAGE_UID, IMAGE_UID)
    return folders


def volume_args(folders: dict[str, Path]) -> list[str]:
    return ["-v", f"{folders['state']}:/var/lib/comfy-worker",
            "-v", f"{folders['logs']}:/var/log/comfy-worker",
            "-v", f"{folders['output']}:/opt/ComfyUI/output"]


class Container:
    """One `podman run -d` of the image, read-only, with the given environment and mounts."""

    def __init__(self, image: str, env: dict[str, str], *, port: int | None = None,
                 extra: list[str] = (), command: list[str] = ()) -> None:
        self.name = f"comfy-worker-test-{os.getpid()}-{next(_counter)}"
        self.image, self.env, self.extra, self.command = image, env, list(extra), list(command)
        self.port = port if port is not None else free_port()
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Container":
        args = ["run", "-d", "--name", self.name, "--read-only",
                "-p", f"127.0.0.1:{self.port}:3000", *self.extra]
        for key, value in self.env.items():
            args += ["-e", f"{key}={value}"]
        self.started_at = time.monotonic()
        podman(*args, self.image, *self.command)
        return self

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return (result.stdout or "") + (result.stderr or "")

    def exec(self, *command: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *command, check=check, timeout=120)

    def state(self) -> dict[str, object]:
        out = podman("inspect", "--format", "{{json .State}}", self.name).stdout
        return json.loads(out)

    def host_pids(self) -> list[int]:
        """The container's processes as the host numbers them."""
        out = podman("top", self.name, "hpid", check=False).stdout or ""
        return [int(word) for word in out.split()[1:] if word.isdigit()]

    def stop(self, timeout: float) -> float:
        """`podman stop -t TIMEOUT`; the seconds it took."""
        began = time.monotonic()
        podman("stop", "-t", str(int(timeout + 0.999)), self.name, timeout=timeout + 60)
        return time.monotonic() - began

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


_counter = itertools.count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.image_harness")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the image with podman and print its figures")
    build.add_argument("--base", help="BASE_IMAGE (default: a minimal Debian made here)")
    build.add_argument("--tag", default=TAG)
    build.add_argument("--no-cache", action="store_true", help="build every layer again")
    build.add_argument("--target", help="a Dockerfile stage (with-comfyui)")
    args = parser.parse_args(argv)
    reason = unusable_reason()
    if reason:
        print(f"image: cannot build here: {reason}", file=sys.stderr)
        return 2
    try:
        result = build_image(args.tag, args.base, no_cache=args.no_cache, target=args.target)
    except HarnessError as exc:
        print(f"image: {exc}", file=sys.stderr)
        return 1
    print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
