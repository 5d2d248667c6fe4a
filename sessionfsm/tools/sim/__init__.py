"""A simulated relay, in simulated time, to try a policy before shipping it.

You load a scenario (:func:`load_scenario`: a shipped name such as
``incident`` or a TOML/JSON file), run it with :class:`Simulation` against a
:class:`sessionfsm.Policy` and get :class:`Figures`: sessions synced,
dead-lettered by reason, valid sessions wrongly dead-lettered, attempts and
wasted sends, time to drain, log lines per session. :func:`sweep` does it
for a grid of policies. Runs are deterministic from a seed and never sleep.

``sessionfsm simulate`` is the command-line front end.
"""

from __future__ import annotations

from sessionfsm.tools.sim.logs import LogCounter
from sessionfsm.tools.sim.relay import SimRelay, SimSession, World
from sessionfsm.tools.sim.run import (
    DEFAULT_BACKOFFS,
    DEFAULT_THRESHOLDS,
    Figures,
    LogLines,
    SessionFate,
    SimResult,
    Simulation,
    SweepRow,
    backoff_label,
    describe_policy,
    parse_backoff,
    sweep,
)
from sessionfsm.tools.sim.scenario import (
    Flap,
    RateLimit,
    RelaySpec,
    Scenario,
    ScenarioError,
    SessionGroup,
    Throttle,
    load_scenario,
    scenario_names,
)

__all__ = [
    "DEFAULT_BACKOFFS",
    "DEFAULT_THRESHOLDS",
    "Figures",
    "Flap",
    "LogCounter",
    "LogLines",
    "RateLimit",
    "RelaySpec",
    "Scenario",
    "ScenarioError",
    "SessionFate",
    "SessionGroup",
    "SimRelay",
    "SimResult",
    "SimSession",
    "Simulation",
    "SweepRow",
    "Throttle",
    "World",
    "backoff_label",
    "describe_policy",
    "load_scenario",
    "parse_backoff",
    "scenario_names",
    "sweep",
]
