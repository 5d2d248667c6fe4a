"""A timeline of state counts over simulated time, as PNG or SVG.

Plotting needs matplotlib, an optional extra (``pip install
'sessionfsm[plot]'``); nothing else in sessionfsm imports it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from .._errors import UsageError
from ..machine import SessionState
from .run import SimResult

__all__ = ["PlotError", "check_plot_target", "write_timeline"]

_FORMATS = (".png", ".svg")


class PlotError(UsageError):
    """A plot was asked for but cannot be drawn or written."""


def check_plot_target(path: Path) -> None:
    """Fail early, before a long run: a supported suffix and matplotlib present."""
    if path.suffix.lower() not in _FORMATS:
        raise PlotError(f"plot file must end in .png or .svg, got {str(path)!r}")
    folder = path.parent
    if not folder.is_dir():
        raise PlotError(f"cannot write the plot {str(path)!r}: no directory {str(folder)!r}")
    if not os.access(folder, os.W_OK):
        raise PlotError(f"cannot write the plot {str(path)!r}: {str(folder)!r} is not writable")
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotError(
            "plotting needs matplotlib, which is not installed: pip install 'sessionfsm[plot]'"
        )


def write_timeline(result: SimResult, path: Path) -> None:
    """Draw how many sessions were in each state over time, and save it."""
    check_plot_target(path)
    # Imported by name: matplotlib is optional and ships no stubs.
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")  # no display needed
    plt: Any = importlib.import_module("matplotlib.pyplot")

    times = [t for t, _ in result.timeline]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    try:
        for state in SessionState:
            ax.step(
                times,
                [counts.get(state.value, 0) for _, counts in result.timeline],
                where="post",
                label=state.value,
            )
        figures = result.figures
        ax.set_title(f"{figures.scenario} (seed {figures.seed}): sessions by state")
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel("sessions")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
        fig.text(0.01, 0.01, figures.policy, fontsize="x-small", alpha=0.7)
        fig.tight_layout()
        try:
            fig.savefig(path)
        except OSError as exc:
            raise PlotError(f"cannot write plot {str(path)!r}: {exc}") from None
    finally:
        plt.close(fig)
