"""The README and docs/: links that resolve, paths that exist, a short README, pages that say who
they are for, and a settings table that matches the declarations."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from config import render_settings_docs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib
from simulator.api_version import ApiVersion
from simulator.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250
OPENING = "**Who it is for:**"

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_REPO_PATH = re.compile(r"^(?:api|supervisor|config|benchmark|simulator|tests|misc|systemd|docs)"
                        r"/[\w./-]*$")
_PYTHON_M = re.compile(r"python -m ([A-Za-z_][\w.]*)")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces to '-'."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """Link targets written in prose (not inside code spans or code blocks)."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        targets += _LINK.findall(_CODE_SPAN.sub("code", line))
    return targets


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with the anchor #{anchor} in "
                            f"{dest.relative_to(root)}")
    return problems


def test_every_link_and_anchor_resolves():
    problems = [problem for page in pages() for problem in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "b.md").write_text("# B\n\n## Real heading\n\n```\n# not a heading\n```\n")
    (tmp_path / "a.md").write_text(
        "[ok](b.md#real-heading) [gone](c.md) [wrong](b.md#not-a-heading) `[code](x.md)`\n"
        "[here](#a)\n\n# A\n")
    problems = broken_links(tmp_path / "a.md", root=tmp_path)
    assert problems == ["a.md: (c.md): c.md does not exist",
                        "a.md: (b.md#not-a-heading): no heading with the anchor #not-a-heading "
                        "in b.md"]


@pytest.mark.parametrize("heading, expected", [
    ("The supervisor (`comfy-worker run`)", "the-supervisor-comfy-worker-run"),
    ("Multi-GPU hosts: one instance per GPU", "multi-gpu-hosts-one-instance-per-gpu"),
    ("[worker]", "worker"),
    ("The /metrics listener", "the-metrics-listener"),
    ("API documentation (OpenAPI)", "api-documentation-openapi"),
])
def test_slugs_are_githubs(heading, expected):
    assert slug(heading) == expected


def test_paths_and_modules_named_in_the_docs_exist():
    """A folder or module named in backticks, and every `python -m` module, is in the repository."""
    problems = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        for span in re.findall(r"`([^`\s]+)`", text):
            if _REPO_PATH.match(span) and not (ROOT / span).exists():
                problems.append(f"{page.relative_to(ROOT)}: `{span}` does not exist")
        for module in _PYTHON_M.findall(text):
            if not (ROOT / module.split(".")[0]).is_dir():
                continue  # not ours (pytest, pip)
            base = ROOT.joinpath(*module.split("."))
            if not (base.with_suffix(".py").exists() or (base / "__init__.py").exists()):
                problems.append(f"{page.relative_to(ROOT)}: python -m {module}: no such module")
    assert not problems, "\n".join(problems)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the detail to a page "
        "in docs/ and link it")


def test_every_page_opens_with_who_it_is_for_and_is_linked_from_the_readme():
    readme_links = {(README.parent / target.partition("#")[0]).resolve()
                    for target in links(README)}
    for page in sorted(DOCS.glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# "), f"{page.name}: the first line must be its # title"
        first_paragraph = next(line for line in lines[1:] if line.strip())
        assert first_paragraph.startswith(OPENING), (
            f"{page.name}: the paragraph after the title must start with {OPENING!r} and say "
            "who the page is for and what it covers")
        assert page.resolve() in readme_links, f"{page.name} is not linked from README.md"


def test_settings_page_is_in_sync_with_declarations():
    committed = (DOCS / "settings.md").read_text(encoding="utf-8")
    assert committed == render_settings_docs(), (
        "docs/settings.md drifted from config/settings.py: regenerate it with "
        "`comfy-worker config docs > docs/settings.md`")


_DOCS_REF = re.compile(r"\bdocs/([\w-]+\.md)(?:#([\w-]+))?")
_README_SECTION = re.compile(r"README(?!\.md)")
_NOT_CODE = {"tests/test_docs.py"}  # this file names the README as the page it checks


def code_files() -> list[Path]:
    """The tracked files that are not pages: source, settings, unit, image, rules, scripts."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, so no list of tracked files: {listed.stderr.strip()}")
    listed = listed.stdout.split()
    return [ROOT / name for name in listed
            if not name.endswith(".md") and name not in _NOT_CODE
            and (ROOT / name).is_file() and (ROOT / name).stat().st_size < 1_000_000]


def stale_doc_references(path: Path, root: Path = ROOT) -> list[str]:
    """A page (docs/x.md, docs/x.md#anchor) named in code that is not there, and a README
    section named in code: the README only links, the facts live in docs/."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    where = path.relative_to(root)
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for page, anchor in _DOCS_REF.findall(line):
            dest = root / "docs" / page
            if not dest.exists():
                problems.append(f"{where}:{number}: docs/{page} does not exist")
            elif anchor and anchor not in anchors(dest):
                problems.append(f"{where}:{number}: no heading with the anchor #{anchor} in "
                                f"docs/{page}")
        if _README_SECTION.search(line):
            problems.append(f"{where}:{number}: names a README section; point at the docs/ "
                            "page that has it")
    return problems


@pytest.mark.real_processes
def test_the_code_points_at_pages_that_exist():
    problems = [problem for path in code_files() for problem in stale_doc_references(path)]
    assert not problems, "\n".join(problems)


def test_the_reference_check_finds_a_readme_section_and_a_missing_page(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text("# Real\n\n## A heading\n")
    code = tmp_path / "code.py"
    code.write_text('log("see docs/real.md#a-heading")  # readme = "README.md"\n'
                    'log("(README: multi-GPU hosts)")\n'
                    "# docs/gone.md, docs/real.md#no-such-heading\n")
    assert stale_doc_references(code, root=tmp_path) == [
        "code.py:2: names a README section; point at the docs/ page that has it",
        "code.py:3: docs/gone.md does not exist",
        "code.py:3: no heading with the anchor #no-such-heading in docs/real.md",
    ]


SIMULATOR_README = ROOT / "simulator" / "README.md"


def simulator_knob_flags() -> set[str]:
    """The flags of the simulator's own knobs (its parser's knob group), in both API modes."""
    flags = set()
    for version in ApiVersion:
        parser = build_parser(version)
        (group,) = [g for g in parser._action_groups
                    if (g.title or "").startswith("simulator knobs")]
        flags |= {option for action in group._group_actions for option in action.option_strings}
    return flags


def test_simulator_readme_lists_every_knob():
    """simulator/README.md is the one list of the knobs (docs/development.md points there)."""
    readme = SIMULATOR_README.read_text(encoding="utf-8")
    knobs = readme.split("### Knobs", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"^\| `(--[\w-]+)", knobs, re.M))
    flags = simulator_knob_flags()
    assert {"--api-version", "--post-prompt-drop", "--db-lock-wait-seconds"} <= flags
    assert not flags - listed, f"not in simulator/README.md's Knobs table: {sorted(flags - listed)}"
    assert not listed - flags, f"listed but not a knob flag: {sorted(listed - flags)}"


def declared_dependencies() -> set[str]:
    """The distribution names pyproject.toml asks for, the test extras included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower() for spec in wanted}


def dependency_table() -> set[str]:
    """The packages named in the first column of docs/development.md's dependency table."""
    section = (DOCS / "development.md").read_text(encoding="utf-8").split(
        "## Dependencies, and why", 1)[1]
    names = set()
    for line in section.splitlines()[4:]:
        if not line.startswith("|"):
            break
        for item in line.split("|")[1].split(","):
            names.add(re.match(r"\s*([A-Za-z0-9_.-]+)", item).group(1).lower())
    return names


def test_every_dependency_has_its_why():
    declared, table = declared_dependencies(), dependency_table()
    assert {"aiohttp", "vastai", "moto", "pytest"} <= declared
    assert not declared - table, ("docs/development.md \"Dependencies, and why\" has no row "
                                  f"for {sorted(declared - table)}")
    assert not table - declared, ("rows for what pyproject.toml does not ask for: "
                                  f"{sorted(table - declared)}")
