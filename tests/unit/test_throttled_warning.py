"""A warning repeated per request by a lasting cause is written at most once a period
(``bridge.observability.throttled``)."""

from __future__ import annotations

import logging

import pytest

from bridge.observability.throttled import ThrottledWarning


def test_the_first_is_written_the_rest_of_the_period_counted_and_said_with_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    warn = ThrottledWarning(logging.getLogger("t.throttled"), every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t.throttled"):
        for i in range(100):
            now[0] = i * 0.05  # 100 in 5 s
            warn.warning("hint not published (%s)", "ChannelInvalidStateError")
        now[0] = 12.0
        warn.warning("hint not published (%s)", "ChannelInvalidStateError")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "hint not published (ChannelInvalidStateError)",
        "hint not published (ChannelInvalidStateError) (and 99 more like it in the last 12 s)",
    ]
