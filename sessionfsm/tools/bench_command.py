"""``sessionfsm bench``, found next to the source.

The benchmark and its floor engine are not part of the installed package:
they live in the top-level ``benchmarks/`` directory of a source checkout,
beside ``sessionfsm/``. From a checkout (an editable install included) this
command runs them; from an installed wheel it says where to get them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

__all__ = ["find_benchmarks", "load", "missing"]

NOT_HERE = (
    "the benchmark is not part of the installed package: run `sessionfsm bench` "
    "from a source checkout of sessionfsm (it lives in benchmarks/, next to sessionfsm/)"
)


def find_benchmarks() -> Path | None:
    """The checkout's ``benchmarks/`` directory beside this package, if any."""
    root = Path(__file__).resolve().parents[2]
    # A checkout has its pyproject.toml beside benchmarks/; site-packages has neither.
    if (root / "benchmarks" / "bench.py").is_file() and (root / "pyproject.toml").is_file():
        return root
    return None


def load() -> click.Command:
    """The checkout's ``bench`` command, or one that says where to get it."""
    root = find_benchmarks()
    if root is None:
        return missing
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    found: click.Command = importlib.import_module("benchmarks.bench").command
    return found


@click.command("bench", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def missing(args: tuple[str, ...]) -> None:
    """Run the performance comparisons (needs a source checkout)."""
    raise click.ClickException(NOT_HERE)
