"""`comfy-worker models pull` and `models list`: the model store without a daemon.

`pull` runs the daemon's engine (same checks, same part files, same remembered digests) with a
progress bar per file; the part files are locked, so it can run beside a daemon without the two
writing one file. `list` says for each manifest entry whether its file is verified, present
(no digest to check), of another digest, or missing. Exit codes: 0 all good, 1 some file is not,
2 the settings or the manifest are wrong.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from api.modelstore import (
    DownloadError,
    FileProgress,
    ManifestError,
    ModelEntry,
    load_manifest,
)
from api.modelstore.manifest import load_manifest_file
from api.modelstore.progress import human_bytes, pair
from api.modelstore.sources import redact
from api.modelstore.store import EntryState, EntryStatus, ModelStore, build_store
from config.logsetup import setup_logging
from supervisor.commands import app
from supervisor.commands.app import Outcome

BAR_WIDTH = 24


def _entries(settings: Any, manifest: str | None) -> list[ModelEntry]:
    try:
        return load_manifest_file(Path(manifest)) if manifest else load_manifest(settings)
    except ManifestError as exc:
        raise app.BadSettings(str(exc)) from None


def _store(settings: Any) -> ModelStore:
    setup_logging("WARNING", settings.secrets())  # retries are worth a line; tokens are masked
    return build_store(settings, dict(os.environ))


@app.group("models")
def models() -> None:
    """Model files of the manifest: fetch them, or list what is on disk."""


# --- list ---------------------------------------------------------------------------------------
@models.command("list")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="A manifest file ([[models]] tables) instead of the configured one.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_command(ctx: click.Context, manifest: str | None, as_json: bool) -> Outcome:
    """Each manifest entry: verified, present, mismatch or missing."""
    settings = app.settings(ctx)
    entries = _entries(settings, manifest)
    store = _store(settings)

    async def inspect_all() -> list[EntryStatus]:
        try:
            return [await store.inspect(entry) for entry in entries]
        finally:
            await store.downloader.close()

    statuses = asyncio.run(inspect_all())
    if as_json:
        click.echo(json.dumps({"models_dir": str(store.models_dir),
                               "models": [s.to_dict() for s in statuses]}, indent=2))
    else:
        click.echo(render_list(statuses, store.models_dir))
    good = (EntryState.VERIFIED, EntryState.PRESENT)
    return Outcome.OK if all(s.state in good for s in statuses) else Outcome.FAILED


def render_list(statuses: list[EntryStatus], models_dir: Path) -> str:
    if not statuses:
        return f"no manifest entries (models folder {models_dir})"
    rows = [["PATH", "WHEN", "STATE", "SIZE", "SOURCE"]]
    for status in statuses:
        rows.append([status.entry.path, status.entry.when.value, status.state.value,
                     human_bytes(status.size) if status.size is not None else "-",
                     redact(status.entry.url) if "://" in status.entry.url else status.entry.url])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"models folder: {models_dir}"]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                     + "  " + row[-1])
    return "\n".join(lines)


# --- pull ---------------------------------------------------------------------------------------
@models.command("pull")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="A manifest file ([[models]] tables) instead of the configured one.")
@click.pass_context
def pull_command(ctx: click.Context, manifest: str | None) -> Outcome:
    """Fetch every manifest file that is missing or wrong, with a progress bar per file."""
    settings = app.settings(ctx)
    entries = _entries(settings, manifest)
    if not entries:
        click.echo("no manifest entries: nothing to pull")
        return Outcome.OK
    store = _store(settings)
    bars = Bars(entries, sys.stdout.isatty())
    outcomes = asyncio.run(_pull(store, entries, bars))
    bars.draw(final=True)
    failed = [text for ok, text in outcomes if not ok]
    for text in failed:
        click.echo(f"FAILED {text}", err=True)
    click.echo(f"{len(entries) - len(failed)} of {len(entries)} model files in place "
               f"under {store.models_dir}")
    return Outcome.FAILED if failed else Outcome.OK


async def _pull(store: ModelStore, entries: list[ModelEntry], bars: "Bars"
                ) -> list[tuple[bool, str]]:
    async def one(entry: ModelEntry) -> tuple[bool, str]:
        progress = bars.progress[entry.path]
        try:
            status = await store.ensure(entry, progress)
        except (DownloadError, ManifestError) as exc:
            bars.outcome[entry.path] = "failed"
            return False, f"{entry.path}: {exc}"
        bars.outcome[entry.path] = "fetched" if status.fetched else status.state.value
        if status.size:
            progress.total = progress.total or status.size
            progress.done = max(progress.done, status.size)
        return True, entry.path

    async def redraw() -> None:
        while True:
            bars.draw()
            await asyncio.sleep(0.2 if bars.tty else 5.0)

    painter = asyncio.create_task(redraw())
    try:
        return await asyncio.gather(*(one(entry) for entry in entries))
    finally:
        painter.cancel()
        await store.downloader.close()


class Bars:
    """One line per file; redrawn in place on a terminal, printed now and then elsewhere."""

    def __init__(self, entries: list[ModelEntry], tty: bool):
        self.tty = tty
        self.paths = [e.path for e in entries]
        self.progress = {e.path: FileProgress(e.name) for e in entries}
        self.outcome: dict[str, str] = {}
        self._drawn = 0
        self._started = time.monotonic()

    def line(self, path: str) -> str:
        progress = self.progress[path]
        total = progress.total
        share = (progress.done / total) if total else 0.0
        filled = int(BAR_WIDTH * min(1.0, share))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        state = self.outcome.get(path, "")
        text = f"{path:<40} [{bar}] {share * 100:5.1f}% {pair(progress.done, total)}"
        if not state and progress.rate > 0:
            text += f" {human_bytes(progress.rate)}/s"
            if progress.eta is not None:
                text += f" ETA {progress.eta:.0f} s"
        if state:
            text += f" {state}"
        return text

    def draw(self, final: bool = False) -> None:
        lines = [self.line(path) for path in self.paths]
        if self.tty:
            if self._drawn:
                sys.stdout.write(f"\x1b[{self._drawn}F")
            sys.stdout.write("".join(f"\x1b[2K{line}\n" for line in lines))
            sys.stdout.flush()
            self._drawn = len(lines)
        elif final or time.monotonic() - self._started > 1:
            for line in lines:
                click.echo(line)
