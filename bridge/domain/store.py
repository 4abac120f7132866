"""The store port: everything the queue asks of durable storage, in the domain's terms.

Times are milliseconds since the Unix epoch on the bridge's clock; ids are time UUIDs
(``bridge.domain.timeline``); values are the records of ``bridge.domain.records``. A store owns
its layout: datetimes, row lifetimes (every row about a task ends with the task's own life, fixed
when it was added: ``Payload.expires_at_ms``), index
bookkeeping, the resolution of compare-and-set outcomes that were unknown at first (a timed-out
Paxos round), and the translation of its driver's failures into ``Unavailable``.

Two adapters implement it: ``bridge.storage.repository.CassandraTaskStore`` (production) and
``bridge.storage.memory.MemoryTaskStore`` (tests; same rules, a controllable clock).

What the queue's correctness rests on, and each adapter must provide:
- the compare-and-set operations on a lease (``claim_new``, ``claim_expired``, ``extend``,
  ``complete``, ``kill``) are linearizable per task, and their result says whether they applied;
- a worker row write is ordered by its ``stamp`` (a greater stamp wins, whatever the arrival order);
- cursors are monotonic (the greatest position written wins);
- reads of the ready index return entries of one bucket in ``seq`` order.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from bridge.crypto import Sealed
from bridge.domain.records import (
    CasResult,
    ExpiryEntry,
    KeyMissingRun,
    Lease,
    LeaseState,
    OutboxEntry,
    OutboxKey,
    ParkedEntry,
    Payload,
    QueueKey,
    ReadyEntry,
    TaskAbout,
    TaskOptions,
    WorkerPointer,
    WorkerRow,
)


class TaskStore(Protocol):
    # -- tasks -------------------------------------------------------------------------------
    async def store_task(
        self, q: QueueKey, task_id: uuid.UUID, payload: Payload, *, message_id: str | None = None
    ) -> None:
        """Index the task's bucket, then write the task (fresh lane). Idempotent.

        ``message_id``: also record message_id -> task_id, unconditionally (a plain write, in the
        same request where the store can): only for a message no other copy of can exist yet."""

    async def enter_again(self, q: QueueKey, task_id: uuid.UUID, seq: uuid.UUID, payload: Payload) -> None:
        """A second entry of a stored task in the fresh lane, at ``seq`` (a time uuid of now), as
        a scan reads entries (its value stays in the task's own row): a task whose own entry may
        have landed behind where the scans' positions moved on (``WorkQueue._enter_again``)."""

    async def task_exists(self, q: QueueKey, task_id: uuid.UUID) -> bool: ...

    async def task_options(self, q: QueueKey, task_id: uuid.UUID) -> TaskOptions:
        """The task's own delivery limit and priority (defaults if it set none or is gone)."""

    async def task_about(self, q: QueueKey, task_id: uuid.UUID) -> TaskAbout | None:
        """The task's row without its value or token (None if it is gone): for operators."""

    async def stored_of(self, q: QueueKey, task_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these tasks' rows are stored (a delayed task's due entry is filed before its
        row): a few requests for many tasks, not one each."""

    async def reindex_task(self, q: QueueKey, task_id: uuid.UUID) -> None:
        """Index the task's bucket again (an add that died between its index and task writes)."""

    async def payload(self, q: QueueKey, task_id: uuid.UUID) -> Payload | None:
        """The task's sealed payload; None once the task has expired."""

    async def record_message_id(self, q: QueueKey, message_id: str, task_id: uuid.UUID) -> uuid.UUID | None:
        """Record message_id -> task_id if absent. None when recorded, else the task id already there."""

    async def replace_message_id(self, q: QueueKey, message_id: str, old: uuid.UUID, new: uuid.UUID) -> bool: ...

    async def message_id_recorded_at(self, q: QueueKey, message_id: str) -> int | None:
        """When the message_id's record was last written (ms since the epoch); None if it has none."""

    async def message_id_task(self, q: QueueKey, message_id: str) -> uuid.UUID | None:
        """The task the message_id's record names, read plainly (no LWT); None if it has none."""

    # -- the ready index ---------------------------------------------------------------------
    async def cursor(self, q: QueueKey, lane: int) -> tuple[int, uuid.UUID] | None:
        """The greatest (bucket, seq) position ever advanced to, if any."""

    async def advance_cursor(self, q: QueueKey, lane: int, bucket: int, seq: uuid.UUID) -> None: ...

    async def buckets_from(self, q: QueueKey, lane: int, bucket: int, limit: int) -> list[int]:
        """Indexed buckets of the lane at or after ``bucket``, ascending."""

    async def scan(self, q: QueueKey, lane: int, bucket: int, after: uuid.UUID | None, limit: int) -> list[ReadyEntry]:
        """Entries of one bucket after ``after`` (all if None), in seq order."""

    async def mark_claimed(self, q: QueueKey, entry: ReadyEntry, *, expires_at_ms: int | None = None) -> None:
        """A hint for scans: the entry's task was claimed. ``expires_at_ms``: when the task's life
        ends, where the caller knows it (its payload says); the store knows or guesses it otherwise."""

    async def expose_recovered(
        self, q: QueueKey, bucket: int, seq: uuid.UUID, task_id: uuid.UUID, epoch: int, has_token: bool
    ) -> None:
        """Index the bucket, then write a recovered-lane entry for an expired lease. Idempotent."""

    # -- leases: compare-and-set only ------------------------------------------------------------
    async def lease(self, q: QueueKey, task_id: uuid.UUID, *, serial: bool = True) -> Lease | None:
        """The task's lease; ``serial`` also completes any compare-and-set in flight first."""

    async def leases_of(self, q: QueueKey, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Lease]:
        """The leases of these tasks of one queue (not serial), in one request; absent ones left out.
        Without their last errors (``last_error`` is None): read those with :meth:`errors_of`."""

    async def errors_of(self, q: QueueKey, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Sealed]:
        """The last fail's error of these tasks of one queue, in one request; tasks without one left out."""

    async def claim_new(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        worker: str,
        until_ms: int,
        claim_id: uuid.UUID,
        *,
        has_token: bool | None = None,
        expires_at_ms: int | None = None,
    ) -> CasResult:
        """Lease a never-claimed task at epoch 1 (recording whether it carries a token, and when its
        life ends if known: every later write of the lease, by any bridge, keeps that life)."""

    async def claim_expired(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        expected_epoch: int,
        worker: str,
        until_ms: int,
        expired_before_ms: int,
        claim_id: uuid.UUID,
        *,
        has_token: bool | None = None,
        expires_at_ms: int | None = None,
    ) -> CasResult:
        """Lease at ``expected_epoch + 1`` a task still leased at ``expected_epoch`` whose deadline is
        at or before ``expired_before_ms`` (``expires_at_ms`` as for :meth:`claim_new`)."""

    async def extend(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        epoch: int,
        worker: str,
        until_ms: int,
        *,
        shorten_from_ms: int | None = None,
    ) -> CasResult:
        """Move the deadline of a lease still held by ``worker`` at ``epoch`` to ``until_ms``: only
        to a deadline at or after the lease's own; with ``shorten_from_ms``, to an earlier one,
        only while the lease still ends at ``shorten_from_ms`` (a refusal reports the lease's
        deadline). A shorter lease's deadline is not in the timer wheel: its caller files it first,
        then shortens (``lifecycle.renew``)."""

    async def complete(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        epoch: int,
        worker: str,
        now_ms: int,
        completion_id: uuid.UUID,
        *,
        tokenless: bool = False,
    ) -> CasResult:
        """Mark done a lease still held by ``worker`` at ``epoch`` (with ``tokenless``: only if its
        lease records that the task carries no token; a refusal then reports ``has_token``)."""

    async def kill(
        self, q: QueueKey, task_id: uuid.UUID, epoch: int, worker: str, now_ms: int, kill_id: uuid.UUID
    ) -> bool:
        """Dead-letter a leased task that can never be delivered (kept until its TTL). ``kill_id``
        becomes the lease's ``completion_id``: the relay publishes the engine's result written
        ahead under it (``condemn``)."""

    async def uncount(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        read: Lease,
        worker: str,
        *,
        until_ms: int | None = None,
        missing: KeyMissingRun | None = None,
    ) -> bool:
        """The claim at ``read.epoch`` (still held by ``worker``, at the deadline ``read`` shows;
        ``read`` is a SERIAL read) could not open the task: it does not count toward the delivery
        limit. Whether it applied (once per epoch). The lease is held by nobody from then on, until
        its deadline, or until ``until_ms`` if given (claimable after it). ``missing``: its key is
        missing, and the run of such claims this one makes; else (a lookup that failed) the run
        ends (``NO_KEY_MISSING_RUN``)."""

    # -- the lifecycle (1.4): compare-and-set too, all on the lease's state and epoch ------------------
    async def release(
        self, q: QueueKey, task_id: uuid.UUID, epoch: int, worker: str, until_ms: int, error: Sealed | None
    ) -> CasResult:
        """``fail``: a lease held by ``worker`` at ``epoch`` is held by nobody until ``until_ms``
        (then claimable as an expired lease), keeping the worker's error."""

    async def park(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        epoch: int,
        now_ms: int,
        reason: str,
        park_id: uuid.UUID,
        *,
        worker: str | None = None,
        expired_before_ms: int | None = None,
        base_epoch: int | None = None,
        error: Sealed | None = None,
        earlier_park_id: uuid.UUID | None = None,
        until_ms: int | None = None,
    ) -> CasResult:
        """Park a lease at ``epoch``: held by ``worker`` (a fail past the limit; with ``until_ms``,
        only while its deadline is that one: a claim that could not open its task), or whose deadline is
        at or before ``expired_before_ms`` (the scheduler) and whose ``base_epoch`` is the one the
        caller read: a redrive since (it sets ``base_epoch`` to the epoch it puts back, and leaves
        the lease leased at that epoch and expired) refuses a park decided on a read from before
        it. ``park_id`` becomes its completion id
        (the engine's ``delivery_limit`` result in the outbox names it) and joins the lease's
        ``park_ids``, as does ``earlier_park_id``: the ``park_id`` the caller read from the lease, which
        a bridge before ``park_ids`` wrote alone (its result may still be owed)."""

    async def unpark(self, q: QueueKey, task_id: uuid.UUID, epoch: int, until_ms: int) -> CasResult:
        """Redrive: a task parked at ``epoch`` is leased by nobody until ``until_ms`` (claimable as
        an expired lease then) and its delivery count starts again."""

    async def cancel(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        state: LeaseState | None,
        epoch: int,
        *,
        expired_before_ms: int | None = None,
        to: LeaseState = LeaseState.CANCELLED,
        base_epoch: int | None = None,
        done_id: uuid.UUID | None = None,
    ) -> CasResult:
        """Move a task in ``state`` at ``epoch`` (None: never claimed) to ``to`` (cancelled or
        discarded); with ``expired_before_ms``, only a lease whose deadline is at or before it.
        With a ``state``, only while its ``base_epoch`` is the one the caller read (required then):
        a park and a redrive since leave it in the same state at the same epoch, but redriven
        (counted ready, not in flight). ``done_id``: the completion id written (a new one if
        None); a cancel's is its request's, so that a copy of the request knows it applied."""

    async def add_parked(self, q: QueueKey, entry: ParkedEntry) -> None:
        """Index a parked task (written before the park, so none is ever missing; stale rows are
        filtered out by their lease): a row of its own for the park (``entry.park_id``, required),
        and the task's row of the one-row-per-task index that bridges before it read."""

    async def remove_park(self, q: QueueKey, task_id: uuid.UUID, park_id: uuid.UUID, parked_at_ms: int | None) -> None:
        """Remove the row of one park (``parked_at_ms``: its time, as written; None if unknown),
        after its write whatever the clocks: no other park's row is touched."""

    async def remove_parked(
        self, q: QueueKey, task_id: uuid.UUID, *, epoch: int | None = None, park_id: uuid.UUID | None = None
    ) -> None:
        """Remove a task's row of the one-row-per-task index; with ``park_id``, only if the row names that park (a
        row written before the column names none: kept); else with ``epoch``, only if the row is of
        a park at that epoch (a later park, at a later epoch, keeps its row)."""

    async def parked(
        self, q: QueueKey, limit: int, after: uuid.UUID | None = None, *, in_order: bool = True
    ) -> list[ParkedEntry]:
        """The first ``limit`` rows of both parked indexes (after the task ``after``, if given),
        merged in task order: a task can have several (one per index, one per park). With
        ``in_order=False``, the first ``limit`` of each, unmerged (up to twice ``limit``: to count)."""

    # -- queue counts (stats) -------------------------------------------------------------------------
    async def add_counts(self, q: QueueKey, day: int, ready: int, in_flight: int) -> None:
        """Add deltas to the counts of tasks created (or due) on ``day`` (days since the epoch)."""

    async def add_delayed(self, q: QueueKey, minute: int, delta: int) -> None: ...

    async def counts(self, q: QueueKey, since_day: int) -> tuple[int, int]:
        """(ready, in flight) summed over the days since ``since_day`` (tasks older are gone)."""

    async def delayed(self, q: QueueKey, since_minute: int) -> dict[int, int]:
        """Delayed adds per due minute (minutes since the epoch), from ``since_minute`` on."""

    async def trim_counts(self, q: QueueKey, before_day: int) -> None:
        """Delete the queue's counter rows of days before ``before_day`` (and their minutes)."""

    async def register_service(self, q: QueueKey) -> None:
        """Record that the owner has this service queue (stats lists them)."""

    async def services(self, owner: str, limit: int) -> list[str]:
        """The owner's first ``limit`` service queues (in the store's order)."""

    async def queues(self, limit: int) -> list[QueueKey]:
        """Every registered queue of every owner, up to ``limit`` (the fleet's gauges)."""

    async def queue_page(self, after: QueueKey | None, limit: int) -> list[QueueKey]:
        """Up to ``limit`` registered queues after ``after`` (from the first with None), in an order
        of the store's that a walk of pages follows to its end (the counter trim)."""

    async def queues_after_owner(self, owner: str, limit: int) -> list[QueueKey]:
        """Up to ``limit`` registered queues of the owners after ``owner`` in :meth:`queue_page`'s
        order: a walk that has read enough of one owner goes on to the next (the gauges')."""

    # -- worker pointers ---------------------------------------------------------------------------
    async def worker(self, q: QueueKey, worker: str) -> WorkerRow: ...

    async def set_worker(self, q: QueueKey, worker: str, pointer: WorkerPointer, stamp: int) -> None: ...

    async def write_ahead(
        self,
        q: QueueKey,
        worker: str,
        pointer: WorkerPointer,
        stamp: int,
        bucket: int,
        entry: ExpiryEntry,
        *,
        expires_at_ms: int | None = None,
    ) -> None:
        """Before a claim: file its deadline (as :meth:`watch_expiry`) and point the worker at it
        (as :meth:`set_worker`). Both must be stored when this returns; a store sends them as one
        request where it can (one round trip and one request's cost instead of two)."""

    async def finish_worker(self, q: QueueKey, worker: str, task_id: uuid.UUID, stamp: int) -> None:
        """Record that the worker acked ``task_id`` (a retried ack then finds it)."""

    async def clear_worker(self, q: QueueKey, worker: str, stamp: int) -> None: ...

    # -- recovery timer wheel and result outbox ------------------------------------------------------
    async def watch_expiry(self, bucket: int, entry: ExpiryEntry, *, backstop: bool = True) -> None:
        """File a lease deadline under an expiry bucket (idempotent); the bucket is marked first.
        ``backstop``: a deadline moments ahead is filed once more a little later, for a duty holder
        that may not have read this bucket's mark in time (False: the duty holder's own filing)."""

    async def marked_expiry_buckets(self, first: int, last: int) -> set[int]:
        """The buckets in ``[first, last]`` that deadlines were filed under (a superset is fine)."""

    def marked_here(self, bucket: int) -> bool:
        """Whether this process marked ``bucket`` lately (no I/O; False is no answer): the duty
        holder's own filings, met by the bucket's first pass without waiting for a read."""

    async def expiries(self, bucket: int) -> list[ExpiryEntry]:
        """Every deadline filed under a bucket (all its shards, in one request)."""

    async def insert_outbox(self, entry: OutboxEntry) -> None: ...

    async def mark_published(self, entry: OutboxEntry) -> None: ...

    async def decisions(self, q: QueueKey, task_id: uuid.UUID) -> frozenset[uuid.UUID]:
        """The ids of the decisions (a completion, parks) the task's lease recorded, also past the
        task's end: a decision that may owe the engine a result outlives the task by
        ``RESULT_OWED_MS``, the rest of its lease does not (:meth:`lease` then reads None)."""

    async def keep_token(self, entry: OutboxEntry, token: Sealed, traceparent: str | None) -> None:
        """Copy the task's sealed token (and trace context) into the entry's row: a result whose
        publish failed may be owed past the task's end (``RESULT_OWED_MS``), its task's row not."""

    async def outbox(self, bucket: int) -> list[OutboxEntry]:
        """The bucket's entries still unpublished (their results read only for those)."""

    def outbox_pages(self, bucket: int) -> AsyncIterator[list[OutboxEntry]]:
        """:meth:`outbox` a page at a time (a few results each): the relay holds one page of
        results in memory, not the bucket's (hundreds of results of up to 1 MiB after an outage)."""

    def outbox_pages_of(self, bucket: int, keys: Sequence[OutboxKey]) -> AsyncIterator[list[OutboxEntry]]:
        """The entries at ``keys`` (of ``bucket``), published ones too, a page at a time, read by
        their keys: a retry of a bucket owing a few results reads those, not the bucket's keys. A
        key with no entry has ended (its row's life, the task's plus ``RESULT_OWED_MS``): the
        relay counts a result still owed then as dropped, where a published one says so."""

    # -- loop progress -------------------------------------------------------------------------------
    async def owed_positions(self, name: str, now_ms: int) -> set[int]:
        """Positions a loop recorded as still owing work (:meth:`remember_owed`) and not forgotten."""

    async def remember_owed(self, name: str, pos: int, pos_ms: int) -> None:
        """Record a position still owing work, apart from the loop's own position (which can then
        move past it), for as long as what it owes may live (a result: its task's life + 1 day);
        ``pos_ms`` names its time."""

    async def forget_owed(self, name: str, pos: int, pos_ms: int) -> None: ...

    async def scheduler_cursor(self, name: str, now_ms: int) -> int | None:
        """The greatest persisted position of a background loop (recent ones; None if none)."""

    async def advance_scheduler_cursor(self, name: str, pos: int, pos_ms: int) -> None: ...


__all__ = ["TaskStore"]
