"""Two ways to run a declared machine: compiled, and the reference.

Why compile
-----------
A live python-statemachine instance costs about 75-99 us per event and
12-17 KB of memory on a 2-core machine; a million sessions would need
12-17 GB. So the declaration in :mod:`sessionfsm.machine` is read once,
at import, into a :class:`Table`: for every ``(state, event)`` the rows
``(guards, effects, target)`` in declaration order. Firing an event is then a
dict lookup, a few guard calls and a few effect calls on a slotted record.

The reference runtime keeps one real python-statemachine instance per record
and lets the library itself pick the transition. It is slow and exists only
so a differential test can show that the compiled table means exactly what
the declaration says.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from statemachine import StateMachine
from statemachine.exceptions import TransitionNotAllowed as _PSMNotAllowed

from .machine import LinkMachine, SessionMachine, Step

__all__ = [
    "LINK_TABLE",
    "SESSION_TABLE",
    "CompiledRuntime",
    "ReferenceRuntime",
    "Row",
    "Runtime",
    "Table",
    "compile_machine",
]

Guard = Callable[[Any, Step], bool]
Effect = Callable[[Any, Step], None]


@dataclass(frozen=True, slots=True)
class Row:
    """One declared transition, flattened."""

    event: str
    source: Hashable
    target: Hashable
    #: (guard, expected result): ``cond=`` expects True, ``unless=`` False.
    guards: tuple[tuple[Guard, bool], ...]
    effects: tuple[Effect, ...]
    internal: bool

    @property
    def guard_label(self) -> str:
        """The guard as the diagrams print it, e.g. ``exhausted`` or ``not changed``."""
        return " and ".join(
            fn.__name__ if want else f"not {fn.__name__}" for fn, want in self.guards
        )


@dataclass(frozen=True)
class Table:
    """A machine compiled to rows keyed by ``(state value, event)``."""

    name: str
    machine: type[StateMachine]
    states: tuple[Hashable, ...]
    state_ids: dict[Hashable, str]
    initial: Hashable
    events: tuple[str, ...]
    rows: tuple[Row, ...]
    index: dict[tuple[Hashable, str], tuple[Row, ...]]

    def allows(self, state: Hashable, event: str) -> bool:
        """Whether any transition is declared for this event in this state."""
        return (state, event) in self.index

    def __deepcopy__(self, memo: dict[int, Any]) -> Table:
        # A declaration never changes: a copy of an engine shares it.
        return self


def compile_machine(machine: type[StateMachine]) -> Table:
    """You pass a declared machine class; you get its flat transition table.

    Only plain callables are accepted as guards and effects, so that the
    table can call them without the library's dependency injection. A string
    callback, a validator or an entry/exit action would mean something the
    table cannot run, so it is refused here rather than silently dropped.
    """
    rows: list[Row] = []
    for state in machine.states:
        if any(not spec.is_convention for spec in (*state.enter, *state.exit)):
            raise TypeError(f"{machine.__name__}.{state.id}: entry/exit actions are not compiled")
        for transition in state.transitions:
            where = f"{machine.__name__}.{transition.event}"
            for group in (transition.validators, transition.before, transition.after):
                if _declared(group, "callback", where):
                    raise TypeError(f"{where}: only on= effects are compiled")
            guards = tuple(
                (spec.func, bool(spec.expected_value))
                for spec in _declared(transition.cond, "guard", where)
            )
            effects = tuple(spec.func for spec in _declared(transition.on, "effect", where))
            for event in transition.events:
                rows.append(
                    Row(
                        event=str(event),
                        source=state.value,
                        target=transition.target.value,
                        guards=guards,
                        effects=effects,
                        internal=bool(transition.internal),
                    )
                )
    index: dict[tuple[Hashable, str], list[Row]] = {}
    for row in rows:
        index.setdefault((row.source, row.event), []).append(row)
    initial = next(s.value for s in machine.states if s.initial)
    return Table(
        name=machine.__name__,
        machine=machine,
        states=tuple(s.value for s in machine.states),
        state_ids={s.value: s.id for s in machine.states},
        initial=initial,
        events=tuple(str(e.id) for e in machine.events),  # type: ignore[attr-defined]
        rows=tuple(rows),
        index={key: tuple(value) for key, value in index.items()},
    )


def _declared(specs: Iterable[Any], kind: str, where: str) -> list[Any]:
    """The callbacks written in the declaration, skipping naming conventions."""
    found = [spec for spec in specs if not spec.is_convention]
    for spec in found:
        if not callable(spec.func) or isinstance(spec.func, str):
            raise TypeError(f"{where}: {kind} {spec.func!r} must be a function, not a name")
    return found


SESSION_TABLE = compile_machine(SessionMachine)
LINK_TABLE = compile_machine(LinkMachine)


class Runtime(Protocol):
    """Fires one event on one record, in place."""

    table: Table

    def fire(self, record: Any, event: str, step: Step) -> Any:
        """Apply ``event``; return the new state, or None if no transition applied."""
        ...


class CompiledRuntime:
    """Runs a :class:`Table` on plain records. The default."""

    __slots__ = ("_index", "table")

    def __init__(self, table: Table) -> None:
        self.table = table
        # A two-level dict avoids building a tuple key on every event.
        nested: dict[Hashable, dict[str, tuple[Row, ...]]] = {}
        for (state, event), rows in table.index.items():
            nested.setdefault(state, {})[event] = rows
        self._index = nested

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledRuntime:
        # Stateless: a copy of an engine shares it (``Engine.clone``).
        return self

    def fire(self, record: Any, event: str, step: Step) -> Any:
        rows = self._index[record.state].get(event)
        if rows is None:
            return None
        for row in rows:
            for guard, want in row.guards:
                if bool(guard(record, step)) is not want:
                    break
            else:
                for effect in row.effects:
                    effect(record, step)
                record.state = row.target
                return row.target
        return None


class ReferenceRuntime:
    """Runs the declared class itself: one python-statemachine per record.

    About a thousand times slower than :class:`CompiledRuntime`; for the
    differential tests and the benchmark's baseline only.
    """

    def __init__(self, table: Table) -> None:
        self.table = table
        self._machines: dict[int, StateMachine] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> ReferenceRuntime:
        # The machines are keyed by the records' ids, which a copy does not
        # keep: a copy builds its own, from its own records, as they fire.
        return ReferenceRuntime(self.table)

    def __reduce__(self) -> tuple[type[ReferenceRuntime], tuple[Table]]:
        return ReferenceRuntime, (self.table,)

    def fire(self, record: Any, event: str, step: Step) -> Any:
        key = id(record)
        machine = self._machines.get(key)
        if machine is None:
            # The record must outlive this entry; the engine owns every record
            # for its whole life, so ids are never reused while we hold them.
            machine = self.table.machine(model=record, state_field="state")
            self._machines[key] = machine
        try:
            machine.send(event, step=step)
        except _PSMNotAllowed:
            return None
        return record.state

    def forget(self, record: Any) -> None:
        """Drop the instance for a record the engine no longer holds."""
        self._machines.pop(id(record), None)
