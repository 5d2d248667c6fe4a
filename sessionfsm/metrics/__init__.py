"""Metrics built on the engine's listener API: one tally, two exporters.

:class:`Tally` is a listener (:mod:`sessionfsm.listeners`) that folds every
:class:`~sessionfsm.listeners.Report` into plain counters, under a lock, and
hands a consistent :class:`Figures` copy to whoever asks. It depends on
nothing but the core. The exporters read it:

* :mod:`sessionfsm.metrics.prometheus` (``pip install 'sessionfsm[prometheus]'``);
* :mod:`sessionfsm.metrics.otel` (``pip install 'sessionfsm[otel]'``, the
  OpenTelemetry API only; your application brings the SDK).

Folding costs a few dictionary updates per transition; exporting happens only
when a scraper or a metric reader asks, so the engine's hot path never touches
an exporter library. No session id ever leaves the tally: every label is a
state, a lane, an event, a reason or a link state.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from itertools import chain, compress, repeat
from operator import attrgetter, eq
from typing import Final

import msgspec

from .._errors import UsageError
from ..engine import Engine
from ..listeners import BatchEvent, Report
from ..machine import CHARGED_REASONS, Lane, LinkState, SessionState

__all__ = ["BATCH_EVENTS", "DEFAULT_LATENCY_BUCKETS", "Figures", "Histogram", "Tally"]

#: Upper bounds (seconds) of the ack latency histogram's buckets; the last,
#: +Inf, is implied. From a fast relay (50 ms) to the default ack timeout (30 s)
#: and beyond, for a policy with a longer one.
DEFAULT_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
#: Batch events the engine reports today, shown at zero before they happen.
#: Any other event name it reports later is counted as it comes.
BATCH_EVENTS: Final[tuple[str, ...]] = ("sent", "answered", "bounced", "timed_out")

#: Reports a tally buffers before folding them in one go (and when read).
_FOLD_EVERY: Final = 128

_QUEUED: Final = SessionState.QUEUED
_DEAD: Final = SessionState.DEAD_LETTERED
_BACKFILL: Final = Lane.BACKFILL.value
_INCREMENTAL: Final = Lane.INCREMENTAL.value

# The fold reads reports and batch events in bulk through these (in C).
_BATCHES = attrgetter("batches")
_LINK_AFTER = attrgetter("link_after")
_BATCH_KEY = attrgetter("event", "lane")
_EVENT = attrgetter("event")


class Histogram(msgspec.Struct, frozen=True):
    """Cumulative bucket counts, as Prometheus and OpenTelemetry both take them."""

    #: Upper bounds, without +Inf.
    bounds: tuple[float, ...]
    #: ``counts[i]`` observations fell in bucket i (not cumulative); one more
    #: entry than ``bounds`` for +Inf.
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        """How many observations in all."""
        return sum(self.counts)


class Figures(msgspec.Struct, frozen=True):
    """A consistent copy of everything a :class:`Tally` holds, at time ``now``."""

    now: float | None
    #: (state, lane) -> sessions in it now.
    sessions: dict[tuple[str, str], int]
    #: (event, target state) -> transitions applied.
    transitions: dict[tuple[str, str], int]
    #: (reason, lane) -> sessions dead-lettered.
    dead_letters: dict[tuple[str, str], int]
    #: lane -> redrives (by hand, in bulk or paced).
    redrives: dict[str, int]
    #: (batch event, lane) -> batches.
    batches: dict[tuple[str, str], int]
    #: lane -> send-to-answer latency of answered batches.
    ack_latency: dict[str, Histogram]
    #: lane -> seconds the oldest ``queued`` session has waited in it (0 if none).
    oldest_queued_s: dict[str, float]
    link_state: str
    link_failures: int
    #: link state -> seconds spent in it, the current stretch included.
    link_seconds: dict[str, float]
    #: (from, to) -> link state changes.
    link_changes: dict[tuple[str, str], int]
    #: Dead letters a paced redrive has yet to reach (0 when not attached).
    redrive_backlog: int
    #: Inputs the engine ignored or clamped, by kind (``Engine.anomalies``;
    #: empty when not attached).
    anomalies: dict[str, int]


class Tally:
    """A listener that keeps the figures a dashboard shows.

    Attach it to an engine with :meth:`attach` (or pass ``engine=``): it reads
    the sessions already there once (O(n)), so the per-state gauges are right
    from the start, then subscribes. Queued sessions found at attach count as
    waiting since the engine's clock then. Time is the engine's clock: ages
    and link durations are measured against the latest ``now`` the engine has
    seen (or ``clock()``, if you pass one that reads the same clock, so ages
    keep growing between ticks).

    It keeps one entry per queued session (to know the oldest per lane) and a
    handful of counters; nothing else grows with the number of sessions.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        clock: Callable[[], float] | None = None,
        latency_buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> None:
        bounds = tuple(float(b) for b in latency_buckets)
        if not bounds or any(b <= a for a, b in itertools.pairwise(bounds)):
            raise UsageError(f"latency_buckets must be increasing, got {latency_buckets!r}")
        self._bounds = bounds
        self._clock = clock
        self._lock = threading.Lock()
        self._buffer: deque[Report] = deque()
        self._engine: Engine | None = None
        lanes = [lane.value for lane in Lane]
        self._lanes = lanes
        # (state, lane) -> sessions found at attach; the rows add the rest.
        self._seed: dict[tuple[str, str], int] = {
            (state.value, lane): 0 for state in SessionState for lane in lanes
        }
        # (lane, event, source, target, reason) -> rows folded.
        self._rows: dict[tuple[str, str, str | None, str, str | None], int] = {}
        self._dead_keys = [(reason, lane) for reason in CHARGED_REASONS for lane in lanes]
        self._batches: Counter[tuple[str, str]] = Counter(
            {(event, lane): 0 for event in BATCH_EVENTS for lane in lanes}
        )
        self._latency: dict[str, list[int]] = {lane: [0] * (len(bounds) + 1) for lane in lanes}
        self._latency_sum: dict[str, float] = dict.fromkeys(lanes, 0.0)
        # lane -> {session id: when it last joined that lane's queue}; insertion
        # order is time order (the engine's clock never goes back), so the
        # first entry is the oldest.
        self._queued: dict[str, dict[str, float]] = {lane: {} for lane in lanes}
        self._now: float | None = None
        self._link_state = LinkState.UP.value
        self._link_failures = 0
        self._link_since: float | None = None
        self._link_seconds: dict[str, float] = {state.value: 0.0 for state in LinkState}
        self._link_changes: dict[tuple[str, str], int] = {}
        if engine is not None:
            self.attach(engine)

    # ----------------------------------------------------------- the listener

    def attach(self, engine: Engine) -> None:
        """Read what ``engine`` holds now, then subscribe to it."""
        if self._engine is not None:
            raise UsageError("this tally is already attached to an engine")
        now = engine.now
        with self._lock:
            for view in engine.sessions():
                state, lane = view.state.value, view.lane.value
                self._seed[state, lane] += 1
                if view.state is _QUEUED:
                    self._queued[lane][view.id] = now
            link = engine.link
            self._link_state = link.state.value
            self._link_failures = link.failures
            self._link_since = now
            self._now = now
        self._engine = engine
        # The bound method, not the tally itself: CPython calls a bound
        # method through a fast path, while calling an instance goes through
        # ``type(self).__call__`` by the slow, generic route (measured: about
        # three times as long per report, a tenth of the listener's cost).
        engine.subscribe(self.__call__)

    def detach(self) -> None:
        """Unsubscribe from the engine; the figures stay as they were."""
        if self._engine is not None:
            self._engine.unsubscribe(self.__call__)
            self._engine = None

    def __call__(self, report: Report) -> None:
        """Take one call's journal; it is folded into the figures in bulk."""
        # The engine's thread only appends (a deque's append is atomic); the
        # folding happens every ``_FOLD_EVERY`` reports, or when the figures
        # are read, under the lock, in whichever thread gets there.
        buffer = self._buffer
        buffer.append(report)
        if len(buffer) >= _FOLD_EVERY:
            with self._lock:
                self._fold()

    def _fold(self) -> None:
        # The hot path: one dictionary update per row, plus the queue's
        # bookkeeping; gauges and counters are derived from ``_rows`` when
        # read, over its few distinct keys. The rows are the reports' plain
        # tuples, not Change structs: unpacking a tuple is cheaper than
        # reading five attributes, and an engine with no store then never
        # builds the Change rows at all. Batch events and link changes are
        # gathered from all the buffered reports at once. Call it holding the
        # lock.
        buffer = self._buffer
        n = len(buffer)  # reports appended meanwhile wait for the next fold
        if not n:
            return
        take = buffer.popleft
        reports = [take() for _ in range(n)]
        if self._link_since is None:
            self._link_since = reports[0].now
        rows, queued = self._rows, self._queued
        queued_state = _QUEUED
        for report in reports:
            now = report.now
            # The engine hands states as SessionState members: identity is
            # enough. The tests are ordered by how often they decide.
            for sid, lane, event, source, target, reason, _attempt in report.rows:
                key = (lane, event, source, target, reason)
                try:
                    rows[key] += 1
                except KeyError:
                    rows[key] = 1
                if source is queued_state:
                    if target is not queued_state:
                        queued[lane].pop(sid, None)
                    elif event == "promoted":
                        # The one lane move: out of backfill, to the back of incremental.
                        queued[_BACKFILL].pop(sid, None)
                        queued[_INCREMENTAL][sid] = now
                elif target is queued_state:
                    queued[lane][sid] = now
        events = list(chain.from_iterable(map(_BATCHES, reports)))
        if events:
            self._fold_batches(events)
        for report in filter(_LINK_AFTER, reports):
            after = report.link_after
            assert after is not None
            self._fold_link(after.state.value, after.failures, report.now)
        self._now = reports[-1].now

    def _fold_batches(self, events: list[BatchEvent]) -> None:
        self._batches.update(map(_BATCH_KEY, events))
        bounds, latency, total = self._bounds, self._latency, self._latency_sum
        for batch in compress(events, map(eq, map(_EVENT, events), repeat("answered"))):
            seconds = batch.latency_s
            if seconds is not None:
                latency[batch.lane][bisect.bisect_left(bounds, seconds)] += 1
                total[batch.lane] += seconds

    def _fold_link(self, state: str, failures: int, now: float) -> None:
        if self._link_since is None:
            self._link_since = now
        if state != self._link_state:
            left = self._link_state
            self._link_seconds[left] = self._link_seconds.get(left, 0.0) + now - self._link_since
            key = (left, state)
            self._link_changes[key] = self._link_changes.get(key, 0) + 1
            self._link_state = state
            self._link_since = now
        self._link_failures = failures

    def _derived(
        self,
    ) -> tuple[
        dict[tuple[str, str], int],
        dict[tuple[str, str], int],
        dict[tuple[str, str], int],
        dict[str, int],
    ]:
        """Sessions, transitions, dead letters and redrives, from the rows."""
        sessions = dict(self._seed)
        transitions: dict[tuple[str, str], int] = {}
        dead = dict.fromkeys(self._dead_keys, 0)
        redrives = dict.fromkeys(self._lanes, 0)
        for (lane, event, source, target, reason), n in self._rows.items():
            key = (str(event), str(target))
            transitions[key] = transitions.get(key, 0) + n
            if source == target:
                if event == "promoted":
                    sessions[str(source), _BACKFILL] -= n
                    sessions[str(source), _INCREMENTAL] += n
                continue
            if source is not None:
                sessions[str(source), str(lane)] -= n
            sessions[str(target), str(lane)] += n
            if target == _DEAD and reason is not None:
                dkey = (str(reason), str(lane))
                dead[dkey] = dead.get(dkey, 0) + n
            if event == "redriven":
                redrives[str(lane)] += n
        return sessions, transitions, dead, redrives

    # ------------------------------------------------------------- the output

    def figures(self) -> Figures:
        """A consistent copy of the figures, with ages and durations up to now."""
        engine = self._engine
        with self._lock:
            self._fold()
            now = self._now
            if self._clock is not None:
                now = float(self._clock())
            elif engine is not None:
                now = engine.now
            if now is not None and self._now is not None and now < self._now:
                now = self._now
            oldest: dict[str, float] = {}
            for lane, waiting in self._queued.items():
                first = next(iter(waiting.values()), None)
                oldest[lane] = (
                    max(0.0, now - first) if first is not None and now is not None else 0.0
                )
            link_seconds = dict(self._link_seconds)
            if now is not None and self._link_since is not None:
                link_seconds[self._link_state] = (
                    link_seconds.get(self._link_state, 0.0) + now - self._link_since
                )
            bounds = self._bounds
            sessions, transitions, dead, redrives = self._derived()
            return Figures(
                now=now,
                sessions=sessions,
                transitions=transitions,
                dead_letters=dead,
                redrives=redrives,
                batches={(str(e), str(lane)): n for (e, lane), n in self._batches.items()},
                ack_latency={
                    str(lane): Histogram(
                        bounds=bounds, counts=tuple(counts), total=self._latency_sum[lane]
                    )
                    for lane, counts in self._latency.items()
                },
                oldest_queued_s=oldest,
                link_state=self._link_state,
                link_failures=self._link_failures,
                link_seconds=link_seconds,
                link_changes=dict(self._link_changes),
                redrive_backlog=engine.redrive_backlog if engine is not None else 0,
                anomalies=engine.anomalies if engine is not None else {},
            )
