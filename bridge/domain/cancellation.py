"""Cancellations nobody asked for, told apart from the ones that stop a task.

aiormq ends a connection it finds stuck (no frame from the broker for a few heartbeats: a network
black hole, a frozen node) with ``close(CancelledError)``, and every call still pending on it (a
publisher confirm, a queue declare) then raises ``CancelledError`` in a task that nobody
cancelled. ``CancelledError`` is a ``BaseException``: the background loops that go on after any
failure (``except Exception``) ended on it, silently. The result relay was one: no result of the
fleet was re-published again until the bridge holding the duty restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class ConnectionCancelled(Exception):
    """A call cut short by its connection's close (a ``CancelledError`` not meant for this task)."""


def is_stray(exc: BaseException) -> bool:
    """A ``CancelledError`` raised in a task that is not being cancelled."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


@contextlib.contextmanager
def stray_as_failure() -> Iterator[None]:
    """Inside: a stray ``CancelledError`` becomes :class:`ConnectionCancelled`, an ordinary failure
    the caller handles as it handles the others; a real cancellation goes through untouched."""
    try:
        yield
    except asyncio.CancelledError as exc:
        if not is_stray(exc):
            raise
        raise ConnectionCancelled("cut short by its connection's close") from None


__all__ = ["ConnectionCancelled", "is_stray", "stray_as_failure"]
