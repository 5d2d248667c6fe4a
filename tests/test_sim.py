"""The simulated relay, the shipped scenarios and the figures they produce."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings

from sessionfsm import MemoryStore, Policy, SessionState, UsageError
from sessionfsm.policy import Exponential, Fixed, ReasonPolicy
from sessionfsm.tools.sim import (
    LogCounter,
    Scenario,
    ScenarioError,
    Simulation,
    load_scenario,
    parse_backoff,
    scenario_names,
    sweep,
)
from sessionfsm.tools.sim.plot import PlotError, check_plot_target, write_timeline

from .strategies import flapping_scenarios

NAMED = ("incident", "flapping-relay", "outage-3min", "steady")

MINIMAL = """
[[sessions]]
name = "s"
count = 3
size_bytes = 100
"""


def _history(store: MemoryStore, session_id: str) -> list[tuple[str, str]]:
    return [(c.event, c.target) for c in store.history(session_id)]


# ---------------------------------------------------------------- scenarios


@pytest.mark.parametrize("name", scenario_names())
def test_every_shipped_scenario_loads_with_a_description(name: str) -> None:
    """Every scenario shipped as package data validates and says what it is."""
    scenario = load_scenario(name)
    assert scenario.name == name
    assert scenario.description


def test_the_four_named_scenarios_ship() -> None:
    """incident, flapping-relay, outage-3min and steady ship with the package."""
    assert set(NAMED) <= set(scenario_names())


def test_a_json_scenario_file_loads(scenario_file: Callable[..., Path]) -> None:
    """A JSON scenario is read like a TOML one; the name defaults to the file stem."""
    path = scenario_file(json.dumps({"sessions": [{"name": "s", "count": 2}]}), "mine.json")
    scenario = load_scenario(path)
    assert scenario.name == "mine"
    assert scenario.sessions[0].count == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "[relay]\nflapz = []\n", r"unknown field `flapz` - at `\$\.relay`"),
        (
            '[[sessions]]\nname = "s"\ncount = "ten"\n',
            r"Expected `int`, got `str` - at `\$\.sessions\[0\]\.count`",
        ),
        (
            '[[sessions]]\nname = "s"\ncount = 0\n',
            r"Expected `int` >= 1 - at `\$\.sessions\[0\]\.count`",
        ),
        (MINIMAL + "[relay]\nack_loss = 1.5\n", r"<= 1\.0 - at `\$\.relay\.ack_loss`"),
        (
            MINIMAL + "[[relay.flaps]]\nat_s = 1\nfor_s = 0\n",
            r"> 0\.0 - at `\$\.relay\.flaps\[0\]\.for_s`",
        ),
        (
            MINIMAL + '[[relay.flaps]]\nat_s = 1\nfor_s = 5\nanswer = "Ok"\n',
            r"at `\$\.relay\.flaps\[0\]\.answer`",
        ),
        ('[[sessions]]\nname = "s"\nsize_bytes = [9, 3]\n', r"\[min, max\]"),
        ('[[sessions]]\nname = "s"\nsize_bytes = -1\n', r"size_bytes must be >= 0"),
        ('[[sessions]]\nname = "s"\n[[sessions]]\nname = "s"\n', r"'s' is used twice"),
        ("sessions = []\n", r"at `\$\.sessions`"),
        ("description = 'no sessions'\n", r"missing required field `sessions`"),
        ("this is = not toml\n", r"not valid TOML"),
    ],
)
def test_a_bad_scenario_file_names_the_file_and_the_field(
    scenario_file: Callable[..., Path], text: str, expected: str
) -> None:
    """A bad scenario raises ScenarioError naming the file and the offending field."""
    path = scenario_file(text, "bad.toml")
    with pytest.raises(ScenarioError, match=expected) as info:
        load_scenario(path)
    assert str(path) in str(info.value)


def test_an_unknown_scenario_lists_the_known_ones() -> None:
    """A name that is neither shipped nor a file says which names exist."""
    with pytest.raises(ScenarioError, match=r"known: .*incident"):
        load_scenario("no-such-scenario")


def test_bad_json_is_named_as_json(scenario_file: Callable[..., Path]) -> None:
    """A JSON file that does not parse is reported as invalid JSON with its path."""
    path = scenario_file("{nope", "broken.json")
    with pytest.raises(ScenarioError, match="not valid JSON"):
        load_scenario(path)


# ------------------------------------------------------------ named results


def test_incident_dead_letters_the_oversized_session_on_its_fifth_rate_limited() -> None:
    """On incident the 40 MiB session is dead-lettered by exactly its 5th RateLimited."""
    store = MemoryStore(history_retention=None)
    sim = Simulation(load_scenario("incident"), store=store)
    sim.run()
    big = sim.world.sessions["big-0001"]
    assert not big.valid
    assert big.answers["RateLimited"] == 5
    steps = _history(store, "big-0001")
    charged = [target for event, target in steps if event == "rate_limited"]
    assert charged == ["backoff"] * 4 + ["dead_lettered"]
    assert steps[-1] == ("rate_limited", "dead_lettered")  # nothing happens to it after
    view = sim.engine.session("big-0001")
    assert view.state is SessionState.DEAD_LETTERED
    assert view.dead_letter_reason == "RateLimited"


def test_incident_log_stays_quiet_after_the_dead_letter(counted_logs: LogCounter) -> None:
    """The oversized session logs one line per deferral and its dead letter, then none."""
    figures = Simulation(load_scenario("incident"), log_counter=counted_logs).run().figures
    assert counted_logs.per_session["big-0001"] == 5  # 4 x deferred + 1 x dead_lettered
    assert counted_logs.after_dead_letter["big-0001"] == 0
    assert figures.log_lines_per_session is not None
    assert figures.log_lines_per_session.after_dead_letter == 0
    assert figures.log_lines_per_session.max_session == "big-0001"
    (fate,) = figures.invalid_sessions
    assert (fate.id, fate.log_lines, fate.log_lines_after_dead_letter) == ("big-0001", 5, 0)


def test_incident_figures() -> None:
    """incident: everything valid syncs; only the oversized session is dead-lettered."""
    figures = Simulation(load_scenario("incident")).run().figures
    assert figures.dead_lettered == {"RateLimited": 1}
    assert figures.wrongly_dead_lettered == 0
    assert figures.synced == figures.valid == figures.sessions - 1
    assert figures.drained
    assert figures.lost_updates == 0
    assert figures.wasted_by_answer["RateLimited"] == 5


def test_flapping_relay_wrongly_dead_letters_no_valid_session() -> None:
    """flapping-relay: flaps bounce hundreds of sends and still nobody is dead-lettered."""
    figures = Simulation(load_scenario("flapping-relay")).run().figures
    assert figures.wrongly_dead_lettered == 0
    assert figures.dead_lettered == {}
    assert figures.synced == figures.sessions
    assert figures.wasted_by_answer.get("RelayUnavailable", 0) > 100


@pytest.mark.parametrize("name", ["outage-3min", "steady"])
def test_outage_and_steady_wrongly_dead_letter_nobody(name: str) -> None:
    """outage-3min and steady drain with every session synced."""
    figures = Simulation(load_scenario(name)).run().figures
    assert figures.wrongly_dead_lettered == 0
    assert figures.synced == figures.sessions
    assert figures.drained


def test_inv11_the_incident_transport_no_longer_dead_letters_valid_sessions_in_an_outage() -> None:
    """An outage answered RateLimited for whole batches is a shared failure:
    split and throttled, it dead-letters no valid session; RelayUnavailable, none."""
    legacy = Simulation(load_scenario("outage-3min-legacy")).run().figures
    honest = Simulation(load_scenario("outage-3min")).run().figures
    assert legacy.wrongly_dead_lettered == 0
    assert legacy.isolation_batches > 0  # the whole-batch refusals were split
    assert legacy.drained
    assert honest.wrongly_dead_lettered == 0
    assert honest.isolation_batches == 0


def _run(scenario: Scenario, policy: Policy | None = None, **kw: Any) -> Simulation:
    sim = Simulation(scenario, policy, **kw)
    sim.run()
    return sim


def _scenario(**fields: Any) -> Scenario:
    data: dict[str, Any] = {"sessions": [{"name": "s", "count": 3, "size_bytes": 100}]}
    data.update(fields)
    return msgspec.convert(data, Scenario)


def test_the_same_seed_gives_the_same_figures() -> None:
    """A run is a function of scenario, policy and seed."""
    scenario = load_scenario("flapping-relay")
    first = Simulation(scenario, seed=3).run().figures
    again = Simulation(scenario, seed=3).run().figures
    other = Simulation(scenario, seed=4).run().figures
    assert first == again
    assert other.seed == 4
    assert msgspec.to_builtins(other) != msgspec.to_builtins(first)


def test_payload_too_large_dead_letters_at_the_first_refusal() -> None:
    """With oversize_ack = PayloadTooLarge an oversized session is sent exactly once."""
    sim = _run(
        _scenario(
            relay={"size_limit_bytes": 50, "oversize_ack": "PayloadTooLarge"},
            sessions=[{"name": "big", "size_bytes": 60}, {"name": "s", "size_bytes": 10}],
        )
    )
    assert sim.world.sessions["big-0001"].sends == 1
    assert sim.engine.session("big-0001").dead_letter_reason == "PayloadTooLarge"
    assert sim.engine.state("s-0001") is SessionState.SYNCED


def test_a_session_that_outgrows_the_limit_is_invalid() -> None:
    """Validity is judged on the final payload: growing past the limit makes it invalid."""
    sim = _run(
        _scenario(
            relay={"size_limit_bytes": 150},
            sessions=[{"name": "g", "size_bytes": 100, "changes": 3, "grow_bytes": 20}],
        )
    )
    session = sim.world.sessions["g-0001"]
    assert (session.final_size, session.valid) == (160, False)
    assert sim.engine.state("g-0001") is SessionState.DEAD_LETTERED
    assert session.stored == 3  # 140 bytes: the last version that fitted


def test_sessions_that_change_in_flight_are_never_synced_stale() -> None:
    """A change while in flight is sent again; every synced session holds its latest."""
    sim = _run(
        _scenario(
            relay={"latency_s": 20.0},
            sessions=[{"name": "e", "count": 4, "changes": 5, "change_every_s": 7.0}],
        )
    )
    figures = sim._figures(True, 0.0)
    assert figures.lost_updates == 0
    for session in sim.world.sessions.values():
        assert session.version == 6
        assert session.stored == session.version
        assert session.sends > 1


def test_inv12_lost_answers_are_charged_only_past_the_refusal_bound() -> None:
    """A relay that never answers looks like a queue of culprits only: the
    sessions are split, then charged AckTimeout only once it has accepted
    nothing for max_relay_refusal_s (the documented limit)."""
    sim = _run(_scenario(relay={"ack_loss": 1.0}), Policy(max_relay_refusal_s=600.0))
    figures = sim._figures(True, 0.0)
    assert figures.dead_lettered == {"AckTimeout": 3}
    assert figures.isolation_batches > 0
    for view in sim.engine.dead_letters():
        assert view.dead_lettered_at is not None
        assert view.dead_lettered_at >= 600.0
    assert all(s.sends > 3 and set(s.answers) == {"lost"} for s in sim.world.sessions.values())


def test_a_throttle_refuses_everyone_until_it_ends() -> None:
    """During a throttle every payload is refused; sessions sync only after it ends."""
    store = MemoryStore(history_retention=None)
    policy = Policy(rate_limited=ReasonPolicy(threshold=100, backoff=Fixed(delay_s=10.0)))
    sim = _run(
        _scenario(relay={"throttles": [{"at_s": 0, "for_s": 95, "retry_after_s": 10}]}),
        policy,
        store=store,
    )
    for sid, session in sim.world.sessions.items():
        assert session.answers["RateLimited"] >= 3  # one batch every 30 s
        acked = [c.at for c in store.history(sid) if c.event == "acked"]
        assert acked
        assert min(acked) >= 95.0


def test_a_token_bucket_answers_with_retry_after() -> None:
    """An empty token bucket refuses with the time until the next token."""
    store = MemoryStore(history_retention=None)
    policy = Policy(
        backfill_batch_size=10,
        rate_limited=ReasonPolicy(threshold=50, honour_retry_after=True),
    )
    sim = _run(
        _scenario(
            relay={"rate_limit": {"sessions_per_s": 1.0, "burst": 2}},
            sessions=[{"name": "b", "count": 6, "lane": "backfill", "size_bytes": 1}],
        ),
        policy,
        store=store,
    )
    assert sum(s.answers["RateLimited"] for s in sim.world.sessions.values()) > 0
    assert sim.engine.sessions_by_state()[SessionState.SYNCED] == 6
    waits = [c.at for sid in sim.world.sessions for c in store.history(sid) if c.event == "elapsed"]
    assert waits  # refused sessions waited out the hint, then went again


def test_a_flap_answers_what_the_scenario_says() -> None:
    """A flap answers RelayUnavailable, RateLimited or nothing, as configured."""
    for answer, expected in (
        ("RelayUnavailable", "RelayUnavailable"),
        ("RateLimited", "RateLimited"),
        ("lost", "lost"),
    ):
        sim = _run(
            _scenario(
                relay={"flaps": [{"at_s": 0, "for_s": 10, "answer": answer, "reported": False}]}
            )
        )
        first = sim.world.sessions["s-0001"]
        assert first.answers[expected] == 1, answer
        assert sim.engine.state("s-0001") is SessionState.SYNCED


def test_a_reported_flap_resumes_sending_the_moment_the_relay_is_back() -> None:
    """A reported reconnect resumes sending at once instead of after the link pause."""
    synced_at = {}
    for reported in (True, False):
        store = MemoryStore(history_retention=None)
        _run(
            _scenario(
                relay={"flaps": [{"at_s": 0, "for_s": 100, "reported": reported}]},
                sessions=[{"name": "s", "arrive_at_s": 1.0, "lane": "backfill"}],
            ),
            store=store,
        )
        (synced_at[reported],) = [c.at for c in store.history("s-0001") if c.event == "acked"]
    assert synced_at[True] == pytest.approx(100.5)  # the reconnect, plus the latency
    assert synced_at[False] > synced_at[True]


@settings(max_examples=40)
@given(data=flapping_scenarios())
def test_flaps_never_dead_letter_a_valid_session(data: dict[str, Any]) -> None:
    """Whatever the flaps, a relay that only flaps dead-letters nobody and syncs all."""
    figures = Simulation(msgspec.convert(data, Scenario), log=False).run().figures
    assert figures.drained
    assert figures.wrongly_dead_lettered == 0
    assert figures.synced == figures.sessions
    assert figures.lost_updates == 0


def test_a_simulation_needs_an_empty_store() -> None:
    """Simulating into a store that already holds sessions is refused."""
    store = MemoryStore()
    _run(_scenario(), store=store)
    with pytest.raises(UsageError, match="already holds 3 sessions"):
        Simulation(_scenario(), store=store)


def test_a_run_that_cannot_drain_reports_no_drain_time() -> None:
    """A scenario that outlasts max_time_s is reported as not drained."""
    figures = (
        Simulation(_scenario(max_time_s=100, relay={"flaps": [{"at_s": 0, "for_s": 1000}]}))
        .run()
        .figures
    )
    assert (figures.drained, figures.drain_time_s) == (False, None)


def test_the_timeline_ends_with_the_final_counts() -> None:
    """The timeline's times never go back, and its last entry is the final state."""
    result = Simulation(load_scenario("incident")).run()
    times = [t for t, _ in result.timeline]
    assert times == sorted(times)
    assert result.timeline[-1][1]["synced"] == result.figures.synced
    assert result.timeline[-1][1]["dead_lettered"] == 1


# ------------------------------------------------------------------- sweep


def test_sweep_shows_no_wrong_dead_letter_for_any_threshold_or_backoff() -> None:
    """On slow-throttle, every threshold and backoff dead-letters no valid
    session; a low threshold still dead-letters the oversized one."""
    rows = sweep(
        load_scenario("slow-throttle"), thresholds=[3, 12], backoffs=["fixed:10", "fixed:60"]
    )
    by = {(r.threshold, r.backoff): r for r in rows}
    assert len(rows) == 4
    assert all(r.wrongly_dead_lettered == 0 for r in rows)
    hasty = by[(3, "10 s")]
    assert hasty.dead_lettered == 1  # the oversized session
    assert hasty.drained
    assert all(r.throttled_batches <= 10 for r in rows)  # one probe per wait, 200 s


def test_sweep_rejects_a_bad_threshold() -> None:
    """A threshold below 1 is refused before anything runs."""
    with pytest.raises(UsageError, match="threshold"):
        sweep(load_scenario("incident"), thresholds=[0], backoffs=["fixed:1"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fixed:30", Fixed(delay_s=30.0)),
        ("exp:5:300", Exponential(base_s=5.0, factor=2.0, cap_s=300.0, jitter=True)),
    ],
)
def test_parse_backoff(text: str, expected: object) -> None:
    """fixed:S and exp:BASE:CAP become the policy's backoffs."""
    assert parse_backoff(text) == expected


@pytest.mark.parametrize("text", ["", "fixed", "fixed:x", "exp:1", "linear:3", "fixed:-1"])
def test_parse_backoff_refuses_nonsense(text: str) -> None:
    """Anything else is a usage error."""
    with pytest.raises(UsageError):
        parse_backoff(text)


# -------------------------------------------------------------------- logs


def test_log_counter_counts_after_a_dead_letter_until_a_redrive() -> None:
    """Lines about a dead letter count as noise until it is redriven."""
    counter = LogCounter()
    for event in ("deferred", "dead_lettered", "deferred", "redriven", "deferred"):
        counter(None, "info", {"event": f"sessionfsm.{event}", "session_id": "a"})
    counter(None, "info", {"event": "sessionfsm.link_paused"})
    counter(None, "info", {"event": "someone.else", "session_id": "a"})
    assert counter.per_session["a"] == 5
    assert counter.after_dead_letter["a"] == 1
    assert (counter.other, counter.total) == (1, 6)
    counter.reset()
    assert counter.total == 0


# -------------------------------------------------------------------- plot


def test_a_plot_needs_png_or_svg(tmp_path: Path) -> None:
    """A plot file must end in .png or .svg."""
    with pytest.raises(PlotError, match=r"\.png or \.svg"):
        check_plot_target(tmp_path / "timeline.jpg")


def test_a_plot_without_matplotlib_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without matplotlib, plotting names the extra to install."""
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(PlotError, match=r"sessionfsm\[plot\]"):
        check_plot_target(tmp_path / "timeline.svg")


@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_the_timeline_plot_is_written(tmp_path: Path, suffix: str) -> None:
    """With matplotlib installed, the timeline is drawn to the file."""
    pytest.importorskip("matplotlib")
    path = tmp_path / f"timeline{suffix}"
    write_timeline(Simulation(load_scenario("incident"), log=False).run(), path)
    head = path.read_bytes()[:200]
    assert head.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in head or b"<?xml" in head


def test_a_result_lists_the_scenarios_incidents() -> None:
    """SimResult.incidents holds each flap and throttle as (what, from, to), in time order."""
    scenario = _scenario(
        relay={
            "flaps": [{"at_s": 50, "for_s": 10, "answer": "lost"}],
            "throttles": [{"at_s": 5, "for_s": 20}],
        }
    )
    result = Simulation(scenario, log=False).run()
    assert result.incidents == [("throttle", 5.0, 25.0), ("flap: lost", 50.0, 60.0)]
