"""What a session id may be, and what a persisted state must satisfy.

Two doors, one rule each:

* :func:`check_session_id` is the rule for every session id, whatever the
  store: a non-empty ``str`` that encodes as UTF-8 (no unpaired surrogates,
  which ``os.fsdecode`` produces for non-UTF-8 file names) and is at most
  :data:`MAX_SESSION_ID_BYTES` bytes long in UTF-8. ``Engine.enqueue``
  refuses anything else with ``UsageError`` before it enters memory.
* :func:`snapshot_problems` lists every way a :class:`~sessionfsm.store.Snapshot`
  breaks the machine's invariants (numbered in :mod:`sessionfsm.machine`),
  each naming the session and the rule. A store refuses to load a snapshot
  with any (``StoreError``), and ``SqliteStore.verify()`` reports them all.
"""

from __future__ import annotations

import math
import reprlib
from collections import Counter
from typing import Final

from ._errors import UsageError
from .machine import CHARGED_REASONS, Lane, LinkRecord, LinkState, SessionRecord, SessionState
from .store import Snapshot

__all__ = ["MAX_SESSION_ID_BYTES", "check_session_id", "session_id_problem", "snapshot_problems"]

#: The longest session id, in UTF-8 bytes. An id is a key, not a payload: a
#: longer one (a whole path, a document) should be hashed by the caller.
MAX_SESSION_ID_BYTES: Final = 1024

_LANE_NAMES: Final = frozenset(lane.value for lane in Lane)
_N_COUNTS: Final = len(CHARGED_REASONS)


def session_id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid session id, or None if it is one."""
    if not isinstance(value, str):
        return f"a session id must be a str, got {type(value).__name__}"
    if not value:
        return "a session id must not be empty"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return (
            "a session id must encode as UTF-8 (it holds an unpaired surrogate; "
            "decode file names with errors='replace' or hash them)"
        )
    if size > MAX_SESSION_ID_BYTES:
        return f"a session id must be at most {MAX_SESSION_ID_BYTES} bytes in UTF-8, got {size}"
    return None


def check_session_id(value: object) -> str:
    """You pass a would-be session id; you get it back, or ``UsageError`` saying why not."""
    problem = session_id_problem(value)
    if problem is not None:
        raise UsageError(f"{problem}: {reprlib.repr(value)}")
    assert isinstance(value, str)
    return value


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_time(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def record_problems(rec: SessionRecord) -> list[str]:
    """Every invariant one persisted session record breaks (empty if none)."""
    problems: list[str] = []
    sid = rec.id
    name = reprlib.repr(sid)

    def bad(rule: str) -> None:
        problems.append(f"session {name}: {rule}")

    id_problem = session_id_problem(sid)
    if id_problem is not None:
        bad(id_problem)
    state = rec.state
    if not isinstance(state, SessionState):
        bad(f"unknown state {state!r}")
        return problems
    if not isinstance(rec.lane, Lane):
        bad(f"unknown lane {rec.lane!r}")
    counts = rec.counts
    if (
        not isinstance(counts, tuple)
        or len(counts) != _N_COUNTS
        or not all(_is_count(n) for n in counts)
    ):
        bad(f"counts must be {_N_COUNTS} integers >= 0, got {counts!r}")
        counts = (0,) * _N_COUNTS
    if not _is_count(rec.attempts):
        bad(f"attempts must be an integer >= 0, got {rec.attempts!r}")
    if type(rec.dirty) is not bool:
        bad(f"dirty must be a bool, got {rec.dirty!r}")
    if rec.retry_at is not None and not _is_time(rec.retry_at):
        bad(f"retry_at must be a finite time, got {rec.retry_at!r}")
    if (rec.retry_at is not None) != (state is SessionState.BACKOFF):
        bad(f"invariant 10: retry_at is {rec.retry_at!r} in state {state}")
    dead = state is SessionState.DEAD_LETTERED
    if dead:
        if any(counts):
            bad(f"invariant 3: dead-lettered with counts {counts!r}")
        if rec.dead_letter_reason not in CHARGED_REASONS:
            bad(f"invariant 7: dead-lettered with reason {rec.dead_letter_reason!r}")
        if not _is_time(rec.dead_lettered_at):
            bad(f"dead-lettered at {rec.dead_lettered_at!r}, not a finite time")
    elif rec.dead_letter_reason is not None or rec.dead_lettered_at is not None:
        bad(f"dead-letter reason {rec.dead_letter_reason!r} on a session in state {state}")
    if state is SessionState.SYNCED and any(counts):
        bad(f"invariant 2: synced with counts {counts!r}")
    return problems


def link_problems(link: LinkRecord) -> list[str]:
    """Every way a persisted relay link is malformed (empty if none)."""
    problems: list[str] = []
    if not isinstance(link.state, LinkState):
        problems.append(f"link: unknown state {link.state!r}")
    if not _is_count(link.failures):
        problems.append(f"link: failures must be an integer >= 0, got {link.failures!r}")
    if link.resume_at is not None and not _is_time(link.resume_at):
        problems.append(f"link: resume_at must be a finite time, got {link.resume_at!r}")
    return problems


def snapshot_problems(snapshot: Snapshot, *, limit: int | None = None) -> list[str]:
    """Every invariant the snapshot breaks, each naming the session and the rule.

    ``limit`` stops after that many problems (a load needs only the first).
    """
    problems: list[str] = []
    if snapshot.now is not None and not _is_time(snapshot.now):
        problems.append(f"engine: clock must be a finite time, got {snapshot.now!r}")
    if type(snapshot.next_batch_id) is not int or snapshot.next_batch_id < 1:
        problems.append(
            f"engine: next batch id must be an integer >= 1, got {snapshot.next_batch_id!r}"
        )
    for lane, at in snapshot.stamps.items():
        if lane not in _LANE_NAMES:
            problems.append(f"lane {lane!r}: unknown lane")
        elif at is not None and not _is_time(at):
            problems.append(f"lane {lane!r}: last batch time must be a finite time, got {at!r}")
    problems.extend(link_problems(snapshot.link))
    seen: Counter[object] = Counter()
    for rec in snapshot.sessions:
        if limit is not None and len(problems) >= limit:
            return problems[:limit]
        seen[rec.id] += 1
        if seen[rec.id] == 2:
            problems.append(f"session {reprlib.repr(rec.id)}: invariant 1: stored twice")
        problems.extend(record_problems(rec))
    return problems if limit is None else problems[:limit]
