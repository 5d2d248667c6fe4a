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
shortest trace.

Reductions. The search stores each state as one int, the key of a canonical
representative, and explores the quotient graph. Each reduction below maps
a state to one whose actions are the same up to renaming and lead to the
images of the same successors (a bisimulation), and leaves every property
unchanged, so a verdict on the quotient is the verdict on the model, and
distances (shortest traces) are the same:

* epochs are renumbered by rank per partition, keeping their order. The
  lease's epoch is the partition's highest (views copy it; ``acquire`` sets
  it one higher), and actions only compare epochs for equality or add one to
  the lease's, so ranks answer every question epochs do. The space is then
  finite without bounding epochs;
* a lease that is not live forgets its last owner: ``expire``, ``heartbeat``,
  the fence and liveness 1 read the owner only of a live lease, and
  ``acquire`` overwrites it;
* workers are interchangeable (symmetry reduction; ``symmetry=False`` turns
  it off to cross-check it). Every action is defined alike for every worker
  and refers to another worker only as a lease's owner, so renaming the
  workers of a state (their statuses, their views, and the owners) renames
  its actions and successors alike. Every property is invariant under
  renaming: safety 1 asks whether the committing worker is the live owner in
  its view's epoch, a relation renaming keeps; safety 2 and liveness 2 name
  no worker; liveness 1 asks that every partition's owner runs and holds it;
  "some worker runs" and which actions count as progress do not depend on
  names. The representative sorts the workers by (status, views, the live
  leases each holds); two workers equal in all three are interchangeable, so
  it is unique per orbit, and with three workers it stores up to 3! = 6
  states as one.

The quotient's edges carry no labels. A trace is replayed from the concrete
start: each step takes the first action of the current concrete state whose
successor has the next key on the stored path. The bisimulation guarantees
one exists, so a printed trace is a run of the model itself, with its real
worker names and epochs.
"""

from __future__ import annotations

import gc
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, NamedTuple

__all__ = ["Result", "State", "View", "actions", "explore", "format_trace"]

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
    """One state of the model, as a trace shows it (real worker names and epochs)."""

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


def actions(
    state: State, *, fenced: bool = True, max_version: int = MAX_VERSION
) -> list[tuple[str, State]]:
    """The actions you can take in a state and the state each leads to: the model's
    step relation, as the search applies it."""
    return [(label, nxt) for label, nxt, _ in _successors(state, fenced, max_version)]


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


_Views = tuple[View | None, ...]  # one worker's, per partition
_STATUSES: Final = ("absent", "run", "stall", "dead")
_STATUS_CODE: Final = {name: i for i, name in enumerate(_STATUSES)}
_PENDING: Final = ("apply", "ack")


class _Codec:
    """Packs a state, reduced to its canonical representative, into one int, and back.

    The key is mixed-radix: per worker (sorted, with ``symmetry``) its status,
    its view of each partition (0: none, else epoch rank, valid, version,
    synced, prepared write) and which live leases it holds; then per
    partition the lease's epoch rank and liveness; then the row, the latest
    version, the inbox and the relay. The reductions are argued in the
    module docstring. A decoded state has epochs 0, 1, ... and owner -1 on a
    lease that is not live.
    """

    def __init__(self, workers: int, max_version: int, symmetry: bool) -> None:
        self.workers = workers
        self.symmetry = symmetry
        self.versions = max_version + 1
        #: Epoch ranks per partition: the lease's own and one per worker's view at most.
        self.epochs = workers + 1
        pending = 1 + len(_PENDING) * self.versions
        #: A view's code is 1 + rank * stride + the code of the rest of it (0: no view).
        self.stride = 2 * self.versions * 2 * pending
        self.view_radix = 1 + self.epochs * self.stride
        self.worker_radix = len(_STATUSES) * self.view_radix**PARTITIONS * 2**PARTITIONS
        self.rest_table: list[View] = []
        for code in range(self.stride):
            rest, pend = divmod(code, pending)
            valid_ver, synced = divmod(rest, 2)
            valid, ver = divmod(valid_ver, self.versions)
            kind, pver = divmod(pend - 1, self.versions)
            self.rest_table.append(
                View(0, bool(valid), ver, bool(synced), (_PENDING[kind], pver) if pend else None)
            )
        self.rest_code = {v: i for i, v in enumerate(self.rest_table)}
        # Caches; both stay small (the distinct views and workers met).
        self.encoded: dict[tuple[str, _Views, tuple[tuple[int, ...], ...]], int] = {}
        self.decoded: dict[int, tuple[str, _Views, int]] = {}

    def key(self, state: State) -> int:
        """The canonical key: equal for states equal up to epoch ranks and worker names."""
        views, lease = state.views, state.lease
        # Per partition, the epochs present in order: an epoch's rank is its index.
        ranks: list[tuple[int, ...]] = []
        for p in range(PARTITIONS):
            epochs = {lease[p][1]}
            for wv in views:
                v = wv[p]
                if v is not None:
                    epochs.add(v.epoch)
            ranks.append(tuple(sorted(epochs)))
        owns = [0] * len(views)
        for p, (owner, _, live) in enumerate(lease):
            if live:
                owns[owner] |= 1 << (PARTITIONS - 1 - p)
        codes = []
        cache, shared = self.encoded, tuple(ranks)
        for w, wv in enumerate(views):
            status = state.status[w]
            code = cache.get((status, wv, shared))
            if code is None:
                code = cache[status, wv, shared] = self._worker_code(status, wv, ranks)
            codes.append(code << PARTITIONS | owns[w])
        if self.symmetry:
            codes.sort()
        key = 0
        for code in codes:
            key = key * self.worker_radix + code
        for p, (_, epoch, live) in enumerate(lease):
            key = (key * self.epochs + ranks[p].index(epoch)) * 2 + live
        versions = self.versions
        ver, synced = state.row
        key = (key * versions + ver) * 2 + synced
        return ((key * versions + state.want) * versions + state.inbox) * versions + state.relay

    def _worker_code(self, status: str, wv: _Views, ranks: list[tuple[int, ...]]) -> int:
        code = _STATUS_CODE[status]
        for p, v in enumerate(wv):
            code *= self.view_radix
            if v is not None:
                rank = ranks[p].index(v.epoch)
                code += 1 + rank * self.stride + self.rest_code[v._replace(epoch=0)]
        return code

    def state(self, key: int) -> State:
        """The canonical state a key stands for."""
        versions = self.versions
        key, relay = divmod(key, versions)
        key, inbox = divmod(key, versions)
        key, want = divmod(key, versions)
        key, synced = divmod(key, 2)
        key, ver = divmod(key, versions)
        leases: list[tuple[int, bool]] = []
        for _ in range(PARTITIONS):
            key, live = divmod(key, 2)
            key, epoch = divmod(key, self.epochs)
            leases.append((epoch, bool(live)))
        leases.reverse()
        workers = []
        for _ in range(self.workers):
            key, code = divmod(key, self.worker_radix)
            worker = self.decoded.get(code)
            if worker is None:
                worker = self.decoded[code] = self._worker(code)
            workers.append(worker)
        workers.reverse()
        owners = [-1] * PARTITIONS
        for w, (_, _, owns) in enumerate(workers):
            for p in range(PARTITIONS):
                if owns >> (PARTITIONS - 1 - p) & 1:
                    owners[p] = w
        return State(
            status=tuple(status for status, _, _ in workers),
            lease=tuple((owners[p], e, live) for p, (e, live) in enumerate(leases)),
            views=tuple(wv for _, wv, _ in workers),
            row=(ver, bool(synced)),
            want=want,
            inbox=inbox,
            relay=relay,
        )

    def _worker(self, code: int) -> tuple[str, tuple[View | None, ...], int]:
        """(status, views, bits of the partitions whose live lease it holds)."""
        code, owns = divmod(code, 2**PARTITIONS)
        views: list[View | None] = []
        for _ in range(PARTITIONS):
            code, v = divmod(code, self.view_radix)
            if v:
                rank, rest = divmod(v - 1, self.stride)
                views.append(self.rest_table[rest]._replace(epoch=rank))
            else:
                views.append(None)
        views.reverse()
        return _STATUSES[code], tuple(views), owns


def explore(
    workers: int = 2,
    *,
    fenced: bool = True,
    max_version: int = MAX_VERSION,
    stop_after_safety: bool = False,
    symmetry: bool = True,
) -> Result:
    """Explore every reachable state of the model; see the module docstring.

    ``max_version`` bounds how many times the producer changes the session.
    ``stop_after_safety`` stops as soon as both safety properties have a
    counterexample (liveness is then not checked): for the broken variant.
    ``symmetry=False`` explores without the worker symmetry reduction (more
    states, the same verdicts): to cross-check the reduction.
    """
    # Hundreds of thousands of ints and no cycles: the cyclic collector
    # would rescan the growing state table over and over.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _Explorer(workers, fenced, max_version, symmetry).run(stop_after_safety)
    finally:
        if enabled:
            gc.enable()


_RUN: Final = 1  # some worker runs
_OWNED: Final = 2  # every partition is owned by a running worker that holds it
_DELIVERED: Final = 4  # the relay has the latest version


class _Explorer:
    """Breadth-first search over canonical keys; states are numbered in BFS order."""

    def __init__(self, workers: int, fenced: bool, max_version: int, symmetry: bool) -> None:
        self.fenced, self.max_version = fenced, max_version
        self.codec = _Codec(workers, max_version, symmetry)
        self.start = State(
            status=("run",) + ("absent",) * (workers - 1),
            lease=((-1, 0, False),) * PARTITIONS,
            views=((None,) * PARTITIONS,) * workers,
            row=(0, True),
            want=0,
            inbox=0,
            relay=0,
        )
        self.result = Result(workers=workers, fenced=fenced)

    def run(self, stop: bool) -> Result:
        codec, result = self.codec, self.result
        first = codec.key(self.start)
        ids = {first: 0}
        keys = [first]  # by number
        parent = array("i", [-1])
        flags = bytearray([_flags(self.start)])
        # The progress edges, for liveness, as two parallel arrays of numbers.
        sources, targets = array("i"), array("i")
        transitions = 0
        i = 0
        while i < len(keys):
            state = codec.state(keys[i])
            for label, raw, violated in _successors(state, self.fenced, self.max_version):
                transitions += 1
                key = codec.key(raw)
                j = ids.get(key)
                if j is None:
                    j = ids[key] = len(keys)
                    keys.append(key)
                    parent.append(i)
                    flags.append(_flags(raw))
                    if "safety 2" not in result.violations and _lost(raw):
                        result.violations["safety 2"] = self.trace(keys, parent, j)
                if violated and "safety 1" not in result.violations:
                    result.violations["safety 1"] = self.trace(keys, parent, i, last=key)
                if label.split(" ", 1)[0] not in _NOT_PROGRESS:
                    sources.append(i)
                    targets.append(j)
            i += 1
            if stop and len(result.violations) == 2:
                break
        result.states, result.transitions = len(keys), transitions
        if stop and len(result.violations) == 2:
            return result
        for name, goal in (("liveness 1", _OWNED), ("liveness 2", _DELIVERED)):
            good = _can_reach(len(keys), sources, targets, goal, flags)
            for s, f in enumerate(flags):
                if f & _RUN and not good[s]:
                    result.violations[name] = self.trace(keys, parent, s)
                    break
        return result

    def trace(
        self, keys: list[int], parent: array[int], end: int, last: int | None = None
    ) -> list[tuple[str, State]]:
        """The real actions and states from the start to ``end`` (then to ``last``
        through a safety 1 violation), replayed from the canonical path: each step
        takes the first action of the concrete state that leads to the next key."""
        path: list[int] = []
        cur = end
        while cur >= 0:
            path.append(keys[cur])
            cur = parent[cur]
        path.reverse()
        steps: list[tuple[int, bool]] = [(k, False) for k in path[1:]]
        if last is not None:
            steps.append((last, True))
        state = self.start
        out: list[tuple[str, State]] = [("start", state)]
        for key, violating in steps:
            step = next(
                (
                    (label, nxt)
                    for label, nxt, violated in _successors(state, self.fenced, self.max_version)
                    if (violated is not None or not violating) and self.codec.key(nxt) == key
                ),
                None,
            )
            if step is None:  # pragma: no cover - only if the reduction were unsound
                raise AssertionError(f"no action leads from step {len(out)} to the next state")
            out.append(step)
            state = step[1]
        return out


def _flags(s: State) -> int:
    owned = all(
        o >= 0 and live and s.status[o] == "run" and s.views[o][p] is not None
        for p, (o, _, live) in enumerate(s.lease)
    )
    return ("run" in s.status) * _RUN | owned * _OWNED | (s.relay >= s.want) * _DELIVERED


def _can_reach(
    n: int, sources: array[int], targets: array[int], goal: int, flags: bytearray
) -> bytearray:
    """Which states reach a goal state through progress edges only (1 per state)."""
    # The reversed edges in compressed rows: who leads to t is back[start[t]:start[t+1]].
    start = [0] * (n + 1)
    for t in targets:
        start[t + 1] += 1
    for t in range(n):
        start[t + 1] += start[t]
    fill = start[:-1]
    back = array("i", bytes(4 * len(sources)))
    for s, t in zip(sources, targets, strict=True):
        back[fill[t]] = s
        fill[t] += 1
    good = bytearray(1 if f & goal else 0 for f in flags)
    todo = [s for s in range(n) if good[s]]
    while todo:
        t = todo.pop()
        for k in range(start[t], start[t + 1]):
            s = back[k]
            if not good[s]:
                good[s] = 1
                todo.append(s)
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
    import time

    # Every space explored in full, liveness included, the broken variant too.
    for workers, versions in ((2, 1), (2, MAX_VERSION), (3, 1)):
        for fenced in (True, False):
            started = time.perf_counter()
            r = explore(workers, fenced=fenced, max_version=versions)
            seconds = time.perf_counter() - started
            verdict = "all properties hold" if r.ok else ", ".join(sorted(r.violations))
            print(
                f"{workers} workers, {versions} change(s), "
                f"{'fenced' if fenced else 'NO FENCING'}: "
                f"{r.states} states, {r.transitions} transitions, {seconds:.1f} s: {verdict}"
            )
            for name, trace in sorted(r.violations.items()):
                print(f"  {name}, shortest trace:")
                print("    " + format_trace(trace).replace("\n", "\n    "))
            sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    main()
