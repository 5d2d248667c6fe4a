"""The engine's rooms: each of its concerns in a small object of its own.

:class:`~sessionfsm.Engine` keeps the hot path inline (firing a transition
and placing the session) and hands each concern to a room, as h2's
``H2Connection`` hands flow control to ``windows.py``:

=================  ==============================================================
room               what it keeps
=================  ==============================================================
``lanes.py``       :class:`Lanes`: the ready queue of each lane, the retry heap,
                   throttle stamps, the parts of split batches; which lane
                   sends next.
``batches.py``     :class:`OpenBatches`: the open batches, their deadlines, the
                   probe, and which batch ids closed (late acks).
``blame.py``       :class:`Blame`: what the relay has accepted, each session's
                   mark, since when it refuses; whether a failure was shared.
``redrive.py``     :class:`PacedRedrive`: the dead letters a paced redrive has
                   yet to revive, and its pace.
``journal.py``     :class:`Journal`: the current call's changes, handed to the
                   log, the store and the listeners in one place.
=================  ==============================================================

A room holds no reference to the engine and fires no transition: the engine
asks it and acts. Each room copies itself (``copy``), which is what makes
:meth:`Engine.clone` cheap.

:class:`Rooms` names the class of each room. You never need it to run the
engine; a test passes one (``Engine(policy, rooms=Rooms(lanes=Flawed))``) to
plant a flaw by overriding a room's public methods, as a broken table goes
in through ``Engine(runtime=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import UsageError
from .batches import OpenBatch, OpenBatches
from .blame import Blame
from .journal import Journal
from .lanes import Lanes
from .redrive import PacedRedrive

__all__ = ["Blame", "Journal", "Lanes", "OpenBatch", "OpenBatches", "PacedRedrive", "Rooms"]


@dataclass(frozen=True, slots=True)
class Rooms:
    """The class of each of the engine's rooms; each defaults to the real one.

    For tests that plant a flaw: pass a subclass overriding public methods,
    e.g. ``Rooms(lanes=BackfillSkipped)``.
    """

    lanes: type[Lanes] = Lanes
    batches: type[OpenBatches] = OpenBatches
    blame: type[Blame] = Blame
    redrive: type[PacedRedrive] = PacedRedrive
    journal: type[Journal] = Journal

    def __post_init__(self) -> None:
        for name, base in (
            ("lanes", Lanes),
            ("batches", OpenBatches),
            ("blame", Blame),
            ("redrive", PacedRedrive),
            ("journal", Journal),
        ):
            given = getattr(self, name)
            if not (isinstance(given, type) and issubclass(given, base)):
                raise UsageError(
                    f"Rooms({name}=...) must be a subclass of {base.__name__}, got {given!r}"
                )
