"""Prometheus metrics for an engine (``pip install 'sessionfsm[prometheus]'``).

You attach one :class:`PrometheusMetrics` to an engine; it registers a
collector in a ``CollectorRegistry`` (the global one unless you pass your
own) and renders the :class:`~sessionfsm.metrics.Tally`'s figures when
scraped::

    metrics = PrometheusMetrics(engine, registry=CollectorRegistry())
    with metrics.serve(port=9464):        # GET http://host:9464/metrics
        await Runner(engine, transport).run()

Every metric, its labels and its meaning are listed in
``docs/observability.md``. Labels are states, lanes, events, reasons and link
states, never a session id.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from ..engine import Engine
from . import DEFAULT_LATENCY_BUCKETS, Histogram, Tally

if TYPE_CHECKING:  # the fleet needs the postgres extra; these metrics only read it
    from ..fleet import Worker

__all__ = [
    "FLEET_METRIC_NAMES",
    "METRIC_NAMES",
    "FleetMetrics",
    "MetricsServer",
    "PrometheusMetrics",
]

#: Every family this module exports (sample names add ``_total``, ``_bucket``, ...).
METRIC_NAMES: Final[tuple[str, ...]] = (
    "sessionfsm_sessions",
    "sessionfsm_transitions_total",
    "sessionfsm_dead_letters_total",
    "sessionfsm_redrives_total",
    "sessionfsm_batches_total",
    "sessionfsm_ack_latency_seconds",
    "sessionfsm_oldest_queued_seconds",
    "sessionfsm_link_state",
    "sessionfsm_link_state_seconds_total",
    "sessionfsm_link_changes_total",
    "sessionfsm_link_failures",
    "sessionfsm_redrive_backlog",
    "sessionfsm_anomalies_total",
)

#: Every family :class:`FleetMetrics` exports.
FLEET_METRIC_NAMES: Final[tuple[str, ...]] = (
    "sessionfsm_fleet_partitions_owned",
    "sessionfsm_fleet_sessions",
    "sessionfsm_fleet_events_total",
    "sessionfsm_fleet_pickup_seconds",
)


class _Exported(Collector):
    """What every exporter here shares: its registry, a scrape, a file, a server."""

    registry: CollectorRegistry

    def close(self) -> None:
        """Leave the registry."""
        self.registry.unregister(self)

    def exposition(self) -> bytes:
        """The registry's text exposition, as a scrape would return it."""
        return generate_latest(self.registry)

    def write(self, path: str | Path) -> None:
        """Write :meth:`exposition` to ``path`` (for a finished simulation, say)."""
        Path(path).write_bytes(self.exposition())

    def serve(self, port: int = 9464, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve the registry on ``http://addr:port/metrics`` from a thread.

        Uses prometheus_client's own server. ``port=0`` picks a free port
        (see ``MetricsServer.port``). Close it, or use it as a context manager.
        """
        return MetricsServer(self.registry, port, addr)


class PrometheusMetrics(_Exported):
    """The engine's figures as Prometheus metrics.

    You pass the engine (or a ``tally`` you attached yourself), and optionally
    the ``registry`` to register in (pass a fresh ``CollectorRegistry`` in
    tests, so they never collide), a ``clock`` reading the engine's clock (for
    ages that grow between ticks; by default the engine's latest ``now``) and
    the ack latency histogram's bucket bounds in seconds.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        registry: CollectorRegistry = REGISTRY,
        clock: Callable[[], float] | None = None,
        latency_buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
        tally: Tally | None = None,
    ) -> None:
        self.tally = (
            tally
            if tally is not None
            else Tally(engine, clock=clock, latency_buckets=latency_buckets)
        )
        self.registry = registry
        registry.register(self)

    def close(self) -> None:
        """Stop listening to the engine and leave the registry."""
        self.tally.detach()
        super().close()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        """Render the tally's figures (called by the registry on each scrape)."""
        f = self.tally.figures()
        sessions = GaugeMetricFamily(
            "sessionfsm_sessions", "Sessions in each state, by lane.", labels=["state", "lane"]
        )
        for (state, lane), n in sorted(f.sessions.items()):
            sessions.add_metric([state, lane], n)
        yield sessions
        transitions = CounterMetricFamily(
            "sessionfsm_transitions",
            "Session transitions applied, by event and the state they led to (outcome).",
            labels=["event", "outcome"],
        )
        for (event, outcome), n in sorted(f.transitions.items()):
            transitions.add_metric([event, outcome], n)
        yield transitions
        dead = CounterMetricFamily(
            "sessionfsm_dead_letters",
            "Sessions dead-lettered, by the ack reason that did it and lane.",
            labels=["reason", "lane"],
        )
        for (reason, lane), n in sorted(f.dead_letters.items()):
            dead.add_metric([reason, lane], n)
        yield dead
        redrives = CounterMetricFamily(
            "sessionfsm_redrives", "Dead letters redriven, by lane.", labels=["lane"]
        )
        for lane, n in sorted(f.redrives.items()):
            redrives.add_metric([lane], n)
        yield redrives
        batches = CounterMetricFamily(
            "sessionfsm_batches",
            "Batch events (sent, answered, bounced, timed_out, ...), by lane.",
            labels=["event", "lane"],
        )
        for (event, lane), n in sorted(f.batches.items()):
            batches.add_metric([event, lane], n)
        yield batches
        latency = HistogramMetricFamily(
            "sessionfsm_ack_latency_seconds",
            "Seconds from sending a batch to the relay's answer, for answered batches.",
            labels=["lane"],
        )
        for lane, hist in sorted(f.ack_latency.items()):
            latency.add_metric([lane], _buckets(hist), sum_value=hist.total)
        yield latency
        oldest = GaugeMetricFamily(
            "sessionfsm_oldest_queued_seconds",
            "Seconds the oldest queued session of each lane has waited (0 if none).",
            labels=["lane"],
        )
        for lane, age in sorted(f.oldest_queued_s.items()):
            oldest.add_metric([lane], age)
        yield oldest
        link = GaugeMetricFamily(
            "sessionfsm_link_state",
            "1 for the relay link's current state, 0 for the others.",
            labels=["state"],
        )
        for state in f.link_seconds:
            link.add_metric([state], 1.0 if state == f.link_state else 0.0)
        yield link
        link_seconds = CounterMetricFamily(
            "sessionfsm_link_state_seconds",
            "Seconds the relay link has spent in each state (engine clock).",
            labels=["state"],
        )
        for state, seconds in f.link_seconds.items():
            link_seconds.add_metric([state], seconds)
        yield link_seconds
        changes = CounterMetricFamily(
            "sessionfsm_link_changes",
            "Relay link state changes, by the state left and the state entered.",
            labels=["source", "target"],
        )
        for (source, target), n in sorted(f.link_changes.items()):
            changes.add_metric([source, target], n)
        yield changes
        yield GaugeMetricFamily(
            "sessionfsm_link_failures",
            "Consecutive relay losses behind the link's current pause.",
            value=f.link_failures,
        )
        yield GaugeMetricFamily(
            "sessionfsm_redrive_backlog",
            "Dead letters a paced redrive has yet to reach.",
            value=f.redrive_backlog,
        )
        anomalies = CounterMetricFamily(
            "sessionfsm_anomalies",
            "Inputs the engine ignored or clamped (late or unknown acks, clock going back, ...).",
            labels=["kind"],
        )
        for kind, n in sorted(f.anomalies.items()):
            anomalies.add_metric([kind], n)
        yield anomalies


class FleetMetrics(_Exported):
    """A fleet worker's own figures as Prometheus metrics.

    You pass the :class:`~sessionfsm.fleet.Worker` (and optionally the
    ``registry``); each scrape reads :meth:`Worker.figures`, a copy the
    worker makes itself, so scraping from the server's thread never touches
    a running engine. The families (:data:`FLEET_METRIC_NAMES`) carry no
    worker id: Prometheus's ``instance`` label tells workers apart, and an id
    that changes at every start would grow the series without end.
    """

    def __init__(self, worker: Worker, *, registry: CollectorRegistry = REGISTRY) -> None:
        self.worker = worker
        self.registry = registry
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        """Render the worker's figures (called by the registry on each scrape)."""
        f = self.worker.figures()
        yield GaugeMetricFamily(
            "sessionfsm_fleet_partitions_owned",
            "Partitions this worker holds the lease of now.",
            value=len(f.partitions),
        )
        sessions = GaugeMetricFamily(
            "sessionfsm_fleet_sessions",
            "Sessions of the partitions this worker owns, in each state.",
            labels=["state"],
        )
        for state, n in f.sessions.items():
            sessions.add_metric([state], n)
        yield sessions
        events = CounterMetricFamily(
            "sessionfsm_fleet_events",
            "What the worker did or met, by kind: acquired, dropped_<why>, fenced "
            "(a write the server refused), commits, sent, send_failed, invalid_ack, "
            "enqueued, inbox_refused, "
            "heartbeat_failed, unwritten_discarded, ...",
            labels=["kind"],
        )
        for kind, n in sorted(f.events.items()):
            events.add_metric([kind], n)
        yield events
        pickup = HistogramMetricFamily(
            "sessionfsm_fleet_pickup_seconds",
            "Seconds from a producer's enqueue to this worker applying it (server clock).",
        )
        pickup.add_metric([], _buckets(f.pickup), sum_value=f.pickup.total)
        yield pickup


def _buckets(hist: Histogram) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs, +Inf last, as Prometheus takes them."""
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, n in zip((*hist.bounds, float("inf")), hist.counts, strict=True):
        cumulative += n
        buckets.append((_bound(bound), cumulative))
    return buckets


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class MetricsServer:
    """prometheus_client's HTTP server for one registry, running in a thread."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str) -> None:
        self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        #: The port it listens on (the one picked, if you passed 0).
        self.port: int = self._server.server_port
        self.addr = addr
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        """Where to scrape it."""
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and wait for the server thread."""
        if not self._closed.is_set():
            self._closed.set()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
