"""A history of what workers saw, and the checker the multi-bridge tests run over it.

After Jepsen's total-queue and Queen MQ's lease checker, plus attribution (issue 12): it is not
enough that every task is completed once; each completion must be the one its acking worker meant.

Checked against Cassandra's rows and the result messages:
- no task lost: every added task is completed;
- every ack that answered true completed the task the worker was handed, at the lease it held
  (the ``leases`` row shows that worker and that epoch as the completer), and an ack that answered
  false did not (its lease had been taken over: at least once, not an error);
- acks answering true equal completions (one per task; a retried ack of the same lease counts once);
- every result message carries the value of the task it names (no result on the wrong task),
  one result per completion (more than one only where the caller allows duplicates: after a crash
  or a broker restart, docs/reliability.md, "Results at least once");
- no two workers hold one task at once in true time beyond a tolerance, where a worker holds a
  task from receiving the fetch reply until the fetch was sent + timeToRecover (an under-estimate
  of the lease: the bridge granted it after the request was sent).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Held:
    task: str
    epoch: int | None
    worker: str
    start: float  # monotonic, fetch reply received
    end: float  # monotonic, fetch sent + timeToRecover


@dataclass(frozen=True)
class Acked:
    task: str
    epoch: int | None
    worker: str
    answer: bool
    at: float = 0.0  # monotonic, when the answer came


@dataclass
class History:
    values: dict[str, Any] = field(default_factory=dict)  # task id -> value added
    held: list[Held] = field(default_factory=list)
    acks: list[Acked] = field(default_factory=list)

    def first_ack_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` (monotonic) to the first ack answering true after it."""
        later = [a.at for a in self.acks if a.answer and a.at >= moment]
        return min(later) - moment if later else None

    def redeliveries(self) -> int:
        return len(self.held) - len({h.task for h in self.held})

    def overlaps(self, tolerance_s: float = 0.05) -> list[tuple[Held, Held, float]]:
        by_task: dict[str, list[Held]] = defaultdict(list)
        for h in self.held:
            by_task[h.task].append(h)
        bad = []
        for items in by_task.values():
            items.sort(key=lambda h: h.start)
            for i, a in enumerate(items):
                for b in items[i + 1 :]:
                    overlap = min(a.end, b.end) - max(a.start, b.start)
                    if a.worker != b.worker and overlap > tolerance_s:
                        bad.append((a, b, overlap))
        return bad

    def check(
        self,
        lease_rows: dict[str, dict[str, Any]],
        results: list[dict[str, Any]] | None,
        *,
        tolerance_s: float = 0.05,
        allow_duplicates: bool = False,
    ) -> None:
        """``lease_rows``: task id -> its ``leases`` row; ``results``: the result messages (None
        when the tasks carried no token). ``allow_duplicates``: a task's result may come more than
        once (only for runs with a crash or a broker restart, where at least once allows it)."""
        problems: list[str] = []
        lost = [t for t in self.values if (lease_rows.get(t) or {}).get("state") != "done"]
        if lost:
            problems.append(f"{len(lost)} tasks not completed, e.g. {lost[:3]}")
        problems += self._ack_problems(lease_rows)
        if results is not None:
            problems += self._result_problems(results, allow_duplicates)
        bad = self.overlaps(tolerance_s)
        if bad:
            worst = max(o for _, _, o in bad)
            problems.append(f"{len(bad)} pairs of workers held one task at once (worst {worst * 1000:.0f} ms)")
        assert not problems, "history check failed:\n  " + "\n  ".join(problems[:20])

    def _ack_problems(self, lease_rows: dict[str, dict[str, Any]]) -> list[str]:
        """Every ack answering true completed its worker's lease, no ack answering false did, and
        each completion in Cassandra has exactly one ack answering true."""
        problems: list[str] = []
        true_acks = {(a.task, a.epoch, a.worker) for a in self.acks if a.answer}
        for task, epoch, worker in true_acks:
            row = lease_rows.get(task) or {}
            if row.get("state") != "done" or row.get("worker") != worker or (epoch and row.get("epoch") != epoch):
                problems.append(
                    f"ack of {task} (epoch {epoch}) by {worker} answered true, but the row shows "
                    f"{row.get('state')} by {row.get('worker')} at epoch {row.get('epoch')}"
                )
        for a in self.acks:
            row = lease_rows.get(a.task) or {}
            completed_by_it = row.get("state") == "done" and (row.get("worker"), row.get("epoch")) == (
                a.worker,
                a.epoch,
            )
            if not a.answer and completed_by_it:
                problems.append(f"ack of {a.task} by {a.worker} answered false, but that lease completed the task")
        per_task: dict[str, int] = defaultdict(int)
        for task, _, _ in true_acks:
            per_task[task] += 1
        twice = [t for t, n in per_task.items() if n > 1]
        if twice:
            problems.append(f"{len(twice)} tasks completed by more than one ack answering true, e.g. {twice[:3]}")
        completions = sum(1 for t in self.values if (lease_rows.get(t) or {}).get("state") == "done")
        if len(per_task) != completions:
            problems.append(f"{len(per_task)} tasks acked true but {completions} completions in Cassandra")
        return problems

    def _result_problems(self, results: list[dict[str, Any]], allow_duplicates: bool) -> list[str]:
        """Each result carries its own task's value, every task has one, and (unless duplicates
        are allowed) only one: without this check a drill passed with every result sent twice."""
        problems: list[str] = []
        per_task: dict[str, int] = defaultdict(int)
        for msg in results:
            task = msg["taskId"]
            per_task[task] += 1
            carried = (msg.get("result") or {}).get("task")
            if task in self.values and carried != self.values[task]:
                problems.append(f"result of {task} carries {carried!r}, the task's value is {self.values[task]!r}")
        missing = set(self.values) - set(per_task)
        if missing:
            problems.append(f"{len(missing)} completed tasks without a result message")
        twice = {t: n for t, n in per_task.items() if n > 1}
        if twice and not allow_duplicates:
            problems.append(f"{len(twice)} tasks with more than one result message, e.g. {list(twice.items())[:3]}")
        return problems


def lease_rows(cql: Any, keyspace: str, owner: str, service: str, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """The ``leases`` rows of these tasks, read at SERIAL (what Cassandra decided), 64 at a time."""
    from cassandra import ConsistencyLevel
    from cassandra.concurrent import execute_concurrent_with_args

    stmt = cql.prepare(
        f"SELECT task_id, state, epoch, worker FROM {keyspace}.leases WHERE owner = ? AND service = ? AND task_id = ?"
    )
    stmt.consistency_level = ConsistencyLevel.SERIAL
    args = [(owner, service, uuid.UUID(task)) for task in tasks]
    out: dict[str, dict[str, Any]] = {}
    for task, (ok, rows) in zip(tasks, execute_concurrent_with_args(cql, stmt, args, concurrency=64), strict=True):
        assert ok, rows
        found = list(rows)
        if found:
            out[task] = found[0]
    return out


# Bridges built with this relay a result not marked published within 2 s of its outbox bucket's end
# (the default, 10 s, puts a re-published copy 10-20 s after the result: beyond any short window).
# Not less: a result completed at a bucket's end whose publish and mark took longer (a loaded CI
# machine) is re-published, which at least once allows, and the test would count it as a duplicate.
FAST_RELAY: dict[str, Any] = {"result_republish_after": 2.0}
FAST_SECOND_PASS_MS = 1000  # for ``RELAY_SECOND_PASS_MS`` (30 s), monkeypatched by the test


async def relay_read_past_now(bridges: Sequence[Any], timeout: float = 30.0) -> None:
    """Wait until the fleet's result relay has read (twice) every outbox bucket up to now: once it
    has, a copy of any result completed before this call has had its chance to be re-published, so
    counting the results after it shows a duplicate. The condition is the relay's own position
    (the holder's next bucket past now's, and no second read of one pending), not a sleep: a result
    is re-read only once ``outbox_bucket(now - republish_after)`` has passed its bucket. For a wait
    of seconds, not minutes: bridges built with ``FAST_RELAY`` and ``RELAY_SECOND_PASS_MS``
    monkeypatched to ``FAST_SECOND_PASS_MS``."""
    from bridge.domain import scheduler
    from bridge.domain.timeline import outbox_bucket
    from tests.conftest import wait_for

    assert all(b.settings.result_republish_after <= FAST_RELAY["result_republish_after"] for b in bridges), (
        "build the bridges with FAST_RELAY (the default re-publishes after 10 s)"
    )
    assert scheduler.RELAY_SECOND_PASS_MS <= FAST_SECOND_PASS_MS, "monkeypatch RELAY_SECOND_PASS_MS"
    bucket = max(outbox_bucket(b.queue.clock.now_ms()) for b in bridges)

    def read_past() -> bool:
        for b in bridges:
            s = b.scheduler
            nxt = s._outbox_next
            if s.holder and nxt is not None and nxt > bucket and not any(k <= bucket for k in s._outbox_second):
                return True
        return False

    await wait_for(read_past, timeout, interval=0.1, what=f"the result relay past outbox bucket {bucket} (twice)")


async def run_workers(
    url: str,
    exchange: str,
    service: str,
    history: History,
    n_workers: int,
    total: int,
    *,
    abandon: float = 0.0,
    ttr_ms: int = 1000,
    deadline_s: float = 120,
    rpc_timeout: float = 10.0,
) -> int:
    """Workers loop fetch -> ack (result ``{"task": value}``) until ``total`` distinct tasks are
    completed, recording what they were handed and what their acks answered. A share
    ``abandon`` of fetched tasks is dropped (the worker "dies" and comes back under a new id).
    Returns how many distinct tasks were completed (fewer than ``total``: the deadline came first)."""
    import asyncio
    import random
    import time

    from bridge.client import TransportError, UnavailableError, Worker

    completed: set[str] = set()
    done = asyncio.Event()
    stop_at = time.monotonic() + deadline_s

    async def one(index: int) -> None:
        gen = 0
        async with Worker(url, service=service, worker_id=f"w{index}.0", exchange=exchange, timeout=rpc_timeout) as w:
            while not done.is_set() and time.monotonic() < stop_at:
                sent = time.monotonic()
                try:
                    task = await w.fetch(time_to_recover_ms=ttr_ms)
                except (TransportError, UnavailableError):
                    await asyncio.sleep(0.05)  # a worker's back-off in an outage (load pacing, not a wait)
                    continue
                if task is None:
                    await asyncio.sleep(0.02)  # an empty queue: a worker's polling pace, not a wait
                    continue
                history.held.append(Held(task.id, task.epoch, w.worker_id, time.monotonic(), sent + ttr_ms / 1000))
                history.values.setdefault(task.id, task.value)
                if random.random() < abandon:
                    gen += 1
                    w.worker_id = f"w{index}.{gen}"  # this worker "dies"; its lease must expire
                    w.current = None
                    continue
                while True:
                    try:
                        ok = await task.ack({"task": task.value})
                        break
                    except (TransportError, UnavailableError):
                        await asyncio.sleep(0.05)  # a worker's back-off before retrying its ack
                        continue  # a retried ack of a completed task is still true
                history.acks.append(Acked(task.id, task.epoch, w.worker_id, ok, time.monotonic()))
                if ok:
                    completed.add(task.id)
                    if len(completed) >= total:
                        done.set()

    await asyncio.gather(*(one(i) for i in range(n_workers)))
    return len(completed)
