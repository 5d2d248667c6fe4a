"""An exhaustive check of the fleet's ownership protocol (leases, epochs, fencing).

It explores every interleaving of a small model of :mod:`sessionfsm.fleet`:
two or three workers, two partitions, one session on partition 0, and these
actions, each atomic on the server or in one worker:

``join``       an absent worker starts;
``acquire``    a running worker takes a partition whose lease is free or
               expired: epoch + 1, and it loads (recovers) the partition;
``release``    a running owner gives a partition back (rebalancing);
``heartbeat``  a running worker whose lease was taken over, or whose local
               lease timer ran out, drops the partition;
``prepare``    a running owner that believes its lease valid decides a write
               from its memory: apply the inbox, or send the session to the
               relay (delivery happens here) and record it synced;
``commit``     the server applies a prepared write, if the fence holds
               (owner, epoch, lease live); otherwise it refuses it and the
               worker drops the partition;
``produce``    a producer changes the session (version + 1) into the inbox;
``stall``, ``resume``, ``lapse``  a worker is stopped, resumed, and its
               local lease timers run out while stopped;
``expire``     the server expires a lease, only once its holder is dead or its
               holder's own timer ran out (the clock assumption: a worker's
               timer starts when it asked, so it runs out first);
``crash``      a worker dies, losing its memory and prepared writes.

A stall may fall between ``prepare`` and ``commit``: that is the real race a
lease alone cannot close, and what fencing is for.

Checked:

* safety 1: every committed write comes from the partition's owner in the
  current epoch, so at most one worker commits to a partition per epoch;
* safety 2: no change is lost: the latest version is always in the inbox,
  in the session's row, or already delivered;
* liveness 1: from every reachable state where a worker runs, a state where
  every partition is owned by a running worker can be reached without any
  further failure;
* liveness 2: likewise, a state where the relay has the latest version.

``explore(fenced=False)`` is the planted broken variant: the server applies
prepared writes without checking the fence, and safety 1 and 2 fail with a
shortest trace. Epochs are renumbered by rank per partition, so the space is
finite without bounding them.
"""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

__all__ = ["Result", "explore", "format_trace"]

PARTITIONS: Final = 2
#: The producer changes the session at most this many times.
MAX_VERSION: Final = 2
#: Actions that are failures or outside input; liveness must hold without them.
_NOT_PROGRESS: Final = frozenset({"crash", "stall", "produce", "lapse", "join", "release"})


class View(NamedTuple):
    """A worker's belief about one partition it holds."""

    epoch: int
    valid: bool  # its local lease timer has not run out
    ver: int  # the session's version in its memory
    synced: bool
    pending: tuple[str, int] | None  # a prepared write: ("apply" | "ack", version)


class State(NamedTuple):
    status: tuple[str, ...]  # per worker: absent, run, stall, dead
    lease: tuple[tuple[int, int, bool], ...]  # per partition: owner (-1 none), epoch, live
    views: tuple[tuple[View | None, ...], ...]  # per worker, per partition
    row: tuple[int, bool]  # the session's row (partition 0): version, synced
    want: int  # the latest version produced
    inbox: int  # highest version waiting in the inbox (0: empty)
    relay: int  # highest version the relay received


@dataclass
class Result:
    """What ``explore`` found."""

    workers: int
    fenced: bool
    states: int = 0
    transitions: int = 0
    #: (property, trace) of the first violation of each property, if any.
    violations: dict[str, list[tuple[str, State]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


def _canon(state: State) -> State:
    """Renumber each partition's epochs by rank, keeping their order."""
    lease = list(state.lease)
    views = [list(v) for v in state.views]
    for p in range(PARTITIONS):
        seen = {lease[p][1]}
        for wv in views:
            if wv[p] is not None:
                seen.add(wv[p].epoch)  # type: ignore[union-attr]
        rank = {e: i for i, e in enumerate(sorted(seen))}
        owner, epoch, live = lease[p]
        lease[p] = (owner, rank[epoch], live)
        for wv in views:
            v = wv[p]
            if v is not None:
                wv[p] = v._replace(epoch=rank[v.epoch])
    return state._replace(lease=tuple(lease), views=tuple(tuple(v) for v in views))


def _set_view(state: State, w: int, p: int, view: View | None) -> State:
    views = list(state.views)
    row = list(views[w])
    row[p] = view
    views[w] = tuple(row)
    return state._replace(views=tuple(views))


def _set_lease(state: State, p: int, lease: tuple[int, int, bool]) -> State:
    leases = list(state.lease)
    leases[p] = lease
    return state._replace(lease=tuple(leases))


def _set_status(state: State, w: int, status: str) -> State:
    s = list(state.status)
    s[w] = status
    return state._replace(status=tuple(s))


def _successors(
    state: State, fenced: bool, max_version: int
) -> Iterator[tuple[str, State, str | None]]:
    """(label, next state, violated safety property or None)."""
    n = len(state.status)
    if state.want < max_version:
        yield "produce", state._replace(want=state.want + 1, inbox=state.want + 1), None
    for p in range(PARTITIONS):
        owner, epoch, live = state.lease[p]
        if live and (
            owner < 0
            or state.status[owner] == "dead"
            or (state.views[owner][p] is None or not state.views[owner][p].valid)  # type: ignore[union-attr]
        ):
            yield f"expire p{p}", _set_lease(state, p, (owner, epoch, False)), None
    for w in range(n):
        st = state.status[w]
        if st == "absent":
            yield f"join w{w}", _set_status(state, w, "run"), None
            continue
        if st == "dead":
            continue
        if st == "stall":
            yield f"resume w{w}", _set_status(state, w, "run"), None
            if any(v is not None and v.valid for v in state.views[w]):
                lapsed = tuple(
                    None if v is None else v._replace(valid=False) for v in state.views[w]
                )
                views = list(state.views)
                views[w] = lapsed
                yield f"lapse w{w}", state._replace(views=tuple(views)), None
            # A stalled worker's prepared writes may still reach the server
            # later; they are committed after ``resume``.
            yield from _crash(state, w)
            continue
        # running
        yield f"stall w{w}", _set_status(state, w, "stall"), None
        yield from _crash(state, w)
        for p in range(PARTITIONS):
            owner, epoch, live = state.lease[p]
            view = state.views[w][p]
            if view is None:
                if not live:
                    ver, synced = state.row if p == 0 else (0, True)
                    nxt = _set_lease(state, p, (w, epoch + 1, True))
                    nxt = _set_view(nxt, w, p, View(epoch + 1, True, ver, synced, None))
                    yield f"acquire w{w} p{p}", nxt, None
                continue
            if view.pending is not None:
                kind, ver = view.pending
                ok = owner == w and epoch == view.epoch and live
                if ok or not fenced:
                    yield from _commit(state, w, p, view, kind, ver, ok)
                else:
                    yield f"commit w{w} p{p} refused", _set_view(state, w, p, None), None
                continue
            # heartbeat: drop what was taken over or ran out locally.
            if not view.valid or not (owner == w and epoch == view.epoch and live):
                yield f"heartbeat w{w} drops p{p}", _set_view(state, w, p, None), None
                continue
            yield (
                f"release w{w} p{p}",
                _set_view(_set_lease(state, p, (owner, epoch, False)), w, p, None),
                None,
            )
            if p != 0:
                continue
            if state.inbox > view.ver:
                pend = view._replace(pending=("apply", state.inbox))
                yield f"prepare w{w} apply v{state.inbox}", _set_view(state, w, p, pend), None
            elif not view.synced:
                # The send reaches the relay now; the record follows.
                nxt = _set_view(state, w, p, view._replace(pending=("ack", view.ver)))
                nxt = nxt._replace(relay=max(state.relay, view.ver))
                yield f"prepare w{w} send v{view.ver}", nxt, None


def _crash(state: State, w: int) -> Iterator[tuple[str, State, str | None]]:
    nxt = _set_status(state, w, "dead")
    views = list(nxt.views)
    views[w] = (None,) * PARTITIONS
    yield f"crash w{w}", nxt._replace(views=tuple(views)), None


def _commit(
    state: State, w: int, p: int, view: View, kind: str, ver: int, ok: bool
) -> Iterator[tuple[str, State, str | None]]:
    violated = None if ok else "safety 1: a write committed by a worker that lost the partition"
    if kind == "apply":
        inbox = 0 if state.inbox <= ver else state.inbox
        nxt = state._replace(row=(ver, False), inbox=inbox)
        new_view = view._replace(ver=ver, synced=False, pending=None)
    else:
        nxt = state._replace(row=(ver, True))
        new_view = view._replace(synced=True, pending=None)
    yield f"commit w{w} p{p} {kind} v{ver}", _set_view(nxt, w, p, new_view), violated


def _lost(state: State) -> bool:
    """The latest change is nowhere: not delivered, not in the inbox, not in the row."""
    w = state.want
    if state.relay >= w or state.inbox >= w:
        return False
    ver, synced = state.row
    return not (ver >= w and not synced)


def explore(
    workers: int = 2,
    *,
    fenced: bool = True,
    max_version: int = MAX_VERSION,
    stop_after_safety: bool = False,
) -> Result:
    """Explore every reachable state of the model; see the module docstring.

    ``max_version`` bounds how many times the producer changes the session.
    ``stop_after_safety`` stops as soon as both safety properties have a
    counterexample (liveness is then not checked): for the broken variant.
    """
    # Millions of small tuples and no cycles: the cyclic collector would
    # rescan the growing state table over and over.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _explore(workers, fenced, max_version, stop_after_safety)
    finally:
        if enabled:
            gc.enable()


def _explore(workers: int, fenced: bool, max_version: int, stop: bool) -> Result:
    start = State(
        status=("run",) + ("absent",) * (workers - 1),
        lease=((-1, 0, False),) * PARTITIONS,
        views=((None,) * PARTITIONS,) * workers,
        row=(0, True),
        want=0,
        inbox=0,
        relay=0,
    )
    result = Result(workers=workers, fenced=fenced)
    parent: dict[State, tuple[State, str] | None] = {start: None}
    edges: dict[State, list[tuple[str, State]]] = {}
    queue = deque([start])

    def trace(end: State) -> list[tuple[str, State]]:
        out: list[tuple[str, State]] = []
        cur: State | None = end
        while cur is not None:
            link = parent[cur]
            out.append((link[1] if link else "start", cur))
            cur = link[0] if link else None
        return out[::-1]

    while queue:
        state = queue.popleft()
        out = edges.setdefault(state, [])
        for label, raw, violated in _successors(state, fenced, max_version):
            nxt = _canon(raw)
            result.transitions += 1
            out.append((label, nxt))
            if nxt not in parent:
                parent[nxt] = (state, label)
                queue.append(nxt)
                if violated and "safety 1" not in result.violations:
                    result.violations["safety 1"] = trace(nxt)
                if _lost(nxt) and "safety 2" not in result.violations:
                    result.violations["safety 2"] = trace(nxt)
        if stop and len(result.violations) == 2:
            result.states = len(parent)
            return result
    result.states = len(parent)

    def owned(s: State) -> bool:
        return all(
            o >= 0 and live and s.status[o] == "run" and s.views[o][p] is not None
            for p, (o, _, live) in enumerate(s.lease)
        )

    def delivered(s: State) -> bool:
        return s.relay >= s.want

    for name, goal in (("liveness 1", owned), ("liveness 2", delivered)):
        good = _can_reach(edges, goal)
        for s in parent:
            if "run" in s.status and s not in good:
                result.violations[name] = trace(s)
                break
    return result


def _can_reach(edges: dict[State, list[tuple[str, State]]], goal: Any) -> set[State]:
    """States from which a goal state is reachable through progress actions only."""
    back: dict[State, list[State]] = {}
    for s, out in edges.items():
        for label, t in out:
            if label.split(" ")[0] not in _NOT_PROGRESS:
                back.setdefault(t, []).append(s)
    good = {s for s in edges if goal(s)}
    queue = deque(good)
    while queue:
        t = queue.popleft()
        for s in back.get(t, ()):
            if s not in good:
                good.add(s)
                queue.append(s)
    return good


def format_trace(trace: list[tuple[str, State]]) -> str:
    """One line per step: the action, then who holds what."""
    lines = []
    for label, s in trace:
        leases = " ".join(
            f"p{p}:{'w' + str(o) if o >= 0 else '-'}@e{e}{'' if live else '(expired)'}"
            for p, (o, e, live) in enumerate(s.lease)
        )
        status = " ".join(f"w{i}:{st}" for i, st in enumerate(s.status))
        ver, synced = s.row
        lines.append(
            f"{label:<28} {status} | {leases} | row v{ver}{' synced' if synced else ' queued'}"
            f" want v{s.want} inbox v{s.inbox} relay v{s.relay}"
        )
    return "\n".join(lines)


def main() -> None:  # pragma: no cover - exercised through the test of explore
    import sys

    # Three workers: explore(3, max_version=1), the opt-in slow test (minutes).
    for workers, versions in ((2, MAX_VERSION),):
        for fenced in (True, False):
            r = explore(workers, fenced=fenced, max_version=versions)
            verdict = "all properties hold" if r.ok else ", ".join(sorted(r.violations))
            print(
                f"{workers} workers, {versions} change(s), "
                f"{'fenced' if fenced else 'NO FENCING'}: "
                f"{r.states} states, {r.transitions} transitions: {verdict}"
            )
            for name, trace in sorted(r.violations.items()):
                print(f"  {name}, shortest trace:")
                print("    " + format_trace(trace).replace("\n", "\n    "))
    sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    main()
