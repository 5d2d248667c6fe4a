"""The documentation cannot drift: every command and Python block in it runs.

Every fenced ``sh`` block in README.md and docs/ is run line by line with the
installed ``sessionfsm`` on PATH, and every ``python`` block in a fresh
interpreter, each page in its own empty directory, in page order (so a page
can simulate first and inspect the database after). ``text`` blocks are
output or synopses and are not run. An HTML comment on the line before a
fence changes that:

* ``<!-- docs-test: skip (reason) -->``: not run; the reason is required;
* ``<!-- docs-test: file NAME -->``: the block is written to NAME instead
  (a scenario or policy file that later commands use);
* ``<!-- docs-test: continue -->``: a Python block that goes on from the one
  before it (both run together).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
RUN = {"sh": "sh", "bash": "sh", "console": "sh", "python": "python", "py": "python"}
_MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|file|continue)\b\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marker: str | None = None
    argument: str = ""

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, with the marker on the line before each."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        start, ticks, lang = i, fence.group(1), fence.group(2)
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith(ticks):
            body.append(lines[i])
            i += 1
        i += 1
        marker = _MARKER.search(lines[start - 1]) if start else None
        found.append(
            Block(
                page,
                start + 1,
                lang,
                "\n".join(body) + "\n",
                marker.group(1) if marker else None,
                marker.group(2) if marker else "",
            )
        )
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "100"
    env.pop("PYTHONPATH", None)
    return env


def _commands(code: str) -> list[str]:
    """A shell block's commands: one per line, comments and blank lines dropped."""
    return [line for line in code.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_command_and_python_block_in_the_docs_runs(page: Path, tmp_path: Path) -> None:
    """Each shell command exits 0 and each Python block runs, in page order."""
    previous_python = ""
    ran = 0
    for block in blocks(page):
        if block.marker == "skip":
            assert re.fullmatch(r"\(.{5,}\)", block.argument), (
                f"{block.where()}: a skipped block needs a reason, in parentheses"
            )
            continue
        if block.marker == "file":
            (tmp_path / block.argument).write_text(block.code, encoding="utf-8")
            continue
        kind = RUN.get(block.lang)
        if kind == "python":
            code = block.code
            if block.marker == "continue":
                code = previous_python + code
            previous_python = code
            result = subprocess.run(
                [sys.executable, "-"],
                input=code,
                cwd=tmp_path,
                env=_env(),
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, f"{block.where()}: python failed\n{result.stderr}"
            ran += 1
        elif kind == "sh":
            for command in _commands(block.code):
                result = subprocess.run(
                    ["bash", "-o", "pipefail", "-c", command],
                    cwd=tmp_path,
                    env=_env(),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert result.returncode == 0, (
                    f"{block.where()}: `{command}` exited {result.returncode}\n"
                    f"{result.stdout}\n{result.stderr}"
                )
                ran += 1
    runnable = [b for b in blocks(page) if RUN.get(b.lang) and b.marker != "skip"]
    assert ran >= len(runnable)


def test_the_readme_set_up_commands_are_the_ones_ci_runs() -> None:
    """The README's two set-up lines (skipped above: they install) run verbatim in .ci/run."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    (setup,) = [b for b in blocks(REPO / "README.md") if b.lang == "sh"]
    commands = _commands(setup.code)
    assert len(commands) == 2
    for command in commands:
        assert command in ci, f"{command!r} is not run by .ci/run"


def test_every_page_is_in_the_site_and_every_skip_gives_a_reason() -> None:
    """Each docs page is in mkdocs.yml's nav, and no block is skipped without a reason."""
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    for page in (REPO / "docs").rglob("*.md"):
        assert str(page.relative_to(REPO / "docs")) in nav, f"{page} is not in the nav"
    for page in PAGES:
        for block in blocks(page):
            if block.marker == "skip":
                assert re.fullmatch(r"\(.{5,}\)", block.argument), block.where()


def test_the_readme_is_a_short_front_page() -> None:
    """README.md stays a front page (under 10 KB) that links to the guides."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) < 10_000
    for page in ("getting-started", "embedding", "operating", "design"):
        assert f"docs/{page}.md" in text


def test_help_names_every_field_of_the_public_records() -> None:
    """help(Policy), help(Batch) and the views explain each field; AckResult is public."""
    import inspect

    import msgspec

    import sessionfsm

    for cls in (sessionfsm.Policy, sessionfsm.Batch, sessionfsm.SessionView, sessionfsm.LinkView):
        doc = inspect.getdoc(cls) or ""
        for field in msgspec.structs.fields(cls):
            assert f"``{field.name}``" in doc, f"{cls.__name__}.{field.name} is not explained"
    assert "seconds" in (inspect.getdoc(sessionfsm.Batch) or "")
    assert "AckResult" in sessionfsm.__all__
    hints = inspect.signature(sessionfsm.run_until_idle).parameters["clock"].annotation
    assert "Any" not in str(hints)
