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

__all__ = ["LONG_METHODS", "MAX_LONG_REQUESTS", "MAX_PACED_REDRIVES", "PACED_METHOD", "Capacity"]

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


class Capacity:
    """The bridge's count of long lifecycle requests and paced redrives running now."""

    def __init__(self) -> None:
        self.paced_redrives = 0  # redrives being paced (MAX_PACED_REDRIVES)
        self.long_requests = 0  # purge, stats, parked, discard requests running (MAX_LONG_REQUESTS)

    @contextlib.contextmanager
    def slot(self, method: str) -> Iterator[None]:
        """Run a request of ``method`` in one of the bridge's slots, or raise :class:`Busy` (nothing
        of it done) when they are taken. Quick methods (extend, fail, cancel...) take none."""
        if method == PACED_METHOD:
            if self.paced_redrives >= MAX_PACED_REDRIVES:
                raise Busy(
                    f"this bridge is already pacing {self.paced_redrives} redrives (at most "
                    f"{MAX_PACED_REDRIVES} at once); nothing was redriven: send it again when they end"
                )
            self.paced_redrives += 1
            try:
                yield
            finally:
                self.paced_redrives -= 1
        elif method in LONG_METHODS:
            if self.long_requests >= MAX_LONG_REQUESTS:
                raise Busy(
                    f"this bridge is already running {self.long_requests} purge, stats, parked and discard "
                    f"requests (at most {MAX_LONG_REQUESTS} at once); nothing was done: send it again when they end"
                )
            self.long_requests += 1
            try:
                yield
            finally:
                self.long_requests -= 1
        else:
            yield
