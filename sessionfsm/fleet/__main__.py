"""``python -m sessionfsm.fleet``: run one worker against an HTTP relay until SIGTERM.

It prints ``{"ready": worker id}`` as one JSON line on stdout once it has
joined (with ``"metrics": url`` when ``--metrics-port`` serves its Prometheus
metrics, :class:`~sessionfsm.metrics.prometheus.FleetMetrics`). On the way
out it gives its leases back and prints its figures as one JSON line on
stdout. Logs go to stderr as JSON lines at ``--log-level``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from typing import Any

import structlog

from ..policy import Policy
from .worker import HttpSender, Worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sessionfsm.fleet", description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--relay", required=True, help="URL the batches are POSTed to")
    parser.add_argument("--schema", default="sessionfsm")
    parser.add_argument("--partitions", type=int, default=None)
    parser.add_argument("--lease-s", type=float, default=10.0)
    parser.add_argument("--tick-s", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve the worker's Prometheus metrics on this port (0: a free one; "
        "needs the prometheus extra)",
    )
    parser.add_argument("--metrics-addr", default="127.0.0.1")
    args = parser.parse_args(argv)
    if args.metrics_port is not None:
        try:
            from ..metrics.prometheus import FleetMetrics
        except ImportError:
            parser.error(
                "--metrics-port needs prometheus_client: pip install 'sessionfsm[prometheus]'"
            )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[args.log_level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    policy = Policy(
        batch_size=args.batch_size,
        incremental_interval_s=0.0,
        backfill_interval_s=0.0,
        tick_interval_s=args.tick_s or 0.1,
        ack_timeout_s=10.0,
    )
    stopping: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker = Worker(
        args.dsn,
        HttpSender(args.relay),
        schema=args.schema,
        partitions=args.partitions,
        policy=policy,
        lease_s=args.lease_s,
        tick_s=args.tick_s,
        worker_id=args.worker_id,
    )
    ready: dict[str, Any] = {"ready": worker.id}
    with contextlib.ExitStack() as stack:
        if args.metrics_port is not None:
            from prometheus_client import CollectorRegistry

            metrics = FleetMetrics(worker, registry=CollectorRegistry())
            server = stack.enter_context(metrics.serve(args.metrics_port, args.metrics_addr))
            ready["metrics"] = server.url
        print(json.dumps(ready), flush=True)
        worker.run(until=lambda: bool(stopping))
    print(json.dumps({"worker": worker.id, "stats": worker.stats}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
