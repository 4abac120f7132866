"""An owed result whose task (its token) has ended is dropped and counted once: pure logic. It was
counted (and logged) before it was marked published, so a mark that failed counted it again at
every retry of the relay: ``results_dropped{reason="expired"}`` grew with the store's troubles."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any, cast

import pytest

from bridge.domain.context import QueueContext
from bridge.domain.records import OutboxEntry
from bridge.domain.relay import ResultRelay
from tests.queue_harness import CountingMetrics, Sink

pytestmark = pytest.mark.anyio


class _Store:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.marked = 0

    async def payload(self, queue: Any, task_id: Any) -> None:
        return None  # the task's row ended, its token with it

    async def mark_published(self, entry: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise TimeoutError("outbox write timed out")
        self.marked += 1


async def test_an_expired_result_is_counted_once_however_often_its_mark_failed() -> None:
    store, metrics = _Store(failures=3), CountingMetrics()
    ctx = cast(QueueContext, SimpleNamespace(store=store, metrics=metrics))
    relay = ResultRelay(ctx, Sink())
    entry = cast(
        OutboxEntry,
        SimpleNamespace(
            queue=SimpleNamespace(owner="o", service="s"), task_id=uuid.uuid4(), token=None, traceparent=None
        ),
    )
    failed = 0
    for _ in range(10):  # the relay's retries of the owed entry
        try:
            await relay.publish(entry)
        except TimeoutError:
            failed += 1
            continue
        break
    assert (failed, store.marked) == (3, 1)
    assert metrics.total("results_dropped", reason="expired") == 1
