"""The deadline of the request being served, for the store's second tries.

A conditional write whose outcome is unknown is settled by a second statement (the same write
again, or a SERIAL read: ``CassandraTaskStore``). With a stalled node each statement takes the
whole request timeout, and two of them outlast the caller (by default 2 x 5 s against a client's
10 s): it gives up, and the bridge works on for nobody. The transport sets the caller's deadline
here (``x-deadline``); a second try that could not end before it is not sent, and the caller is
answered ``unavailable`` (its outcome unknown, as for any timed-out write) while it still listens.
"""

from __future__ import annotations

from contextvars import ContextVar

# Milliseconds since the epoch, the caller's clock; None: no deadline (the caller waits).
request_deadline_ms: ContextVar[int | None] = ContextVar("request_deadline_ms", default=None)
