"""Logging without taking over: get the logger lazily, never configure it.

Every event name is namespaced (``sessionfsm.deferred``); data goes in
key=value fields. Only the CLI configures structlog.
"""

from __future__ import annotations

from typing import Any


class NullLogger:
    """Swallows everything. The engine's fast path when logging is off."""

    def _drop(self, event: str, **kw: Any) -> None:
        return None

    debug = info = warning = error = _drop


def get_logger(enabled: bool) -> Any:
    """structlog's logger named ``sessionfsm``, or a no-op one."""
    if not enabled:
        return NullLogger()
    # Imported here, not at the top: structlog loads rich when it is installed,
    # and ``import sessionfsm`` should load neither until something logs.
    import structlog

    return structlog.get_logger("sessionfsm")
