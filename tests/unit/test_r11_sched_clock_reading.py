"""A better-bounded clock reading that disagrees with the anchor (cassandra clock mode): taken, as
before (one reading cannot tell a paused host from a Cassandra node whose clock is off), but said.
Before, a coordinator a minute ahead moved the bridge's time (and the duty holder's recovery and
relay positions) a minute ahead without a word. Pure logic."""

from __future__ import annotations

import logging

import pytest

from bridge.domain.clock import AnchoredClock, ManualClock, SkewReading

T0 = 1_800_000_000_000


class Monotonic:
    def __init__(self) -> None:
        self.s = 1_000.0

    def __call__(self) -> float:
        return self.s


def _clock() -> tuple[AnchoredClock, Monotonic]:
    mono = Monotonic()
    clock = AnchoredClock(ManualClock(0), monotonic=mono)
    assert clock.offer(SkewReading(0.0, 5.0, mono(), float(T0)))
    mono.s += 1.0
    return clock, mono


def test_a_better_reading_a_minute_ahead_of_the_anchor_is_said(caplog: pytest.LogCaptureFixture) -> None:
    clock, mono = _clock()
    with caplog.at_level(logging.ERROR, logger="bridge.clock"):
        assert clock.offer(SkewReading(0.0, 1.0, mono(), float(T0 + 1_000 + 60_000)))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "-60000 ms off Cassandra's" in errors[0], errors
    assert clock.now_ms() == T0 + 61_000  # taken, as before


def test_a_better_reading_that_agrees_is_taken_quietly(caplog: pytest.LogCaptureFixture) -> None:
    clock, mono = _clock()
    with caplog.at_level(logging.ERROR, logger="bridge.clock"):
        assert clock.offer(SkewReading(0.0, 1.0, mono(), float(T0 + 1_000 + 3)))  # within both bounds
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
