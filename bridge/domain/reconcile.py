"""When a fetch may scan the ready index instead of waiting for hints.

With hints off every fetch scans (the dispatcher), as before 1.2. With hints on, a scan is the
safety net for hints that were lost (a crash between an add's write and its hint, a broker
restart): it runs only when a fetch found no hint, takes only entries older than ``grace_ms``
(a younger one has its hint on the way, and taking it would make that hint's claim fail), and
after a scan of a queue found nothing, this bridge does not scan that queue again for
``interval_ms``, unless an *alarm* says hints may have been lost (the broker connection was
restored, a hint could not be published): then every queue is scanned again at its next fetch.
So a fleet of idle bridges polled by idle workers costs the store about one small scan per queue
per bridge per interval, whatever the number of workers, and a backlog whose hints were lost
drains at full speed (every fetch scans while scans find tasks). The losses no alarm reports, a
bridge killed between an add's write and its hint, or between taking a hint for a waiting fetch
(acknowledged as it is handed over: ``bridge.transport.hints``) and deciding its claim, are
found within grace + interval of a fetch that finds no hint.

An alarm also lifts the grace for what was placed before it: those hints may be the lost ones
(an add whose hint publish failed has already been answered), so a fetch right after the alarm
takes them instead of answering null while they sit in the store. A hint still on its way for
one of them makes its claim fail, a cost paid once per alarm.
"""

from __future__ import annotations

from collections import OrderedDict

from bridge.domain.records import QueueKey

NO_CUTOFF = 2**62


class Reconciliation:
    def __init__(self, *, grace_ms: int | None, interval_ms: int, max_queues: int = 10_000) -> None:
        self.grace_ms = grace_ms  # None: hints are off, every entry may be scanned and taken
        self.interval_ms = interval_ms
        self.max_queues = max_queues
        self._quiet_until: OrderedDict[QueueKey, int] = OrderedDict()
        self._alarm_ms = 0  # the last alarm: entries placed before it are scanned without grace
        self._queue_alarms: OrderedDict[QueueKey, int] = OrderedDict()  # the same, for one queue
        self._swept: OrderedDict[QueueKey, int] = OrderedDict()  # when a fetch last swept the queue
        self._since: int | None = None  # the first sweep asked about: this bridge's start, nearly

    @classmethod
    def scan_always(cls) -> Reconciliation:
        return cls(grace_ms=None, interval_ms=0)

    def due(self, q: QueueKey, now_ms: int) -> bool:
        return now_ms >= self._quiet_until.get(q, 0)

    def sweep_due(self, q: QueueKey, now_ms: int) -> bool:
        """Whether a fetch that may find hints scans ``q`` first: once an interval, and after an
        alarm (hints its queue had may be lost). A queue first seen in this bridge's first interval
        waits an interval (a started bridge does not sweep every queue at once; their first fetches
        take hints, in priority order; one that finds none scans as ever). Later, a queue not known
        here is swept at once: it may be one forgotten (``max_queues``, the least recently used
        first), and one forgotten between its fetches on this bridge (more queues than the bound, a
        queue fetched seldom here) was never swept."""
        if self.grace_ms is None or self.interval_ms <= 0:
            return False
        if self._since is None:
            self._since = now_ms
        last = self._swept.get(q)
        if last is None:
            self._note_swept(q, now_ms)
            return now_ms - self._since >= self.interval_ms
        return last < self._alarm_at(q) or now_ms - last >= self.interval_ms

    def swept(self, q: QueueKey, now_ms: int, *, found: bool) -> None:
        """A sweep ran. After an alarm, sweeps go on while they find tasks (the backlog from before
        the alarm, hintless, is served first); otherwise the next one is an interval away."""
        last = self._swept.get(q, 0)
        if found and last < self._alarm_at(q):
            return
        self._note_swept(q, now_ms)

    def _alarm_at(self, q: QueueKey) -> int:
        return max(self._alarm_ms, self._queue_alarms.get(q, 0))

    def _note_swept(self, q: QueueKey, now_ms: int) -> None:
        self._swept[q] = now_ms
        self._swept.move_to_end(q)
        while len(self._swept) > self.max_queues:
            self._swept.popitem(last=False)

    def cutoff_ms(self, now_ms: int, q: QueueKey | None = None) -> int:
        """Entries (of ``q``) placed after this moment are left to their hints."""
        if self.grace_ms is None:
            return NO_CUTOFF
        return max(now_ms - self.grace_ms, self._alarm_ms, self._queue_alarms.get(q, 0) if q is not None else 0)

    def alarm(self, now_ms: int) -> None:
        """Hints may have been lost until now: scan every queue again at its next fetch, taking
        what was placed before this moment without waiting for the grace."""
        self._alarm_ms = max(self._alarm_ms, now_ms)
        self._quiet_until.clear()

    def alarm_queue(self, q: QueueKey, now_ms: int) -> None:
        """The hints of ``q`` alone may have been lost until now (its hint queue cannot be used: the
        node holding it is down): ``q`` is scanned at its next fetch, without the grace for what
        was placed before this moment. Every other queue keeps its quiet interval: with the
        bridge-wide alarm, one queue's unusable hint queue (its waiting fetches raise it every
        second) made every fetch of every queue of the bridge scan, and claim brand-new tasks
        whose hints other bridges' waiting fetches were being handed."""
        self._queue_alarms[q] = max(self._queue_alarms.get(q, 0), now_ms)
        self._queue_alarms.move_to_end(q)
        while len(self._queue_alarms) > self.max_queues:
            self._queue_alarms.popitem(last=False)
        self._quiet_until.pop(q, None)

    def found(self, q: QueueKey) -> None:
        self._quiet_until.pop(q, None)

    def found_nothing(self, q: QueueKey, now_ms: int) -> None:
        if self.interval_ms <= 0:
            return
        self._quiet_until[q] = now_ms + self.interval_ms
        self._quiet_until.move_to_end(q)
        while len(self._quiet_until) > self.max_queues:
            self._quiet_until.popitem(last=False)
