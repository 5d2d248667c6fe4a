"""OpenTelemetry metrics for an engine (``pip install 'sessionfsm[otel]'``).

This module needs the OpenTelemetry *API* only; your application configures
the SDK, its readers and exporters, as OpenTelemetry intends for libraries::

    from sessionfsm.metrics.otel import OtelMetrics
    metrics = OtelMetrics(engine)     # the global meter provider, or pass one

The measurements are the Prometheus ones (see ``docs/observability.md``),
named the OpenTelemetry way: dotted names, units in the instrument's unit
rather than in its name, no ``_total``, and namespaced attributes
(``sessionfsm.lane``, ...). Everything is an asynchronous instrument read from
the :class:`~sessionfsm.metrics.Tally` when the SDK collects, except the ack
duration histogram, recorded as each batch is answered. No session id is ever
an attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from ..engine import Engine
from ..listeners import Report
from . import DEFAULT_LATENCY_BUCKETS, Figures, Tally

__all__ = ["INSTRUMENT_NAMES", "OtelMetrics"]

#: Every instrument this module creates.
INSTRUMENT_NAMES: Final[tuple[str, ...]] = (
    "sessionfsm.sessions",
    "sessionfsm.transitions",
    "sessionfsm.dead_letters",
    "sessionfsm.redrives",
    "sessionfsm.batches",
    "sessionfsm.ack.duration",
    "sessionfsm.queue.oldest_age",
    "sessionfsm.link.state",
    "sessionfsm.link.time",
    "sessionfsm.link.changes",
    "sessionfsm.link.failures",
    "sessionfsm.redrive.backlog",
    "sessionfsm.anomalies",
)

_LANE: Final = "sessionfsm.lane"

_Callback = Callable[[CallbackOptions], Iterable[Observation]]


class OtelMetrics:
    """The engine's figures as OpenTelemetry instruments.

    You pass the engine (or a ``tally`` you attached yourself), and optionally
    a ``meter_provider`` (the global one by default), a ``clock`` reading the
    engine's clock, and the ack duration histogram's bucket bounds in seconds
    (passed to the SDK as an advisory; a view can override them).
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        meter_provider: MeterProvider | None = None,
        clock: Callable[[], float] | None = None,
        latency_buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
        tally: Tally | None = None,
    ) -> None:
        self.tally = (
            tally
            if tally is not None
            else Tally(engine, clock=clock, latency_buckets=latency_buckets)
        )
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("sessionfsm")
        observe = self._observe
        meter.create_observable_up_down_counter(
            "sessionfsm.sessions",
            [observe(_sessions)],
            unit="{session}",
            description="Sessions in each state, by lane.",
        )
        meter.create_observable_counter(
            "sessionfsm.transitions",
            [observe(_transitions)],
            unit="{transition}",
            description="Session transitions applied, by event and the state they led to.",
        )
        meter.create_observable_counter(
            "sessionfsm.dead_letters",
            [observe(_dead_letters)],
            unit="{session}",
            description="Sessions dead-lettered, by the ack reason that did it and lane.",
        )
        meter.create_observable_counter(
            "sessionfsm.redrives",
            [observe(_redrives)],
            unit="{session}",
            description="Dead letters redriven, by lane.",
        )
        meter.create_observable_counter(
            "sessionfsm.batches",
            [observe(_batches)],
            unit="{batch}",
            description="Batch events (sent, answered, bounced, timed_out, ...), by lane.",
        )
        meter.create_observable_gauge(
            "sessionfsm.queue.oldest_age",
            [observe(_oldest)],
            unit="s",
            description="Seconds the oldest queued session of each lane has waited (0 if none).",
        )
        meter.create_observable_gauge(
            "sessionfsm.link.state",
            [observe(_link_state)],
            unit="1",
            description="1 for the relay link's current state, 0 for the others.",
        )
        meter.create_observable_counter(
            "sessionfsm.link.time",
            [observe(_link_time)],
            unit="s",
            description="Seconds the relay link has spent in each state (engine clock).",
        )
        meter.create_observable_counter(
            "sessionfsm.link.changes",
            [observe(_link_changes)],
            unit="{change}",
            description="Relay link state changes, by the state left and the state entered.",
        )
        meter.create_observable_gauge(
            "sessionfsm.link.failures",
            [observe(lambda f: [Observation(f.link_failures)])],
            unit="{failure}",
            description="Consecutive relay losses behind the link's current pause.",
        )
        meter.create_observable_up_down_counter(
            "sessionfsm.redrive.backlog",
            [observe(lambda f: [Observation(f.redrive_backlog)])],
            unit="{session}",
            description="Dead letters a paced redrive has yet to reach.",
        )
        meter.create_observable_counter(
            "sessionfsm.anomalies",
            [observe(_anomalies)],
            unit="{input}",
            description="Inputs the engine ignored or clamped (late or unknown acks, ...).",
        )
        self._duration = meter.create_histogram(
            "sessionfsm.ack.duration",
            unit="s",
            description="Seconds from sending a batch to the relay's answer, for answered batches.",
            explicit_bucket_boundaries_advisory=list(latency_buckets),
        )
        self._engine = engine
        if engine is not None:
            engine.subscribe(self._record)

    def close(self) -> None:
        """Stop listening to the engine (the instruments stay, reporting the last figures)."""
        self.tally.detach()
        if self._engine is not None:
            self._engine.unsubscribe(self._record)
            self._engine = None

    def _record(self, report: Report) -> None:
        for batch in report.batches:
            if batch.event == "answered" and batch.latency_s is not None:
                self._duration.record(batch.latency_s, {_LANE: batch.lane.value})

    def _observe(self, render: Callable[[Figures], Iterable[Observation]]) -> _Callback:
        tally = self.tally

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return list(render(tally.figures()))

        return callback


def _sessions(f: Figures) -> Iterable[Observation]:
    for (state, lane), n in f.sessions.items():
        yield Observation(n, {"sessionfsm.session.state": state, _LANE: lane})


def _transitions(f: Figures) -> Iterable[Observation]:
    for (event, outcome), n in f.transitions.items():
        yield Observation(n, {"sessionfsm.event": event, "sessionfsm.outcome": outcome})


def _dead_letters(f: Figures) -> Iterable[Observation]:
    for (reason, lane), n in f.dead_letters.items():
        yield Observation(n, {"sessionfsm.reason": reason, _LANE: lane})


def _redrives(f: Figures) -> Iterable[Observation]:
    for lane, n in f.redrives.items():
        yield Observation(n, {_LANE: lane})


def _batches(f: Figures) -> Iterable[Observation]:
    for (event, lane), n in f.batches.items():
        yield Observation(n, {"sessionfsm.batch.event": event, _LANE: lane})


def _oldest(f: Figures) -> Iterable[Observation]:
    for lane, age in f.oldest_queued_s.items():
        yield Observation(age, {_LANE: lane})


def _link_state(f: Figures) -> Iterable[Observation]:
    for state in f.link_seconds:
        yield Observation(1 if state == f.link_state else 0, {"sessionfsm.link.state": state})


def _link_time(f: Figures) -> Iterable[Observation]:
    for state, seconds in f.link_seconds.items():
        yield Observation(seconds, {"sessionfsm.link.state": state})


def _link_changes(f: Figures) -> Iterable[Observation]:
    for (source, target), n in f.link_changes.items():
        yield Observation(n, {"sessionfsm.link.source": source, "sessionfsm.link.target": target})


def _anomalies(f: Figures) -> Iterable[Observation]:
    for kind, n in f.anomalies.items():
        yield Observation(n, {"sessionfsm.anomaly": kind})
