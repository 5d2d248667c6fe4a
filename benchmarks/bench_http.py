"""Batches per second through ``HttpTransport`` against raw httpx POSTs.

Both send the same batches (10 sessions of ~200-byte payloads, one POST at a
time) to one reference relay process on loopback, in the same run,
alternating rounds; the figures are medians over the rounds. The transport's
extra work is encoding the payloads, the idempotency key and decoding the
per-session answer; the raw client POSTs bodies encoded beforehand and only
reads the status. Each round uses fresh session ids, so the relay does the
same work for both (no idempotent replays).

    python -m benchmarks.bench_http [--batches 300] [--rounds 5]

Target: the transport costs at most 20 % over raw httpx (``overhead <= 0.20``).
Needs the ``http`` and ``socketio`` extras.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

#: The most the transport may add over raw httpx, as a fraction.
TARGET_OVERHEAD = 0.20


def _batches(prefix: str, count: int, size: int) -> list[Any]:
    from sessionfsm import Batch, Lane

    return [
        Batch(
            id=i,
            lane=Lane.INCREMENTAL,
            session_ids=tuple(f"{prefix}{i:05d}-{j:02d}" for j in range(size)),
            sent_at=0.0,
            deadline=1e12,
        )
        for i in range(count)
    ]


def _payload(session_id: str) -> dict[str, Any]:
    return {"id": session_id, "title": "a session", "body": "x" * 160}


async def _measure(url: str, batches: int, rounds: int, size: int) -> dict[str, Any]:
    import httpx

    from sessionfsm.transports.http import HttpTransport
    from sessionfsm.transports.wire import encode_batch, idempotency_key

    raw_rates: list[float] = []
    transport_rates: list[float] = []
    async with httpx.AsyncClient() as raw_client, httpx.AsyncClient() as client:
        transport = HttpTransport(url, _payload, client=client, log=False)
        # Warm both connections up.
        await raw_client.post(url, content=b"", timeout=10)
        await transport.send(_batches("warm", 1, size)[0])
        for r in range(rounds):
            prepared = []
            for batch in _batches(f"r{r}raw", batches, size):
                body, wire = encode_batch(batch.id, "incremental", batch.session_ids, _payload)
                prepared.append((body, idempotency_key(wire.sessions)))
            headers = {"Content-Type": "application/json"}
            start = time.perf_counter()
            for body, key in prepared:
                response = await raw_client.post(
                    url, content=body, headers={**headers, "Idempotency-Key": key}, timeout=10
                )
                if response.status_code != 200:
                    raise RuntimeError(f"the relay answered {response.status_code}")
            raw_rates.append(batches / (time.perf_counter() - start))

            mine = _batches(f"r{r}trn", batches, size)
            start = time.perf_counter()
            for batch in mine:
                result = await transport.send(batch)
                if not isinstance(result, dict) or len(result) != size:
                    raise RuntimeError(f"the relay did not accept the batch: {result!r}")
            transport_rates.append(batches / (time.perf_counter() - start))
    raw = statistics.median(raw_rates)
    through = statistics.median(transport_rates)
    return {
        "batches_per_round": batches,
        "rounds": rounds,
        "sessions_per_batch": size,
        "raw_httpx_batches_per_s": round(raw, 1),
        "http_transport_batches_per_s": round(through, 1),
        "overhead": round(raw / through - 1.0, 4),
        "target_overhead": TARGET_OVERHEAD,
    }


def run(batches: int = 300, rounds: int = 5, size: int = 10) -> dict[str, Any]:
    """Start a reference relay process, measure, stop it; return the figures."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sessionfsm.reference_relay", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout is not None else ""
        if "listening on" not in line:
            raise RuntimeError(f"the reference relay did not start: {line!r}")
        url = line.split()[-1] + "/sessions"
        return asyncio.run(_measure(url, batches, rounds, size))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="exit 1 above the target")
    args = parser.parse_args(argv)
    figures = run(args.batches, args.rounds)
    print(json.dumps(figures, indent=2))
    if args.check and figures["overhead"] > TARGET_OVERHEAD:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
