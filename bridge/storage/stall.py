"""Whether Cassandra stopped answering a bridge that is asking it something.

A node that is down closes its connections, and the driver says no host is up. A node that stalls
(a long GC pause, a full disk queue, a network path that drops packets) keeps its connections
open: every statement waits out its timeout, and the bridge would go on taking requests it can
only answer ``unavailable`` seconds later, while bridges beside it that reach the store idle. The
serving gate stops consuming on either. Measured from the statements the bridge sends anyway: an
idle bridge asks nothing and is never judged stalled, and no probe is added per bridge of a fleet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def stall_after_s(timeout_s: float) -> float:
    """How long a statement may wait, with nothing answered meanwhile, before the store counts as
    stalled: half the request timeout (at least 1 s: a GC pause of a second is no stall), so that
    the bridge stops taking requests before the first of them times out."""
    return max(1.0, timeout_s / 2)


class StallWatch:
    def __init__(self, after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.after_s = after_s
        self._clock = clock
        self._pending: dict[int, float] = {}  # statements under way: started at (oldest first)
        self._serial = 0
        self._answered = clock()  # the last statement answered (a start counts as one)
        # Judged stalled, it stays so until a statement is answered: its timed-out statements
        # leave nothing pending, and the bridge would resume only to take requests that wait out
        # their timeout again. (The serving gate sends a probe meanwhile: ``ServingGate``.)
        self._latched = False

    @contextmanager
    def track(self) -> Iterator[None]:
        """Around one request to Cassandra. An error is not an answer: a timeout is what a stall
        looks like, and the store's other errors come with a host down or a bad statement."""
        self._serial += 1
        key = self._serial
        self._pending[key] = self._clock()
        try:
            yield
            self._answered = self._clock()
            self._latched = False
        finally:
            del self._pending[key]

    def stalled(self) -> bool:
        """A statement has waited longer than ``after_s`` with nothing answered for as long, and
        none has been answered since."""
        if self._latched or not self._pending:
            return self._latched
        now = self._clock()
        oldest = next(iter(self._pending.values()))
        self._latched = now - oldest > self.after_s and now - self._answered > self.after_s
        return self._latched

    def answered_within(self, seconds: float) -> bool:
        """A statement was answered less than ``seconds`` ago: the store answers, no probe needed."""
        return self._clock() - self._answered < seconds
