"""The house's layout: the core loads no tool, tools load lazily, and nothing
outside the engine's own modules reaches into the engine's private fields."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import click.testing
import pytest

import sessionfsm
from sessionfsm import Engine, MemoryStore
from sessionfsm.tools import bench_command
from sessionfsm.tools.cli import LAZY_COMMANDS, main

ROOT = Path(sessionfsm.__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve()

#: What ``import sessionfsm`` must never load: the command line's dependencies,
#: the tools, the benchmark, and the profilers the benchmark uses.
NOT_IN_CORE = (
    "click",
    "rich",
    "sessionfsm.tools",
    "benchmarks",
    "cProfile",
    "tracemalloc",
)
#: What ``import sessionfsm.tools.cli`` (so ``sessionfsm status``) must not load.
NOT_IN_CLI = (
    "sessionfsm.tools.check",
    "sessionfsm.tools.sim",
    "sessionfsm.tools.diagrams",
    "benchmarks",
    "cProfile",
    "tracemalloc",
)

#: The engine's own modules, the engine and its rooms: the only ones allowed
#: its underscore attributes.
ENGINE_MODULES = {
    ROOT / "sessionfsm" / "engine.py",
    *(ROOT / "sessionfsm" / "rooms").glob("*.py"),
}


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def _hits(loaded: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded for n in names if m == n or m.startswith(n + "."))


def test_import_sessionfsm_loads_no_tool_and_no_cli_dependency() -> None:
    """``import sessionfsm`` imports neither click, rich, a tool nor the benchmark."""
    assert _hits(_loaded_after("import sessionfsm"), NOT_IN_CORE) == []


def test_import_sessionfsm_testing_starts_no_server_and_loads_no_driver() -> None:
    """``import sessionfsm.testing`` stays light: pgserver and psycopg load only
    when ``postgres_server()`` is called."""
    loaded = _loaded_after("import sessionfsm.testing")
    assert "sessionfsm.testing" in loaded
    assert _hits(loaded, ("pgserver", "psycopg", *NOT_IN_CORE)) == []


def test_cli_loads_heavy_subcommands_only_when_run() -> None:
    """Importing the command line loads no checker, simulator, benchmark or profiler."""
    assert _hits(_loaded_after("import sessionfsm.tools.cli"), NOT_IN_CLI) == []


def test_core_modules_never_import_a_tool() -> None:
    """No module of the core names ``sessionfsm.tools`` or ``benchmarks`` in an import
    (``__main__``, which is ``python -m sessionfsm``, runs the command line)."""
    pattern = re.compile(r"^\s*(from|import)\s+(\.tools|sessionfsm\.tools|benchmarks)\b", re.M)
    core = [p for p in (ROOT / "sessionfsm").glob("*.py") if p.name != "__main__.py"]
    assert core
    assert [p.name for p in core if pattern.search(p.read_text())] == []


def test_help_lists_every_lazy_subcommand() -> None:
    """``sessionfsm --help`` still lists the subcommands that load lazily."""
    result = click.testing.CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in LAZY_COMMANDS:
        hidden = main.get_command(click.Context(main), name).hidden  # type: ignore[union-attr]
        assert (name in result.output) is not hidden


def test_console_script_without_the_cli_extra_says_what_to_install() -> None:
    """Without click, the ``sessionfsm`` script prints one line naming the ``cli`` extra."""
    code = "import sys; sys.modules['click'] = None; from sessionfsm.tools import main; main()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "pip install 'sessionfsm[cli]'" in lines[0]
    assert "click" in lines[0]


def test_python_dash_m_sessionfsm_still_runs_the_cli() -> None:
    """``python -m sessionfsm status --help`` works like the console script."""
    result = subprocess.run(
        [sys.executable, "-m", "sessionfsm", "status", "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "Sessions by state" in result.stdout


def test_bench_outside_a_checkout_says_where_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """From an installed wheel (no benchmarks/ beside the package), bench says where it lives."""
    assert bench_command.find_benchmarks() == ROOT  # this checkout has it
    monkeypatch.setattr(bench_command, "find_benchmarks", lambda: None)
    command = bench_command.load()
    result = click.testing.CliRunner().invoke(command, ["--quick"])
    assert result.exit_code == 1
    assert "source checkout" in result.output
    assert "benchmarks/" in result.output


def _attribute_pattern(names: Iterable[str], *, subclass: bool) -> re.Pattern[str]:
    """``obj._name`` / ``super()._name`` on anything but ``self``; in a file
    that subclasses the engine, ``self._name`` too."""
    alternatives = "|".join(sorted(names, key=len, reverse=True))
    # ``sessionfsm._log`` is the package's logging module, not an engine field.
    owner = r"(?!sessionfsm\b)\w+" if subclass else r"(?!self\b|sessionfsm\b)\w+"
    return re.compile(r"(?<![\w.])" + owner + r"(?:\(\))?[\])]*\.(" + alternatives + r")\b")


def _subclasses_engine(text: str) -> bool:
    return re.search(r"^class \w+\((?:[\w.]*\.)?Engine\)", text, re.M) is not None


def _engine_private_names() -> set[str]:
    engine = Engine()
    names = {n for n in vars(Engine) if n.startswith("_") and not n.startswith("__")}
    return names | {n for n in vars(engine) if n.startswith("_")}


def test_no_module_outside_the_engine_uses_its_underscore_attributes() -> None:
    """No code outside the engine's own modules reads, writes or overrides ``engine._x``
    (the marked temporary exceptions aside)."""
    names = _engine_private_names()
    private_import = re.compile(r"from (sessionfsm\.|\.)engine import [^\n]*\b_[A-Za-z]")
    files = [
        *(ROOT / "sessionfsm").rglob("*.py"),
        *(ROOT / "benchmarks").rglob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
    ]
    offenders = []
    for path in files:
        if path in ENGINE_MODULES or path == THIS_FILE:
            continue  # this file only quotes such lines, as examples
        text = path.read_text()
        attribute = _attribute_pattern(names, subclass=_subclasses_engine(text))
        overridden = re.compile(r"^\s+def (" + "|".join(names) + r")\(", re.M)
        for number, line in enumerate(text.splitlines(), 1):
            if (
                attribute.search(line)
                or private_import.search(line)
                or (_subclasses_engine(text) and overridden.search(line))
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_underscore_check_catches_a_private_read() -> None:
    """The grep above is not vacuous: it flags reads, super() calls and subclass use."""
    names = _engine_private_names()
    assert {"_sessions", "_lanes", "_form", "_fire_link", "_runtime"} <= names
    outside = _attribute_pattern(names, subclass=False)
    assert outside.search("    queue = engine._lanes.ready[lane]")
    assert outside.search("        return super()._form(lane, now)")
    assert not outside.search("        self._lanes = lanes")
    inside = _attribute_pattern(names, subclass=True)
    assert inside.search("        self._lanes.stamps[lane] = now")
    assert _subclasses_engine("class Flawed(Engine):\n    pass\n")


def test_the_rooms_are_the_engine_s_own_modules() -> None:
    """Every module of ``sessionfsm/rooms/`` is listed among the engine's own
    modules, and the package is not empty."""
    rooms = set((ROOT / "sessionfsm" / "rooms").glob("*.py"))
    assert {path.name for path in rooms} >= {
        "lanes.py",
        "batches.py",
        "blame.py",
        "redrive.py",
        "journal.py",
    }
    assert rooms <= ENGINE_MODULES


def test_the_engine_keeps_at_most_30_fields() -> None:
    """An engine holds at most 30 instance attributes, with a store and listeners
    as without: CPython 3.11 reads an instance's attributes fastest while it has
    at most 30 (its shared-keys limit), and a new concern belongs in a room."""
    assert len(vars(Engine(log=False))) <= 30
    with Engine(store=MemoryStore(), log=False, listeners=[print]) as busy:
        busy.enqueue("a", now=0.0)
        busy.tick(0.0)
        assert len(vars(busy)) <= 30
