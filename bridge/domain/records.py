"""The values the queue keeps about a task, in the domain's terms (ids, milliseconds, sealed bytes).

A store (``bridge.domain.store.TaskStore``) reads and writes exactly these; how it lays them out
(Cassandra rows, datetimes, TTLs, buckets) is its own business.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from bridge.crypto import Sealed


class Lane(IntEnum):
    """The two lanes of a queue's ready index. Recovered tasks are served before fresh ones."""

    RECOVERED = 0  # re-exposed by the recovery scheduler after a lease ran out; points at the task
    FRESH = 1  # added by an engine; carries the sealed payload


LANE_RECOVERED = Lane.RECOVERED
LANE_FRESH = Lane.FRESH


@dataclass(frozen=True, slots=True)
class QueueKey:
    """One service queue of one owner (tenant)."""

    owner: str
    service: str


@dataclass(frozen=True, slots=True)
class ReadyEntry:
    """An entry of the ready index: a task that may be claimable."""

    lane: int
    bucket: int
    seq: uuid.UUID  # its place in the lane (for a fresh task, the task id)
    task_id: uuid.UUID
    epoch: int | None  # recovered lane: the epoch of the expired lease
    has_token: bool
    claimed: bool  # a hint that someone claimed it; the lease decides
    # Recovered lane: the lease was redriven and nobody claimed it since (its claim moves the task
    # from ready to in flight in the queue counts, ``bridge.domain.counting``). A hint says which;
    # an entry read from the index cannot (None), and its claim reads the lease to know.
    redriven: bool | None = None
    # Fresh lane, read from the index: when the task was added. A delayed task's id holds its due
    # time, later than this, and its counts move under its due minute (``counting.was_delayed``).
    created_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Payload:
    """What an engine added, sealed with its owner's key; clear facts bound into the ciphertexts."""

    value: Sealed
    token: Sealed | None
    traceparent: str | None
    created_at_ms: int | None
    # The task's own delivery limit (``maxDeliveries`` of its add, 1.4); None: its service's.
    max_deliveries: int | None = None
    # 1.4: 0 (default) to ``PRIORITY_MAX``; a higher one is handed out first (by hints).
    priority: int = 0
    # When the task's life ends (ms): fixed by the bridge that added it (the time in its id plus
    # that bridge's BRIDGE_TASK_TTL). Every row about the task, whoever writes it, lives until
    # then (a bridge's own TTL may differ: a setting changed pod by pod). None: not recorded (a
    # row written by an older bridge, a copy on an older hint): a writer falls back to its own TTL.
    expires_at_ms: int | None = None

    @property
    def key_id(self) -> str:
        return self.value.key_id


class LeaseState(StrEnum):
    LEASED = "leased"  # held by a worker until its deadline (then claimable again)
    DONE = "done"  # acked: completed with a result or an error
    DEAD = "dead"  # dead-lettered: its ciphertext failed authentication
    PARKED = "parked"  # delivered its limit of times without an ack (or failed past it): held aside
    CANCELLED = "cancelled"  # cancelled by the engine, or purged by an operator
    DISCARDED = "discarded"  # a parked task an operator dropped for good


# States a task never leaves (until its TTL): what cancel answers false for.
FINAL_STATES = frozenset({LeaseState.DONE, LeaseState.DEAD, LeaseState.CANCELLED, LeaseState.DISCARDED})


@dataclass(frozen=True, slots=True)
class Lease:
    """The mutable state of a task; changed only by compare-and-set on ``epoch`` (the fencing token)."""

    state: LeaseState
    epoch: int
    worker: str | None
    lease_until_ms: int | None  # may be absent from a failed compare-and-set's view of the row
    claim_id: uuid.UUID | None
    completion_id: uuid.UUID | None
    # Whether the task carries a workflow token (written by claims since 1.3; None on older rows):
    # an ack that knows there is none completes the task without reading anything first.
    has_token: bool | None = None
    # Deliveries before this epoch do not count toward the delivery limit (a redrive resets it).
    base_epoch: int = 0
    parked_at_ms: int | None = None
    park_reason: str | None = None
    last_error: Sealed | None = None  # the error of the last ``fail``, sealed with the owner's key
    completed_at_ms: int | None = None  # when it was completed, dead-lettered or cancelled
    # Claims since the last redrive that found the task's key missing: the worker never saw the
    # task, so they are an outage of the key, not deliveries (a long one would park healthy tasks).
    uncounted: int = 0
    uncounted_epoch: int | None = None  # the epoch last uncounted: a repeat for it changes nothing
    # The claims in a row that found its key missing (``KeyMissingRun``; not a lookup that failed:
    # the key server away), when the first of them was, and the run's mark: the task is parked
    # once they have gone on for BRIDGE_KEY_MISSING_PARK_AFTER_SECONDS (a key gone for good).
    key_missing: int = 0
    key_missing_since_ms: int = 0
    key_missing_mark: int | None = None
    # The last park's id (its ``completion_id`` then): kept when a discard, or an ack after a
    # redrive, writes its own completion id, so that the park's result is still owed (``names_entry``).
    park_id: uuid.UUID | None = None
    # Every park's id (``park_id`` is only the last): a park's result is still owed when the task
    # was redriven and parked again before it went out. Empty where only older bridges parked
    # (they write ``park_id`` alone).
    park_ids: frozenset[uuid.UUID] = frozenset()

    @property
    def deliveries_counted(self) -> int:
        """Deliveries that count toward the limit: this lease's claims since the last redrive,
        less those that could not hand the task out for want of its key."""
        return max(0, self.epoch - self.base_epoch - self.uncounted)

    @property
    def is_leased(self) -> bool:
        return self.state is LeaseState.LEASED

    @property
    def is_done(self) -> bool:
        return self.state is LeaseState.DONE

    def held_by(self, worker: str, epoch: int) -> bool:
        """Leased to this worker at this epoch (the deadline aside)."""
        return self.is_leased and self.epoch == epoch and self.worker == worker

    def completed_by(self, worker: str, epoch: int) -> bool:
        return self.is_done and self.epoch == epoch and self.worker == worker

    def not_claimable_before(self, now_ms: int, margin_ms: int) -> bool:
        """Still leased at this epoch and its deadline plus the skew margin has not passed."""
        return self.is_leased and self.lease_until_ms is not None and self.lease_until_ms + margin_ms > now_ms


@dataclass(frozen=True, slots=True)
class KeyMissingRun:
    """Claims of a task in a row that found its key missing, written by each such claim with its
    ``lease.uncount``. ``mark``: the lease's ``epoch - uncounted`` as that claim read it, the same
    at the next one only if no claim in between handed the task out (a claim that could not open
    it raises both; a delivery, the epoch alone) and no older bridge's redrive reset ``uncounted``:
    otherwise the next such claim starts a new run. A claim whose key lookup failed ends the run
    (``NO_KEY_MISSING_RUN``): a key server crash-looping answers "unknown key" now and then while
    it loads, for keys it has."""

    claims: int
    since_ms: int
    mark: int

    @staticmethod
    def after(lease: Lease, now_ms: int) -> KeyMissingRun:
        """The run once the claim ``lease`` was read for (held, not yet uncounted) is counted in."""
        mark = lease.epoch - lease.uncounted
        if lease.key_missing > 0 and lease.key_missing_mark == mark:
            return KeyMissingRun(lease.key_missing + 1, lease.key_missing_since_ms or now_ms, mark)
        return KeyMissingRun(1, now_ms, mark)


NO_KEY_MISSING_RUN = KeyMissingRun(0, 0, 0)


@dataclass(frozen=True, slots=True)
class CasResult:
    """The outcome of a compare-and-set on a lease (outcomes unknown at first are resolved by the store)."""

    applied: bool
    current: Lease | None  # the lease as the failed compare-and-set saw it
    # "Not applied" judged by a read after an unknown outcome, for a statement that is not sent
    # twice: its first copy may still land after the read (see ``TaskStore.park``).
    may_land_late: bool = False


@dataclass(frozen=True, slots=True)
class WorkerPointer:
    """The task a worker holds (write-ahead: written just before the claim)."""

    task_id: uuid.UUID
    epoch: int
    has_token: bool
    done: bool = False  # the worker acked this task; kept so that a retried ack is answered true
    granted_at_ms: int | None = None  # when the bridge wrote it (its clock), just before the claim


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A worker's pointer as read (None once cleared) and the stamp its next write must exceed."""

    pointer: WorkerPointer | None
    stamp: int | None  # microseconds (a Lamport stamp, see ``bridge.domain.clock.next_stamp``)


@dataclass(frozen=True, slots=True)
class ExpiryEntry:
    """A lease deadline in the recovery timer wheel."""

    lease_until_ms: int
    queue: QueueKey
    task_id: uuid.UUID
    epoch: int
    has_token: bool
    priority: int = 0  # a delayed task's due entry (epoch ``DUE_EPOCH``): its priority, for its hint


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A completion whose result is owed to the engine (written before the completing transaction)."""

    bucket: int
    queue: QueueKey
    task_id: uuid.UUID
    completion_id: uuid.UUID
    result: Sealed
    published: bool
    # Where the entry was read from: None for the shard of its task (``timeline.shard_of``), or
    # ``UNSHARDED`` for the table of bridges before 1.3 (read during a rolling upgrade).
    shard: int | None = None
    # The task's sealed token and trace context, copied here once a publish failed (the result may
    # be owed past the task's end, when its own row is gone): None until then.
    token: Sealed | None = None
    traceparent: str | None = None


UNSHARDED = -1


@dataclass(frozen=True, slots=True)
class OutboxKey:
    """Where an owed result is, without the result (a few dozen bytes): what the relay remembers
    of a bucket's owed entries, to read those again and not the whole bucket."""

    queue: QueueKey
    task_id: uuid.UUID
    completion_id: uuid.UUID
    shard: int | None = None

    @staticmethod
    def of(entry: OutboxEntry) -> OutboxKey:
        return OutboxKey(entry.queue, entry.task_id, entry.completion_id, entry.shard)


PRIORITY_MAX = 3  # task priorities 0..3 (hints carry them; recovered tasks still come first)


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """What an add asked for its task beyond its value (1.4): read when a lease runs out or a
    delayed task comes due, never on the task's usual path."""

    max_deliveries: int | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class TaskAbout:
    """What an operator's look at a task reads of its row: never its value or token (a lookup of a
    1 MiB task shipped the value's ciphertext to be thrown away, over and over: a review)."""

    created_at_ms: int | None
    has_token: bool
    max_deliveries: int | None = None
    priority: int = 0


# The epoch of a delayed task's due entry in the timer wheel: not a lease deadline, the moment a
# never-claimed task becomes claimable (the scheduler announces it then).
DUE_EPOCH = 0
# The worker of a lease given back by ``fail``: nobody holds it while it waits out its backoff.
NO_WORKER = ""


@dataclass(frozen=True, slots=True)
class ParkedEntry:
    """The parked-task index of a queue (verified against the lease when read)."""

    task_id: uuid.UUID
    epoch: int
    parked_at_ms: int
    reason: str
    has_token: bool
    # The id of the park that wrote the row (its ``park_id``): epochs are not unique to a park (a
    # scheduler's park refused by a late extend, then the worker's ``fail`` parking at the same
    # epoch), so a refused park takes back only the row that names it. None: a row written by a
    # bridge before the column.
    park_id: uuid.UUID | None = None
    # Where the row was read: ``parks`` (one row per park, taken back by its key) or ``parked``
    # (one row per task, shared by its parks, which bridges before ``parks`` read and write).
    in_parks: bool = False


__all__ = [
    "DUE_EPOCH",
    "FINAL_STATES",
    "LANE_FRESH",
    "LANE_RECOVERED",
    "NO_WORKER",
    "PRIORITY_MAX",
    "UNSHARDED",
    "CasResult",
    "ExpiryEntry",
    "Lane",
    "Lease",
    "LeaseState",
    "OutboxEntry",
    "ParkedEntry",
    "Payload",
    "QueueKey",
    "ReadyEntry",
    "TaskOptions",
    "WorkerPointer",
    "WorkerRow",
]
