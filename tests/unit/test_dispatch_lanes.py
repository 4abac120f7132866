"""The dispatcher's lane cache: bounded, least recently used out first, lanes in use kept."""

from __future__ import annotations

import uuid

from bridge.domain.clock import ManualClock
from bridge.domain.dispatch import Dispatcher
from bridge.domain.records import LANE_FRESH, LANE_RECOVERED, QueueKey
from bridge.storage.memory import MemoryTaskStore


def test_the_least_recently_used_lanes_go_first_and_a_lane_in_use_stays() -> None:
    clock = ManualClock(1_700_000_000_000)
    d = Dispatcher(MemoryTaskStore(clock.now_ms), clock.now_ms, 1_000, max_lanes=4)
    queues = [QueueKey("o", f"s{i}") for i in range(4)]
    d._lane(queues[0], LANE_FRESH).inflight.add(uuid.uuid4())  # the oldest, but in use
    d._lane(queues[0], LANE_RECOVERED)
    d._lane(queues[1], LANE_FRESH)
    d._lane(queues[1], LANE_RECOVERED)
    d._lane(queues[0], LANE_RECOVERED)  # used again: now the most recent
    d._lane(queues[2], LANE_FRESH)
    d._lane(queues[3], LANE_FRESH)
    assert list(d._lanes) == [
        (queues[0], LANE_FRESH),
        (queues[0], LANE_RECOVERED),
        (queues[2], LANE_FRESH),
        (queues[3], LANE_FRESH),
    ]
