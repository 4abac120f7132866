"""Request timing as one wrapper: every consumer callback is timed and its outcome observed once."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from bridge.errors import ErrorCode
from bridge.transport.request import RequestMessage

Observer = Callable[[str, str, float], None]  # (method, outcome, seconds)
Handler = Callable[[RequestMessage], Awaitable[str]]  # returns the request's outcome
Consumer = Callable[[RequestMessage], Awaitable[None]]


def timed(method: str | Callable[[RequestMessage], str], handler: Handler, observe: Observer) -> Consumer:
    """``handler`` observed as ``(method, outcome, seconds)``; one that raises counts as ``internal``.
    ``method``: a name, or what names it from the message (the unrouted consumer's: an add taken
    there is an add, not an unknown method)."""

    async def run(message: RequestMessage) -> None:
        started = time.perf_counter()
        outcome: str = ErrorCode.INTERNAL
        try:
            outcome = await handler(message)
        finally:
            name = method if isinstance(method, str) else method(message)
            observe(name, str(outcome), time.perf_counter() - started)

    return run
