"""The tools around the engine: the command line, the simulator, the model
checker and the diagram generator.

Nothing in the core (``sessionfsm`` itself) imports this package. The
command line needs the ``cli`` extra (click and rich)::

    pip install 'sessionfsm[cli]'

:func:`main` is the ``sessionfsm`` console script: it checks for the extra
first, so a library-only install gets one clear line instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

#: What the command line needs beyond the core, by import name.
CLI_REQUIRES = ("click", "rich")

MISSING_CLI = (
    "sessionfsm: the command line needs the 'cli' extra: "
    "pip install 'sessionfsm[cli]' (missing: {})"
)


def main() -> None:
    """Run the ``sessionfsm`` command line, or say in one line what to install."""
    missing = []
    for name in CLI_REQUIRES:
        try:
            importlib.import_module(name)  # needed next anyway
        except ImportError:
            missing.append(name)
    if missing:
        print(MISSING_CLI.format(", ".join(missing)), file=sys.stderr)
        raise SystemExit(1)
    from sessionfsm.tools.cli import main as cli_main

    cli_main(prog_name="sessionfsm")
