"""The wheel holds every data file the code reads, and an installation from it (not an editable
one, as in the container image) reads its own.

The wheel is built with pip, as the image's build does (`pip wheel --no-deps`), from a copy of
the checkout as a fresh clone has it (plus uncommitted edits), so that building never writes
into the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import config
from api.contract.modifiers import BUILTIN_DIR
from api.wrapper import model_urls
from benchmark import reference
from benchmark.graph import DEFAULT_PROMPTS
from supervisor.gpu.xid import default_table_path
from tests.support.procs import ROOT

PACKAGES = ("api", "benchmark", "config", "simulator", "supervisor")

pytestmark = pytest.mark.timeout(600)


def read_by_the_code() -> list[str]:
    """The data files the code opens, as paths from the repository root."""
    files = [Path(str(DEFAULT_PROMPTS)), model_urls._TABLE, reference.REFERENCE_PATH,
             default_table_path(), *sorted(BUILTIN_DIR.glob("*.json")),
             *sorted(Path(config.__file__).parent.glob("*.toml"))]
    return sorted({str(path.resolve().relative_to(ROOT)) for path in files})


def checkout_copy(into: Path) -> Path:
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a file deleted in the work tree is not in a fresh clone either
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = checkout_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(out), str(source)], capture_output=True, text=True, timeout=500)
    assert built.returncode == 0, built.stderr[-3000:]
    (found,) = out.glob("comfy_worker-*.whl")
    return found


def test_the_data_files_the_code_reads_are_all_there():
    """The list the wheel is checked against is not empty of what this task is about."""
    wanted = read_by_the_code()
    assert "benchmark/test_prompts.txt" in wanted
    assert {"api/wrapper/model_inputs.toml", "config/gpu_reference.toml",
            "config/xid_codes.toml", "api/contract/workflows/Text2Image.json"} <= set(wanted)
    assert all((ROOT / name).is_file() for name in wanted)
    assert not [name for name in wanted if name.split("/")[0] not in PACKAGES], \
        "a data file the code reads lies outside the packages, so outside the wheel"


@pytest.mark.real_processes
def test_the_wheel_holds_every_data_file_the_code_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in read_by_the_code() if name not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    # ... and every other non-Python file tracked in the packages but their notes (*.md).
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", *PACKAGES],
                             capture_output=True, text=True, check=True).stdout.split()
    data = [name for name in tracked if not name.endswith((".py", ".md"))]
    assert data and not [name for name in data if name not in names]


@pytest.mark.real_processes
def test_an_installation_from_the_wheel_reads_its_own_prompts(wheel, tmp_path):
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                                "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = ("import logging, benchmark.graph as g\n"
             "logging.basicConfig(level=logging.WARNING)\n"
             "print(g.__file__)\n"
             "print(len(g.load_prompts()))\n")
    # From a folder outside the checkout, with the installed copy first on the path (the
    # dependencies come from this venv).
    ran = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={"PYTHONPATH": str(target), "PATH": ""})
    assert ran.returncode == 0, ran.stderr
    where, count = ran.stdout.split()
    assert Path(where).is_relative_to(target), where
    shipped = [line for line in (ROOT / "benchmark" / "test_prompts.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert int(count) == len(shipped) and "built-in prompts" not in ran.stderr, ran.stderr
