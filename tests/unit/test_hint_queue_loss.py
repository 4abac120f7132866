"""A hint lost because its own queue cannot be declared alarms that queue only (no servers).

When the node holding a hint queue is down, its declaration fails (404): the hint of each add of
that queue is lost and reconciliation must scan the queue. It raised the bridge-wide alarm, which
clears every queue's quiet interval and lifts the grace for all of them: each add of the broken
queue made every fetch of every other queue scan, and claim tasks whose hints were on their way
to other bridges' waiting fetches. The fetch path already alarmed the one queue; now the add path
does too. Found by the fleet-cost review, 2026-12-05.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from aiormq.exceptions import ChannelNotFoundEntity

from bridge.app import Bridge
from bridge.config import Settings
from bridge.crypto import generate_keyring, write_keyring
from bridge.domain.hints import Hint
from bridge.domain.records import LANE_FRESH, QueueKey

pytestmark = pytest.mark.anyio


async def test_a_hint_whose_queue_cannot_be_declared_alarms_that_queue_only(tmp_path: Path) -> None:
    keyring = tmp_path / "keys.json"
    write_keyring(keyring, generate_keyring(["o"]))
    bridge = Bridge(Settings(keyring=keyring, clock_source="host"))  # the bridge's own wiring; nothing connects
    reconcile, hints, now = bridge.reconcile, bridge.hints, bridge.clock.now_ms()
    broken, healthy = QueueKey("o", "broken"), QueueKey("o", "healthy")
    reconcile.found_nothing(broken, now)
    reconcile.found_nothing(healthy, now)  # both scanned lately, found nothing: quiet

    async def node_down(q: QueueKey) -> object:
        raise ChannelNotFoundEntity("NOT_FOUND - home node of the queue is down")

    hints._queue = node_down  # type: ignore[method-assign,assignment]
    task_id = uuid.uuid1()
    await hints.offer(broken, Hint(task_id, LANE_FRESH, task_id, None, False))
    assert hints.lost == 1
    assert reconcile.due(broken, now), "the queue whose hint was lost is scanned at its next fetch"
    assert not reconcile.due(healthy, now), "every other queue keeps its quiet interval"
    assert reconcile.cutoff_ms(now, healthy) < now - 1_000, "and its grace"
