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

from sessionfsm._errors import UsageError
from sessionfsm.machine import SessionState
from sessionfsm.tools.sim.run import SimResult

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

    # Text stays text in an SVG: searchable, and readable by a screen reader.
    matplotlib.rcParams["svg.fonttype"] = "none"
    times = [t for t, _ in result.timeline]
    fig, ax = plt.subplots(figsize=(12, 6), dpi=150)
    try:
        # The incident first, underneath: what the relay did, shaded.
        shades = {"throttle": "tab:orange"}
        shown: set[str] = set()
        for what, start, end in result.incidents:
            colour = shades.get(what, "tab:red" if "lost" not in what else "tab:gray")
            ax.axvspan(
                start,
                end,
                color=colour,
                alpha=0.15,
                label=None if what in shown else what,
                zorder=0,
            )
            shown.add(what)
        top = 0
        for state in SessionState:
            values = [counts.get(state.value, 0) for _, counts in result.timeline]
            top = max(top, *values) if values else top
            ax.step(times, values, where="post", label=state.value, linewidth=1.6)
        # A line at zero would hide in the axis: keep a margin below it.
        ax.set_ylim(bottom=-0.03 * max(top, 1), top=1.05 * max(top, 1))
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
