"""The queue's rules as a state machine (hypothesis), on the in-memory store with a manual clock.

Workers add, fetch, ack (naming the task, or legacy) or never ack (a crash); time jumps; the scheduler
ticks; a second bridge with its own clock (ahead by less than the skew margin) serves the same
queue. After every step:
- no overlapping leases: a task handed to another worker only after the previous lease (as last
  extended) plus the skew margin has passed, and each (task, epoch) to one worker only;
- no completion by a stale worker: an ack answered true is the latest lease of that task, held
  by that worker;
- a completed task is never handed out again;
and at the end, with time moved on, every task that was added is completed: none is lost.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bridge.crypto import KeyringFileProvider, generate_keyring, write_keyring
from bridge.domain.clock import ManualClock
from bridge.domain.models import Delivery
from bridge.domain.queue import WorkQueue
from bridge.storage.memory import MemoryTaskStore
from tests.queue_harness import MARGIN_MS, OWNER, TTL_S, Harness

WORKERS = ("a", "b", "c", "d")
_KEYS: dict[str, KeyringFileProvider] = {}


def _keys(tmp: Path) -> KeyringFileProvider:
    if "k" not in _KEYS:
        path = tmp / "keyring.json"
        write_keyring(path, generate_keyring([OWNER]))
        _KEYS["k"] = KeyringFileProvider(path)
    return _KEYS["k"]


class QueueRules(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock(1_700_000_000_000)
        self.h = Harness(MemoryTaskStore(self.clock.now_ms, TTL_S), _KEYS["k"], self.clock, prefix="")
        self.other_clock = ManualClock(self.clock.now_ms() + MARGIN_MS - 200)
        self.other, self.other_scheduler = self.h.instance(self.other_clock)
        self.added: set[str] = set()
        self.completed: set[str] = set()
        self.holding: dict[str, Delivery] = {}  # the last task each worker was handed and has not acked
        self.acked_by: set[str] = set()  # workers with a successful ack (a retry of it is answered true)
        self.owner_of: dict[tuple[str, int], str] = {}  # (task, epoch) -> worker
        self.until: dict[tuple[str, int], int] = {}  # (task, epoch) -> latest deadline granted
        self.latest: dict[str, int] = {}  # task -> latest epoch handed out

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self._drain_everything()
        finally:
            self.run(self.h.close())  # the schedulers' timers, cancelled as a bridge's at shutdown
            self.loop.close()

    @initialize()
    def start(self) -> None:
        self.run(self.h.scheduler.tick())
        self.run(self.other_scheduler.tick())

    # -- steps -------------------------------------------------------------------------------
    @rule(n=st.integers(1, 3))
    def add(self, n: int) -> None:
        for _ in range(n):
            self.added.add(self.run(self.h.add("v")))
        self.other_clock.advance(n)

    @rule(worker=st.sampled_from(WORKERS), ttr=st.sampled_from([200, 700, 3_000]), on_other=st.booleans())
    def fetch(self, worker: str, ttr: int, on_other: bool) -> None:
        queue: WorkQueue = self.other if on_other else self.h.queue
        got = self.run(self.h.fetch(worker, ttr_ms=ttr, queue=queue))
        if got is not None:
            self._check_delivery(worker, got, skew=MARGIN_MS - 200 if on_other else 0)

    @rule(worker=st.sampled_from(WORKERS), named=st.booleans(), on_other=st.booleans())
    def ack(self, worker: str, named: bool, on_other: bool) -> None:
        held = self.holding.get(worker)
        queue = self.other if on_other else self.h.queue
        ok = self.run(self.h.ack(worker, held if named else None, queue=queue))
        if not ok:
            return
        if held is None:
            # Only a retry of the worker's last successful ack may be answered true (idempotent).
            assert worker in self.acked_by, f"{worker} completed a task it was never given"
            return
        key = (held.task_id, held.epoch)
        assert self.latest[held.task_id] == held.epoch, f"stale completion of {key} by {worker}"
        assert self.owner_of[key] == worker
        self.completed.add(held.task_id)
        self.acked_by.add(worker)
        self.holding.pop(worker)

    @rule(ms=st.sampled_from([1, 50, 300, 900, 2_500, 65_000]))
    def time_passes(self, ms: int) -> None:
        self.clock.advance(ms)
        self.other_clock.advance(ms)
        self.run(self.h.scheduler.tick())
        self.run(self.other_scheduler.tick())
        self.run(self.h.queue.drain_background(5.0))
        self.run(self.other.drain_background(5.0))

    @precondition(lambda self: bool(self.added))
    @invariant()
    def completed_tasks_were_added(self) -> None:
        assert self.completed <= self.added

    # -- checks ------------------------------------------------------------------------------
    def _check_delivery(self, worker: str, got: Delivery, *, skew: int) -> None:
        """Checked in true time (our clock): ``skew`` is how far ahead the granting bridge's clock is."""
        task, epoch = got.task_id, got.epoch
        assert task not in self.completed, f"completed task {task} handed out again"
        prev = self.owner_of.get((task, epoch))
        if prev is not None:
            assert prev == worker, f"{task} epoch {epoch} handed to {prev} and {worker}"
        else:
            last = self.latest.get(task)
            if last is not None:
                assert epoch > last
                # The previous lease, as last extended, had ended in true time.
                assert self.clock.now_ms() >= self.until[(task, last)], f"{task} taken from a live lease"
            self.owner_of[(task, epoch)] = worker
            self.latest[task] = epoch
        self.until[(task, epoch)] = got.lease_expires_at_ms - skew
        self.holding[worker] = got

    def _drain_everything(self) -> None:
        """Time moves well past every lease; one worker completes everything that comes out."""
        for _ in range(3):
            self.time_passes(65_000)
        misses = 0
        while misses < 20:  # "nothing now" is a fair answer; nothing for 4 s of clock time is not
            got = self.run(self.h.fetch("drain", ttr_ms=60_000))
            if got is None:
                misses += 1
                self.time_passes(200)
                continue
            self._check_delivery("drain", got, skew=0)
            assert self.run(self.h.ack("drain", got)) is True
            self.completed.add(got.task_id)
        assert self.added <= self.completed, f"lost: {sorted(self.added - self.completed)}"


def test_queue_rules_hold(tmp_path_factory: Any) -> None:
    _keys(tmp_path_factory.mktemp("keys"))
    # No "explain" phase: its tracing makes each example ~50x slower on Python 3.11.
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]
    QueueRules.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None, phases=phases)
    QueueRules.TestCase().runTest()
