"""The suite's tiers, and the guard that keeps the first one in-process.

Marks (declared in pyproject.toml): a test that starts any process is `real_processes`, or `e2e`
when one of them is the whole daemon (`comfy-worker run`); `browser` drives Chromium, `image` builds
the container image, `slow` takes ten seconds or more on its own, `real_comfyui` needs a real
ComfyUI. `make check` runs the tests with none of them (unit and in-process tests, the inner loop);
`make test` runs everything.

The guard: a test without a process mark fails if it, or a fixture it uses, starts a process, and
the failure names the mark it needs. So `make check` stays fast (nothing in it waits on a child)
without anyone keeping a list.
"""

from __future__ import annotations

import inspect
import subprocess
from collections.abc import Iterator

import pytest

#: Marks that allow a test to start processes.
PROCESS_MARKS = frozenset({"e2e", "real_processes", "browser", "image", "real_comfyui"})
TIER_MARKS = PROCESS_MARKS | {"slow"}
#: `make check`'s selection: `pytest -m CHECK_TIER`.
CHECK_TIER = "not (" + " or ".join(sorted(TIER_MARKS)) + ")"


class _Spawns:
    """Every process started in this session, and the fixtures that started one."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        #: (where the fixture is defined, its name) -> whether one of its processes is the daemon
        self.fixtures: dict[tuple[str, str], bool] = {}
        self.fixture: tuple[str, str] | None = None  # the fixture being set up right now

    def record(self, args) -> None:
        command = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
        self.commands.append(command)
        if self.fixture is not None:
            self.fixtures[self.fixture] = self.fixtures.get(self.fixture, False) or is_daemon(command)

    def fixtures_of(self, request: pytest.FixtureRequest) -> dict[str, bool]:
        names = set(request.fixturenames)  # requested ones too (getfixturevalue)
        return {name: daemon for (baseid, name), daemon in self.fixtures.items()
                if name in names and request.node.nodeid.startswith(baseid)}


def is_daemon(command: str) -> bool:
    return "supervisor.commands.cli run" in command


_spawns = _Spawns()


def pytest_configure(config: pytest.Config) -> None:
    execute_child = subprocess.Popen._execute_child

    def recording(self, args, *rest, **kwargs):
        _spawns.record(args)
        return execute_child(self, args, *rest, **kwargs)

    subprocess.Popen._execute_child = recording  # type: ignore[method-assign]  # for the whole run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For `pytest -n N --dist loadgroup` (make test): the tests that share one instance of a
    module-scoped fixture holding something (a generator fixture: a daemon, a moto server for the
    module) stay on one worker, so it starts once; every other test goes wherever a worker is
    free. A module-scoped parameter (a ComfyUI version) makes one group per value."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        shared = [chain[-1] for chain in info.name2fixturedefs.values()
                  if chain and chain[-1].scope in ("module", "package", "class")]
        if not any(inspect.isgeneratorfunction(d.func) for d in shared):
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        values = [f"{d.argname}={params[d.argname]}" for d in shared if d.argname in params]
        group = item.nodeid.split("::", 1)[0] + (f"[{','.join(sorted(values))}]" if values else "")
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    outer, _spawns.fixture = _spawns.fixture, (fixturedef.baseid, fixturedef.argname)
    try:
        yield
    finally:
        _spawns.fixture = outer


@pytest.fixture(autouse=True)
def _in_process_tier_starts_no_process(request: pytest.FixtureRequest) -> Iterator[None]:
    if PROCESS_MARKS & {mark.name for mark in request.node.iter_markers()}:
        yield
        return
    first = len(_spawns.commands)
    yield
    started = _spawns.commands[first:]
    via = _spawns.fixtures_of(request)
    if started or via:
        daemon = any(map(is_daemon, started)) or any(via.values())
        what = (f"starts {started[0][:160]!r}" if started
                else f"uses fixture(s) {sorted(via)} that start processes")
        pytest.fail(f"this test {what}: mark it {'e2e' if daemon else 'real_processes'} "
                    f"(tests/support/tiers.py)", pytrace=False)
