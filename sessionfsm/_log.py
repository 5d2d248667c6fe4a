"""Logging without taking over: silent until the host asks.

The library never configures logging. Each event goes to structlog's
``sessionfsm`` logger once the host has called ``structlog.configure``, and
to the stdlib ``logging.getLogger("sessionfsm")`` until then. That logger has
a ``NullHandler``, so an application that configured neither sees nothing
(no ``[info]`` lines on stdout, no "last resort" warnings on stderr), and one
that configured stdlib logging gets ``sessionfsm.deferred session_id=s1 ...``
records through its own handlers.

Every event name is namespaced (``sessionfsm.deferred``); data goes in
key=value fields. Times stay floats in the fields (seconds, on whatever
clock the engine was given); :func:`render_times` turns them into ISO-8601
UTC for people, and the stdlib route applies it itself.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, MutableMapping
from typing import Any

__all__ = ["TIME_FIELDS", "NullLogger", "format_time", "get_logger", "render_times"]

#: Fields that hold a time in seconds (wall clock in a service, simulated
#: seconds in a simulation).
TIME_FIELDS = frozenset({"retry_at", "resume_at", "now", "last", "at", "deadline", "sent_at"})

_STDLIB = logging.getLogger("sessionfsm")
_STDLIB.addHandler(logging.NullHandler())

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def format_time(at: object, *, simulated: bool = False) -> object:
    """``at`` (seconds) as ISO-8601 UTC, or as labelled simulated seconds.

    Anything that is not a number is returned unchanged.
    """
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        return at
    if simulated:
        return f"{at:.3f}s (simulated)"
    try:
        moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return at
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_times(
    *, simulated: bool = False
) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    """A structlog processor that renders :data:`TIME_FIELDS` for people."""

    def processor(
        logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in TIME_FIELDS.intersection(event_dict):
            event_dict[key] = format_time(event_dict[key], simulated=simulated)
        return event_dict

    return processor


class _Message:
    """``event key=value ...``, formatted only if a handler asks for it."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, fields: dict[str, Any]) -> None:
        self.event = event
        self.fields = fields

    def __str__(self) -> str:
        parts = [self.event]
        for key, value in self.fields.items():
            if key in TIME_FIELDS:
                value = format_time(value)
            text = str(value)
            # logfmt style: quoted only when a value would not read as one word.
            if not text or any(c.isspace() or c in "\"'=" for c in text):
                text = repr(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)


class _Logger:
    """structlog once the host configured it; stdlib logging until then."""

    __slots__ = ()

    def _emit(self, method: str, event: str, fields: dict[str, Any]) -> None:
        # Imported here, not at the top: structlog loads rich when it is
        # installed, and ``import sessionfsm`` should load neither.
        import structlog

        if structlog.is_configured():
            getattr(structlog.get_logger("sessionfsm"), method)(event, **fields)
            return
        level = _LEVELS[method]
        if _STDLIB.isEnabledFor(level):
            exc_info = fields.pop("exc_info", None)
            _STDLIB.log(
                level,
                "%s",
                _Message(event, fields),
                exc_info=exc_info,
                extra={"sessionfsm_event": event, "sessionfsm_fields": fields},
            )

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)


class NullLogger:
    """Swallows everything. The engine's fast path when logging is off."""

    def _drop(self, event: str, **kw: Any) -> None:
        return None

    debug = info = warning = error = _drop


_LOGGER = _Logger()


def get_logger(enabled: bool) -> Any:
    """The library's logger (see the module docstring), or a no-op one."""
    if not enabled:
        return NullLogger()
    return _LOGGER
