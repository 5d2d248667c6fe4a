"""PostgreSQL and the fleet, measured: ``python -m benchmarks.bench_postgres``.

1. Persisted transitions per second for one engine on PostgreSQL beside
   SQLite, same workload, same process (medians of ``--repeat`` runs), at the
   default batch size and at 100.
2. Persisted transitions per second for one fleet worker at the default
   batch, writing grouped (its default) and every turn, beside one engine on
   SQLite with the same workload, interleaved round by round.
3. Aggregate throughput with 1, 2 and 4 worker processes on one database,
   each sending to one HTTP relay on 127.0.0.1 that answers Ok at once
   (the median of ``--repeat`` runs, every run's rate beside it).
4. Takeover time after a SIGKILL: from the kill until every partition of
   the killed worker has a new live owner (lease ``--lease-s``).
5. Enqueue-to-pickup latency: from a producer's commit to the owning
   worker applying it (server clock), with NOTIFY.

PostgreSQL is ``--dsn``, else ``sessionfsm.testing.postgres_server()``
(``$SESSIONFSM_TEST_DSN`` or a throwaway pgserver). Figures depend on the
machine: the output names its cores, and the whole run shares them; the
latency of one bare commit (the server's WAL flush) is measured before and
after the one-engine runs, because on a shared disk it moves the PostgreSQL
figures more than anything in sessionfsm does.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.bench import PostgresCost
from sessionfsm import Engine, Policy, SqliteStore, Store, acks
from sessionfsm.fleet import Coordinator, Producer, Worker
from sessionfsm.postgres_store import PostgresStore
from sessionfsm.testing import DSN_VARIABLE, postgres_server

_schemas = iter(range(1, 1_000_000))


def _schema() -> str:
    return f"bench_{os.getpid()}_{next(_schemas)}"


def _server(dsn: str | None) -> contextlib.AbstractContextManager[str]:
    """``dsn`` itself, or ``sessionfsm.testing.postgres_server()`` for the duration."""
    return contextlib.nullcontext(dsn) if dsn else postgres_server()


def commit_latency(dsn: str, *, commits: int = 200) -> dict[str, float]:
    """Milliseconds of one single-row ``UPDATE`` committed alone (median, p95).

    The floor of a durable save: one round trip plus the server's WAL flush
    (fsync). On a shared virtual disk this varies a hundredfold with what the
    neighbours write, so it is measured beside the figures it explains.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A temporary table's changes skip the WAL; a real one is needed for the flush.
        table = f'"{_schema()}_commit"'
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n int)")
        try:
            conn.execute(f"INSERT INTO {table} VALUES (1, 0)")
            times = []
            for _ in range(commits):
                start = time.perf_counter()
                conn.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1", prepare=True)
                times.append(time.perf_counter() - start)
        finally:
            conn.execute(f"DROP TABLE {table}")
    times.sort()
    return {
        "median_ms": round(1000 * statistics.median(times), 3),
        "p95_ms": round(1000 * times[int(0.95 * (len(times) - 1))], 3),
    }


# ----------------------------------------------------------- one engine


def _cycle(store: Store, sessions: int, batch: int, *, hold: str = "call") -> tuple[float, int]:
    """Enqueue ``sessions``, then send and ack them all; (seconds, transitions) of the sends.

    ``hold`` says what one transaction holds: ``"call"``, every engine call
    (each tick and each ack is one save); ``"acks"``, the acks of one tick's
    batches; ``"tick"``, a tick with its sends and their acks, as a fleet
    worker writes them. The last two need a ``PostgresStore``.
    """
    policy = Policy(batch_size=batch, incremental_interval_s=0.0, max_in_flight=4)
    engine = Engine(policy, store=store, rng=random.Random(0), log=False)
    engine.enqueue_many([f"s{i:07d}" for i in range(sessions)], now=1.0)
    now = 2.0
    start = time.perf_counter()
    transitions = 0
    pg = store if isinstance(store, PostgresStore) else None
    while not engine.idle():
        tick_held = pg.hold() if hold == "tick" and pg else contextlib.nullcontext()
        with tick_held:
            batches = engine.tick(now)
            acks_held = pg.hold() if hold == "acks" and pg else contextlib.nullcontext()
            with acks_held:
                for b in batches:
                    engine.on_ack(b.id, acks.Ok(), now)
                    transitions += 2 * len(b.session_ids)  # sent, then acked
        now += 0.001
    return time.perf_counter() - start, transitions


def one_engine(dsn: str, *, sessions: int, batch: int, repeat: int) -> dict[str, Any]:
    """Persisted transitions/s, PostgreSQL and SQLite, medians of ``repeat`` runs.

    ``postgres_tick_held`` is what one fleet worker does (a tick and its
    answers are one transaction); ``postgres`` saves every engine call on its
    own, as a single engine on a ``PostgresStore`` does.
    """
    variants = {  # name: (synchronous_commit, hold)
        "postgres": (True, "call"),
        "postgres_async_commit": (False, "call"),
        "postgres_acks_held": (True, "acks"),
        "postgres_tick_held": (True, "tick"),
    }
    rates: dict[str, list[float]] = {"sqlite": [], **{name: [] for name in variants}}
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            with SqliteStore(Path(tmp) / "bench.db") as sqlite_store:
                secs, n = _cycle(sqlite_store, sessions, batch)
            rates["sqlite"].append(n / secs)
        for key, (sync, hold) in variants.items():
            with PostgresStore(dsn, schema=_schema(), synchronous_commit=sync) as pg_store:
                secs, n = _cycle(pg_store, sessions, batch, hold=hold)
            rates[key].append(n / secs)
    out: dict[str, Any] = {k: round(statistics.median(v)) for k, v in rates.items()}
    out["postgres_vs_sqlite"] = round(out["postgres"] / out["sqlite"], 3)
    return out


# ------------------------------------------------------------- one worker


def _worker_run(
    dsn: str, *, sessions: int, partitions: int, batch: int, commit_interval_s: float
) -> dict[str, Any]:
    """One ``Worker`` in this process syncing ``sessions`` a producer enqueued first.

    The relay is a function answering ``Ok`` at once, so the figure is the
    worker and the database alone. Timed from ``run()`` to its return (every
    group written, every lease given back); the transitions are counted from
    the server's history rows (enqueued, sent, acked: three per session).
    """
    schema = _schema()
    Coordinator(dsn, schema=schema, partitions=partitions).close()
    with Producer(dsn, schema=schema) as producer:
        for chunk in range(0, sessions, 5000):
            producer.enqueue(f"s{i}" for i in range(chunk, min(chunk + 5000, sessions)))
    acked = [0]

    def send(_partition: int, _epoch: int, b: Any) -> acks.Ack:
        acked[0] += len(b.session_ids)
        return acks.Ok()

    policy = Policy(batch_size=batch, incremental_interval_s=0.0, tick_interval_s=0.02)
    worker = Worker(
        dsn,
        send,
        schema=schema,
        policy=policy,
        lease_s=30.0,
        inbox_limit=sessions,
        commit_interval_s=commit_interval_s,
        log=False,
    )
    start = time.perf_counter()
    worker.run(until=lambda: acked[0] >= sessions)
    secs = time.perf_counter() - start
    rows = _scalar(dsn, f'SELECT count(*) FROM "{schema}".history')
    synced = _scalar(dsn, f"SELECT count(*) FROM \"{schema}\".session WHERE state = 'synced'")
    if synced != sessions:  # pragma: no cover - a bug, not a measurement
        raise RuntimeError(f"one worker: {synced} of {sessions} sessions synced")
    return {
        "transitions_s": round(rows / secs),
        "seconds": round(secs, 3),
        "commits": worker.stats.get("commits", 0),
    }


def _sqlite_engine(sessions: int, batch: int) -> float:
    """The same workload on one engine with a ``SqliteStore`` (a commit per call): t/s.

    Enqueued with one ``enqueue_many``, then ticked and answered ``Ok`` until
    every session is synced; three persisted transitions per session, as the
    worker's.
    """
    policy = Policy(batch_size=batch, incremental_interval_s=0.0)
    with tempfile.TemporaryDirectory() as tmp, SqliteStore(Path(tmp) / "bench.db") as store:
        engine = Engine(policy, store=store, rng=random.Random(0), log=False)
        now = 1.0
        start = time.perf_counter()
        engine.enqueue_many([f"s{i}" for i in range(sessions)], now=now)
        while not engine.idle():
            now += 0.001
            for b in engine.tick(now):
                engine.on_ack(b.id, acks.Ok(), now)
        secs = time.perf_counter() - start
    return 3 * sessions / secs


def one_worker(
    dsn: str, *, sessions: int, repeat: int, partitions: int = 8, batch: int | None = None
) -> dict[str, Any]:
    """Persisted transitions/s of one fleet worker at its defaults (``grouped``),
    beside the same worker writing every turn (``every_turn``,
    ``commit_interval_s=0``) and one engine on SQLite (``sqlite``), interleaved
    round by round; medians of ``repeat`` rounds."""
    batch = batch if batch is not None else Policy().batch_size
    rates: dict[str, list[int]] = {"sqlite": [], "grouped": [], "every_turn": []}
    commits: dict[str, list[int]] = {"grouped": [], "every_turn": []}
    for _ in range(repeat):
        rates["sqlite"].append(round(_sqlite_engine(sessions, batch)))
        for key, interval in (("grouped", 0.05), ("every_turn", 0.0)):
            got = _worker_run(
                dsn,
                sessions=sessions,
                partitions=partitions,
                batch=batch,
                commit_interval_s=interval,
            )
            rates[key].append(got["transitions_s"])
            commits[key].append(got["commits"])
    out: dict[str, Any] = {"sessions": sessions, "partitions": partitions, "batch": batch}
    for key, rs in rates.items():
        out[key] = round(statistics.median(rs))
        out[f"{key}_runs"] = rs
    for key, cs in commits.items():
        out[f"{key}_commits"] = round(statistics.median(cs))
    out["grouped_over_sqlite"] = round(out["grouped"] / out["sqlite"], 3)
    return out


# ------------------------------------------------------------- the fleet


class _OkRelay:
    """An HTTP relay on 127.0.0.1 that answers every batch Ok at once."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                reply = acks.encode(acks.BatchAck(batch_id=body["batch_id"], ack=acks.Ok()))
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/batch"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _spawn(dsn: str, schema: str, relay: str, name: str, lease_s: float, batch: int) -> Any:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sessionfsm.fleet",
            *("--dsn", dsn, "--schema", schema, "--relay", relay, "--worker-id", name),
            *("--lease-s", str(lease_s), "--tick-s", "0.02", "--batch-size", str(batch)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # ready
    return proc


def _scalar(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


def _owned_live(dsn: str, schema: str) -> dict[int, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f'SELECT partition, owner FROM "{schema}".part WHERE expires_at > clock_timestamp()'
        ).fetchall()
    return dict(rows)


def fleet(
    dsn: str, *, workers: int, sessions: int, partitions: int, lease_s: float, batch: int
) -> dict[str, Any]:
    """Aggregate transitions/s of ``workers`` processes syncing ``sessions`` new sessions."""
    schema = _schema()
    Coordinator(dsn, schema=schema, partitions=partitions).close()
    relay = _OkRelay()
    procs = [_spawn(dsn, schema, relay.url, f"w{i}", lease_s, batch) for i in range(workers)]
    try:
        deadline = time.monotonic() + 30
        while len(_owned_live(dsn, schema)) < partitions and time.monotonic() < deadline:
            time.sleep(0.05)
        with Producer(dsn, schema=schema) as producer:
            start = time.perf_counter()
            for chunk in range(0, sessions, 1000):
                producer.enqueue(f"s{i}" for i in range(chunk, min(chunk + 1000, sessions)))
            synced = 0
            while synced < sessions:
                time.sleep(0.05)
                synced = _scalar(
                    dsn, f"SELECT count(*) FROM \"{schema}\".session WHERE state = 'synced'"
                )
            secs = time.perf_counter() - start
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.communicate(timeout=30)
        relay.close()
    # enqueued, sent, acked: three persisted transitions per session.
    rate = round(3 * sessions / secs)
    return {"workers": workers, "seconds": round(secs, 2), "transitions_s": rate}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, and every run's rate beside it."""
    ranked = sorted(runs, key=lambda r: r["transitions_s"])
    return {
        **ranked[(len(ranked) - 1) // 2],
        "runs_transitions_s": [r["transitions_s"] for r in runs],
    }


def takeover(dsn: str, *, partitions: int, lease_s: float, tick_s: float = 0.02) -> dict[str, Any]:
    """Seconds from SIGKILL of one of two workers to every one of its partitions re-owned."""
    schema = _schema()
    Coordinator(dsn, schema=schema, partitions=partitions).close()
    relay = _OkRelay()
    procs = [_spawn(dsn, schema, relay.url, f"w{i}", lease_s, 10) for i in range(2)]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            owners = _owned_live(dsn, schema)
            if len(owners) == partitions and set(owners.values()) == {"w0", "w1"}:
                break
            time.sleep(0.02)
        victim = {p for p, o in _owned_live(dsn, schema).items() if o == "w0"}
        procs[0].kill()
        killed = time.perf_counter()
        while True:
            owners = _owned_live(dsn, schema)
            if all(owners.get(p) == "w1" for p in victim):
                break
            time.sleep(0.005)
        secs = time.perf_counter() - killed
    finally:
        procs[0].wait()
        procs[1].send_signal(signal.SIGTERM)
        procs[1].communicate(timeout=30)
        relay.close()
    return {
        "seconds": round(secs, 3),
        "lease_s": lease_s,
        "heartbeat_s": round(lease_s / 3, 3),
        "tick_s": tick_s,
        "partitions_moved": len(victim),
    }


def pickup(dsn: str, *, enqueues: int) -> dict[str, Any]:
    """Producer commit to worker apply, one session at a time, NOTIFY on (server clock)."""
    schema = _schema()
    worker = Worker(
        dsn,
        lambda p, e, b: acks.Ok(),
        schema=schema,
        partitions=4,
        lease_s=5.0,
        tick_s=1.0,  # only a NOTIFY wakes it early
        log=False,
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"until": stop.is_set}, daemon=True)
    thread.start()
    with Producer(dsn, schema=schema) as producer:
        time.sleep(0.5)
        for i in range(enqueues):
            producer.enqueue([f"p{i}"])
            time.sleep(0.02)
        time.sleep(1.5)
    stop.set()
    thread.join(timeout=30)
    lat = sorted(worker.pickup_latencies)
    return {
        "enqueues": len(lat),
        "median_ms": round(1000 * statistics.median(lat), 2),
        "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 2),
    }


def postgres_cost(
    *, sessions: int, fleet_sessions: int, repeat: int, dsn: str | None = None
) -> PostgresCost:
    """Every figure ``sessionfsm bench`` reports for PostgreSQL, or why there are none."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(_server(dsn))
        except ImportError as exc:
            return PostgresCost(available=False, note=f"no PostgreSQL server: {exc}")
        latency = commit_latency(url)
        worker = one_worker(url, sessions=sessions, repeat=repeat)
        took = takeover(url, partitions=8, lease_s=1.0)
        picked = pickup(url, enqueues=50)
        fleets = [
            _median_run(
                [
                    fleet(
                        url,
                        workers=n,
                        sessions=fleet_sessions,
                        partitions=8,
                        lease_s=5.0,
                        batch=100,
                    )
                    for _ in range(repeat)
                ]
            )
            for n in (1, 2, 4)
        ]
        return PostgresCost(
            available=True,
            cores=os.cpu_count() or 0,
            server_version=str(_scalar(url, "SHOW server_version")),
            commit_latency_ms=latency["median_ms"],
            worker=worker,
            fleet=fleets,
            takeover=took,
            pickup=picked,
        )


def run(
    dsn: str | None = None,
    *,
    sessions: int = 20_000,
    fleet_sessions: int = 20_000,
    repeat: int = 3,
    lease_s: float = 1.0,
    workers: tuple[int, ...] = (1, 2, 4),
    partitions: int = 8,
) -> dict[str, Any]:
    """Every figure of this module, as one dict."""
    result: dict[str, Any] = {"cores": os.cpu_count()}

    def note(key: str, value: Any) -> None:
        result[key] = value
        print(json.dumps({key: value}), file=sys.stderr, flush=True)  # progress

    with _server(dsn) as url:
        note("postgresql", _scalar(url, "SHOW server_version"))
        note("commit_latency_before", commit_latency(url))
        note(
            "one_engine_default_batch",
            one_engine(url, sessions=sessions, batch=Policy().batch_size, repeat=repeat),
        )
        note("one_engine_batch_100", one_engine(url, sessions=sessions, batch=100, repeat=repeat))
        note("one_worker_default_batch", one_worker(url, sessions=sessions, repeat=repeat))
        note("commit_latency_after", commit_latency(url))
        note("takeover_after_sigkill", takeover(url, partitions=partitions, lease_s=lease_s))
        note("enqueue_to_pickup", pickup(url, enqueues=100))
        note(
            "fleet",
            [
                _median_run(
                    [
                        fleet(
                            url,
                            workers=n,
                            sessions=fleet_sessions,
                            partitions=partitions,
                            lease_s=5.0,
                            batch=100,
                        )
                        for _ in range(repeat)
                    ]
                )
                for n in workers
            ],
        )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--dsn", default=None, help=f"a server to use (default: ${DSN_VARIABLE}, else pgserver)"
    )
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--fleet-sessions", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lease-s", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.fleet_sessions, args.repeat = 2_000, 2_000, 1
    print(
        json.dumps(
            run(
                args.dsn,
                sessions=args.sessions,
                fleet_sessions=args.fleet_sessions,
                repeat=args.repeat,
                lease_s=args.lease_s,
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
