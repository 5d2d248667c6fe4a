"""Fault injection: SIGKILL a process that runs an engine on a SqliteStore.

A child process (forked, so it starts in milliseconds) runs a deterministic
sync loop on ``SqliteStore`` against a fake relay whose answer depends only on
the session and its state. The parent kills it at random points: after a
random delay, or from inside SQLite at a random statement, so many kills land
between ``BEGIN`` and ``COMMIT``. After every kill the parent opens the file
as the next process would and compares it with what it saw last time:

* every enqueued session is still there, in exactly one valid state, and its
  history ends in that state;
* no dead letter came back to life unless the history shows a redrive;
* no counter went backwards unless the history shows a success or a redrive
  (or the session was dead-lettered, which clears its counts, invariant 3).

Then the next child starts from that file. When one finally runs to the end,
every session must be synced or dead-lettered for the reason its relay gives.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from sessionfsm import (
    Engine,
    Fixed,
    Lane,
    NotAStore,
    Policy,
    ReasonPolicy,
    SessionState,
    SqliteStore,
    StoreReadOnly,
    acks,
)
from sessionfsm.engine import Batch
from sessionfsm.machine import CHARGED_REASONS, SessionRecord
from sessionfsm.store import Change

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

DEAD = SessionState.DEAD_LETTERED

POLICY = Policy(
    batch_size=4,
    incremental_interval_s=0.0,
    backfill_batch_size=3,
    max_in_flight=2,
    ack_timeout_s=30.0,
    tick_interval_s=1.0,
    ack_timeout=ReasonPolicy(threshold=3, backoff=Fixed(2.0)),
    rate_limited=ReasonPolicy(threshold=5, backoff=Fixed(2.0)),
    payload_too_large=ReasonPolicy(threshold=1, retryable=False),
    # Short, so that a session refused alone with nothing else left to send
    # (no evidence either way) is charged within the run.
    max_relay_refusal_s=20.0,
)

#: After this (engine clock), the relay accepts kind-5 sessions, and every
#: process schedules a paced redrive of the PayloadTooLarge dead letters.
FIX_AT = 30.0

#: What the relay answers each kind of session, and where each kind ends.
KINDS = {
    0: "always Ok",
    1: "always PayloadTooLarge",
    2: "always RateLimited",
    3: "always AckTimeout",
    4: "RateLimited on its first send only",
    5: "PayloadTooLarge until FIX_AT, then Ok",
}
FINAL: dict[int, tuple[SessionState, str | None]] = {
    0: (SessionState.SYNCED, None),
    1: (DEAD, "PayloadTooLarge"),
    2: (DEAD, "RateLimited"),
    3: (DEAD, "AckTimeout"),
    4: (SessionState.SYNCED, None),
    5: (SessionState.SYNCED, None),
}
#: The only reasons each kind may ever be dead-lettered for.
LEGIT_DEATHS: dict[int, set[str]] = {
    1: {"PayloadTooLarge"},
    2: {"RateLimited"},
    3: {"AckTimeout"},
    5: {"PayloadTooLarge"},
}


def _kind(session_id: str) -> int:
    return int(session_id[1:]) % len(KINDS)


def _answer(engine: Engine, batch: Batch, now: float) -> acks.Ack | dict[str, acks.Ack]:
    """The fake relay: a function of the batch, each session and its state."""
    if batch.id % 5 == 0:
        return acks.RelayUnavailable()  # a flap: never charged to anyone
    answers: dict[str, acks.Ack] = {}
    for sid in batch.session_ids:
        kind = _kind(sid)
        if kind == 1 or (kind == 5 and now < FIX_AT):
            answers[sid] = acks.PayloadTooLarge()
        elif kind == 2 or (kind == 4 and engine.session(sid).attempts == 1):
            answers[sid] = acks.RateLimited()
        elif kind == 3:
            answers[sid] = acks.AckTimeout()
        else:
            answers[sid] = acks.Ok()
    return answers


def _child(path: Path, session_ids: list[str], kill_at_statement: int) -> int:
    """One process's life: recover, enqueue what is missing, sync until done."""
    store = SqliteStore(path, history_retention=None)
    if kill_at_statement:
        statements = 0

        def trace(_sql: str) -> None:
            nonlocal statements
            statements += 1
            if statements >= kill_at_statement:
                os.kill(os.getpid(), signal.SIGKILL)

        # Fault injection reaches into the store on purpose: SQLite calls this
        # before every statement, inside transactions as well as between them.
        store._conn.set_trace_callback(trace)  # type: ignore[union-attr]
    engine = Engine(POLICY, store=store, rng=random.Random(0), log=False)
    now = engine.now
    for i, sid in enumerate(session_ids):
        if sid not in engine:
            engine.enqueue(sid, lane=Lane.BACKFILL if i % 4 == 3 else Lane.INCREMENTAL, now=now)
    scheduled = False
    for _ in range(100_000):
        if now >= FIX_AT and not scheduled:
            engine.schedule_redrive(reason="PayloadTooLarge", per_tick=2)
            scheduled = True
        if scheduled and engine.idle():
            store.close()
            return 0
        for batch in engine.tick(now):
            engine.on_ack(batch.id, _answer(engine, batch, now), now + 0.25)
        now += 1.0
    return 2  # never idle: a bug


def _run_child(path: Path, session_ids: list[str], rng: random.Random) -> bool:
    """Fork a child and kill it at a random point; True if it was killed."""
    # A whole run from an empty file is about 900 statements and 20 ms here;
    # later runs have less left to do, so more of them finish.
    timed = rng.random() < 0.3
    kill_at = 0 if timed else rng.randint(1, 900)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns to pytest
        code = 1
        try:
            code = _child(path, session_ids, kill_at)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    if timed:
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(pid, signal.SIGKILL)  # harmless if it already exited (a zombie)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WIFEXITED(status), status
    assert os.WEXITSTATUS(status) == 0, f"child failed with {os.WEXITSTATUS(status)}"
    return False


@dataclass
class Seen:
    record: SessionRecord
    history: list[Change]


def _observe(path: Path) -> dict[str, Seen] | None:
    """The database as the next process will find it; None if none was made yet."""
    if not path.exists():
        return None
    try:
        store = SqliteStore(path, readonly=True)
    except NotAStore:
        return None  # killed before the schema was committed: an empty file
    except StoreReadOnly:
        # Killed while SQLite switched the new file to WAL, which it does
        # through a rollback journal: nothing was committed, and only the next
        # writer can roll the journal back. The caller checks nothing was seen.
        return None
    with store:
        snapshot = store.load()
        if snapshot is None:
            return {}
        ids = [rec.id for rec in snapshot.sessions]
        assert len(ids) == len(set(ids)), "a session is stored twice"
        return {rec.id: Seen(rec, store.history(rec.id)) for rec in snapshot.sessions}


def _check(before: dict[str, Seen], after: dict[str, Seen]) -> None:
    """Everything the file may and may not have done between two observations."""
    assert before.keys() <= after.keys(), f"lost {sorted(before.keys() - after.keys())}"
    for sid, seen in after.items():
        rec, history = seen.record, seen.history
        kind = _kind(sid)
        # Exactly one valid state, and the audit trail agrees with it.
        assert rec.state in SessionState
        assert history, f"{sid} has no history"
        assert history[0].event == "enqueued"
        assert history[-1].target == rec.state, f"{sid}: history ends in {history[-1].target}"
        assert (rec.retry_at is not None) == (rec.state is SessionState.BACKOFF), sid
        if rec.state is DEAD:
            assert not any(rec.counts), f"{sid} dead with counts {rec.counts}"
            assert rec.dead_letter_reason in LEGIT_DEATHS.get(kind, set()), (sid, rec)
        else:
            assert rec.dead_letter_reason is None, sid
        old = before.get(sid)
        if old is None:
            continue
        assert history[: len(old.history)] == old.history, f"{sid}: history rewritten"
        new = history[len(old.history) :]
        events = {c.event for c in new}
        reset = bool(events & {"acked", "redriven"})
        if old.record.state is DEAD and rec.state is not DEAD:
            assert "redriven" in events, f"{sid} came back from the dead without a redrive"
        if rec.attempts < old.record.attempts:
            assert reset, f"{sid}: attempts {old.record.attempts} -> {rec.attempts}"
        for i, reason in enumerate(CHARGED_REASONS):
            was, now = old.record.counts[i], rec.counts[i]
            if now < was:
                assert reset or rec.state is DEAD, f"{sid}: {reason} count {was} -> {now}"
            elif not reset:
                # A count only grows by one per ack of that reason (invariant 10).
                assert now - was <= sum(c.reason == reason for c in new), (sid, reason)


def _torture(tmp_path: Path, kills_wanted: int, sessions: int, seed: int) -> None:
    rng = random.Random(seed)
    session_ids = [f"s{i}" for i in range(sessions)]
    kills = jobs = recovered = 0
    while kills < kills_wanted:
        jobs += 1
        path = tmp_path / f"job{jobs}.db"
        seen: dict[str, Seen] = {}
        for _attempt in range(1_000):
            killed = _run_child(path, session_ids, rng)
            now = _observe(path)
            if now is None:
                assert killed
                assert not seen
                continue
            _check(seen, now)
            seen = now
            if not killed:
                break
            kills += 1
        else:
            pytest.fail(f"job {jobs} never finished (seed {seed})")
        assert sorted(seen) == sorted(session_ids)
        for sid, s in seen.items():
            assert (s.record.state, s.record.dead_letter_reason) == FINAL[_kind(sid)], (
                sid,
                KINDS[_kind(sid)],
                s.record,
            )
            recovered += sum(c.event == "recovered" for c in s.history)
    # The kills really caught batches in flight, and the engine re-sent them.
    assert recovered > 0


def test_sigkill_at_random_points_loses_nothing(tmp_path: Path) -> None:
    """Killed 60 times at random points, the file always holds a consistent
    engine, and the last run ends every session where its relay sends it."""
    seed = int(os.environ.get("SESSIONFSM_CRASH_SEED", "20261123"))
    _torture(tmp_path, kills_wanted=60, sessions=36, seed=seed)


@pytest.mark.slow
def test_sigkill_many_more_times_loses_nothing(tmp_path: Path) -> None:
    """The same with 600 kills, more sessions and a fresh seed each run."""
    seed = random.SystemRandom().randrange(2**32)
    print(f"crash seed {seed}", file=sys.stderr)
    _torture(tmp_path, kills_wanted=600, sessions=72, seed=seed)


def test_enqueue_many_is_all_or_nothing_under_sigkill(tmp_path: Path) -> None:
    """Killed at any statement of its save, enqueue_many leaves none or all of its sessions."""
    ids = [f"bulk-{i}" for i in range(50)]
    outcomes = set()
    kill_at = 1
    while (False, 1 + len(ids)) not in outcomes:
        assert kill_at < 100_000, "the save never finished"
        kill_at = kill_at + 1 + kill_at // 3
        path = tmp_path / f"bulk{kill_at}.db"
        with SqliteStore(path) as store:
            Engine(POLICY, store=store, log=False).enqueue("before", now=0.0)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                store = SqliteStore(path)
                engine = Engine(POLICY, store=store, log=False)
                statements = 0

                def trace(_sql: str, kill_at: int = kill_at) -> None:
                    nonlocal statements
                    statements += 1
                    if statements >= kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)

                store._conn.set_trace_callback(trace)  # type: ignore[union-attr]
                engine.enqueue_many(ids, now=1.0)
                store._conn.set_trace_callback(None)  # type: ignore[union-attr]
                engine.close()
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        assert killed or os.WEXITSTATUS(status) == 0
        with SqliteStore(path, readonly=True) as reader:
            total = sum(reader.sessions_by_state().values())
        assert total in (1, 1 + len(ids)), (kill_at, total)
        outcomes.add((killed, total))
    # Kills inside the save lost all of it; the run that was not killed kept all.
    assert (True, 1) in outcomes
