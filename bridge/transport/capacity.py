"""How many long lifecycle requests one bridge runs at once, whichever way they came.

A purge (a compare-and-set per ready task, up to 20,000 a request: about 200 s), the stats of every
queue of an owner, a listing of up to 1,000 parked tasks with their errors, a discard of up to 1,000
ids, and a redrive pacing itself at BRIDGE_REDRIVE_RATE may each run for seconds and hold the
bridge's Cassandra connections meanwhile. One :class:`Capacity` per bridge counts them for AMQP and
the HTTP gateway (the operator console's actions included) together: counted by the AMQP handlers
only, the gateway ran as many as its per-key bound allows (256 a key, more with more keys) beside
AMQP's, and one tenant's flood of purges took the store from every tenant of the bridge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from bridge.transport.errors import Busy

__all__ = [
    "LONG_METHODS",
    "MAX_LONG_REQUESTS",
    "MAX_PACED_REDRIVES",
    "OWNER_SHARE_DIVISOR",
    "PACED_METHOD",
    "Capacity",
]

PACED_METHOD = "redrive"  # the one lifecycle method that waits on purpose (its rate)
# Redrives one bridge paces at once. On AMQP their deliveries are acknowledged (outside the
# prefetch window). Past it a redrive is answered ``unavailable`` at once: holding its delivery
# instead would let a burst of redrives take the lifecycle consumer's every slot (each paced for
# seconds), and every extend of every owner on this bridge would wait behind them.
MAX_PACED_REDRIVES = 64
# The lifecycle methods that may run for seconds. On AMQP all lifecycle methods share one queue
# and one prefetch window: held while they ran, a few of them (two, with a prefetch of 2) stopped
# every extend, fail and cancel of every owner on this bridge, and leases of healthy work ran out.
LONG_METHODS = frozenset({"purge", "stats", "parked", "discard"})
# Long requests one bridge runs at once. Past it one is answered ``unavailable`` at once and
# nothing of it is done, as a redrive past MAX_PACED_REDRIVES: a flood of purges can take neither
# every slot nor every Cassandra connection of the bridge.
MAX_LONG_REQUESTS = 32
# One owner runs at most this share of either bound (a quarter: 8 long requests, 16 paced
# redrives), so that three others are served while it holds its share.
OWNER_SHARE_DIVISOR = 4


class Capacity:
    """The bridge's count of long lifecycle requests and paced redrives running now, in all and
    per owner: one owner (one tenant's key, or a runaway script) holding every slot answered every
    other tenant's stats, purges, listings and console pages ``unavailable`` for as long as it
    kept them (a purge of 20,000 tasks: about 200 s a slot)."""

    def __init__(self) -> None:
        self.paced_redrives = 0  # redrives being paced (MAX_PACED_REDRIVES)
        self.long_requests = 0  # purge, stats, parked, discard requests running (MAX_LONG_REQUESTS)
        self._by_owner: dict[tuple[bool, str], int] = {}  # (paced?, owner): running now

    @contextlib.contextmanager
    def slot(self, method: str, owner: str) -> Iterator[None]:
        """Run a request of ``method`` for ``owner`` in one of the bridge's slots, or raise
        :class:`Busy` (nothing of it done) when they are taken, or when the owner holds its share
        of them. Quick methods (extend, fail, cancel...) take none."""
        paced = method == PACED_METHOD
        if not paced and method not in LONG_METHODS:
            yield
            return
        total, bound = (self.paced_redrives, MAX_PACED_REDRIVES) if paced else (self.long_requests, MAX_LONG_REQUESTS)
        kind = "redrives" if paced else "purge, stats, parked and discard requests"
        if total >= bound:
            raise Busy(
                f"this bridge is already running {total} {kind} (at most {bound} at once); nothing was "
                "done: send it again when they end"
            )
        key = (paced, owner)
        share = max(1, bound // OWNER_SHARE_DIVISOR)
        if (mine := self._by_owner.get(key, 0)) >= share:
            raise Busy(
                f"this bridge is already running {mine} {kind} of this owner (at most {share} of its "
                f"{bound} at once for one owner); nothing was done: send it again when they end"
            )
        self._by_owner[key] = mine + 1
        if paced:
            self.paced_redrives += 1
        else:
            self.long_requests += 1
        try:
            yield
        finally:
            if paced:
                self.paced_redrives -= 1
            else:
                self.long_requests -= 1
            if (left := self._by_owner[key] - 1) > 0:
                self._by_owner[key] = left
            else:
                del self._by_owner[key]
