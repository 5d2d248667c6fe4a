"""Per-ack cost of an engine with the metrics attached, against none.

Self-contained: ``python -m benchmarks.bench_listeners`` (or call
:func:`listener_cost`). N sessions are enqueued, then ticked and answered from
a fixed mix of acks (65 % ``Ok``; ``RateLimited``, ``AckTimeout``,
``PayloadTooLarge`` and ``RelayUnavailable`` for the rest) until every one is
at rest, with the default policy and no pause between batches. An *ack* is one
session answered. The figure is the wall time of the whole run divided by the
acks, so ticks and enqueues are charged to the acks they lead to.

Four engines run the identical script, interleaved round by round in one
process (none, noop, Prometheus, OpenTelemetry, none, ...) so that a noisy
neighbour slows every side alike: ``none`` (no listener), ``noop`` (one
listener that does nothing: the cost of the journal itself), ``prometheus``
(:class:`sessionfsm.metrics.prometheus.PrometheusMetrics` in its own
registry, scraped once at the end, outside the timing) and ``otel``
(:class:`sessionfsm.metrics.otel.OtelMetrics` on an SDK ``MeterProvider``
with an in-memory reader, collected once at the end, outside the timing).
Each figure is the median of the rounds; the headline is the median of the
per-round ratios prometheus / none. Target: at most 1.5. The OpenTelemetry
ratio is reported beside it, without a target: most of it is the SDK's
histogram ``record``, once per answered batch.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final

import msgspec

from sessionfsm import Engine, Policy, Report, acks

__all__ = ["TARGET", "ListenerCost", "drive", "listener_cost", "main"]

#: The headline's limit: prometheus / none.
TARGET: Final = 1.5

_MIX: Final[tuple[acks.Ack, ...]] = (
    *(acks.Ok(), acks.Ok(), acks.RateLimited(), acks.Ok(), acks.Ok()),
    *(acks.AckTimeout(), acks.Ok(), acks.Ok(), acks.Ok(), acks.RateLimited(retry_after_s=5.0)),
    *(acks.Ok(), acks.Ok(), acks.RelayUnavailable(), acks.Ok(), acks.Ok()),
    *(acks.RateLimited(), acks.Ok(), acks.PayloadTooLarge(), acks.Ok(), acks.AckTimeout()),
)
_POLICY: Final = Policy(incremental_interval_s=0.0)


class ListenerCost(msgspec.Struct, frozen=True):
    """Medians of the rounds, in microseconds per ack, and the ratios."""

    sessions: int
    acks: int
    rounds: int
    us_per_ack: dict[str, float]
    prometheus_over_none: float
    prometheus_over_none_range: tuple[float, float]
    noop_over_none: float
    otel_over_none: float
    otel_over_none_range: tuple[float, float]
    target: float = TARGET

    @property
    def ok(self) -> bool:
        return self.prometheus_over_none <= self.target


def session_ids(n: int, seed: int = 7) -> list[str]:
    """``n`` distinct UUID-like ids, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        h = f"{rng.getrandbits(128):032x}"
        out.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}")
    return out


def drive(engine: Engine, ids: Sequence[str]) -> int:
    """Enqueue ``ids``, tick and answer from the mix until all rest; return the acks."""
    mix, size = _MIX, len(_MIX)
    k = 0
    now = 0.0
    for sid in ids:
        engine.enqueue(sid)
    while not engine.idle():
        for batch in engine.tick(now):
            answer: dict[str, acks.Ack] = {}
            for sid in batch.session_ids:
                answer[sid] = mix[k % size]
                k += 1
            engine.on_ack(batch.id, answer, now)
        now += 1.0
    return k


def _noop(report: Report) -> None:
    return None


def _engine_none() -> tuple[Engine, Callable[[], object]]:
    return Engine(_POLICY, rng=random.Random(0), log=False), lambda: None


def _engine_noop() -> tuple[Engine, Callable[[], object]]:
    return Engine(_POLICY, rng=random.Random(0), log=False, listeners=[_noop]), lambda: None


def _engine_prometheus() -> tuple[Engine, Callable[[], object]]:
    from prometheus_client import CollectorRegistry

    from sessionfsm.metrics.prometheus import PrometheusMetrics

    engine = Engine(_POLICY, rng=random.Random(0), log=False)
    metrics = PrometheusMetrics(engine, registry=CollectorRegistry())
    return engine, metrics.exposition


def _engine_otel() -> tuple[Engine, Callable[[], object]]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from sessionfsm.metrics.otel import OtelMetrics

    engine = Engine(_POLICY, rng=random.Random(0), log=False)
    reader = InMemoryMetricReader()
    OtelMetrics(engine, meter_provider=MeterProvider(metric_readers=[reader]))
    return engine, reader.get_metrics_data


def listener_cost(n: int = 20_000, rounds: int = 7) -> ListenerCost:
    """Run the four engines ``rounds`` times each, interleaved; see the module notes."""
    ids = session_ids(n)
    makers = {
        "none": _engine_none,
        "noop": _engine_noop,
        "prometheus": _engine_prometheus,
        "otel": _engine_otel,
    }
    us: dict[str, list[float]] = {name: [] for name in makers}
    answered = 0
    for _ in range(rounds):
        for name, make in makers.items():
            engine, scrape = make()
            gc.collect()
            start = time.process_time()
            answered = drive(engine, ids)
            elapsed = time.process_time() - start
            scrape()  # outside the timing: a scrape is the scraper's cost
            us[name].append(elapsed / answered * 1e6)
    prom = _ratios(us["prometheus"], us["none"])
    noop = _ratios(us["noop"], us["none"])
    otel = _ratios(us["otel"], us["none"])
    return ListenerCost(
        sessions=n,
        acks=answered,
        rounds=rounds,
        us_per_ack={name: round(statistics.median(v), 3) for name, v in us.items()},
        prometheus_over_none=round(statistics.median(prom), 3),
        prometheus_over_none_range=(round(min(prom), 3), round(max(prom), 3)),
        noop_over_none=round(statistics.median(noop), 3),
        otel_over_none=round(statistics.median(otel), 3),
        otel_over_none_range=(round(min(otel), 3), round(max(otel), 3)),
    )


def _ratios(side: list[float], base: list[float]) -> list[float]:
    return [s / b for s, b in zip(side, base, strict=True)]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the figures; exit 1 with ``--check`` if the target is missed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_listeners")
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--check", action="store_true", help="exit 1 if over the target")
    args = parser.parse_args(argv)
    cost = listener_cost(args.sessions, args.rounds)
    if args.json:
        print(msgspec.json.encode(cost).decode())
    else:
        print(f"per-ack cost, {cost.sessions} sessions, {cost.acks} acks, {cost.rounds} rounds")
        for name, value in cost.us_per_ack.items():
            print(f"  {name:11} {value:8.3f} us/ack")
        low, high = cost.prometheus_over_none_range
        print(
            f"  prometheus / none: {cost.prometheus_over_none:.3f} "
            f"(rounds {low:.3f}-{high:.3f}; target <= {cost.target})"
        )
        print(f"  noop / none:       {cost.noop_over_none:.3f}")
        low, high = cost.otel_over_none_range
        print(f"  otel / none:       {cost.otel_over_none:.3f} (rounds {low:.3f}-{high:.3f})")
    return 1 if args.check and not cost.ok else 0


if __name__ == "__main__":
    sys.exit(main())
