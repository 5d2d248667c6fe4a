"""What checking every session on load costs: SqliteStore's load with and
without the invariant screen, on the same store, in one process.

Run: python docs/scripts/load_check_cost.py [SESSIONS]  (default 1,000,000)

It builds a store with ``benchmarks.bench.recovery_store`` (1/4 backed off,
1/4 synced, the rest queued, every 100th dead-lettered), then reads it 7 times
each way, alternating, and prints the medians and their ratio.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench import recovery_store, session_ids
from sessionfsm import SqliteStore


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "recovery.db"
        recovery_store(db, n, session_ids(n))
        plain: list[float] = []
        checked: list[float] = []
        with SqliteStore(db, readonly=True) as store:
            for _ in range(7):
                for check, times in ((False, plain), (True, checked)):
                    start = time.perf_counter()
                    store._read(lambda conn, check=check: store._load(conn, check))
                    times.append(time.perf_counter() - start)
        p, c = statistics.median(plain), statistics.median(checked)
        print(f"{n:,} sessions: load {p:.3f} s unchecked, {c:.3f} s checked, ratio {c / p:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
