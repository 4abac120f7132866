"""The operator console's pure parts: the chart's per-minute ring and the page's security policy."""

from __future__ import annotations

import base64
import hashlib
import re

from bridge.console.history import MINUTE_MS, POINTS, MetricsHistory
from bridge.console.routes import _page

T0 = 1_800_000_000_000 - 1_800_000_000_000 % MINUTE_MS  # a minute's start


class Clock:
    """A wall clock the test moves, backwards too (a host's clock can be set back)."""

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class FakeCounters:
    def __init__(self) -> None:
        self.values = {"tasks_added": 0.0, "tasks_completed": 0.0, "tasks_redelivered": 0.0}

    def counter_value(self, name: str) -> float:
        return self.values[name]


def _history(start_ms: int = T0 + 5_000) -> tuple[MetricsHistory, Clock, FakeCounters]:
    clock = Clock(start_ms)
    counters = FakeCounters()
    history = MetricsHistory(counters, clock.now_ms)
    history.sample()
    return history, clock, counters


def test_the_minute_in_progress_is_read_live_and_closed_at_the_boundary() -> None:
    history, clock, counters = _history()
    counters.values["tasks_added"] = 3
    counters.values["tasks_completed"] = 1
    now = history.series()
    assert now["intervalSeconds"] == 60 and now["series"] == ["added", "completed", "redelivered"]
    assert now["points"] == [{"at": "2027-01-15T08:00:00.000Z", "added": 3, "completed": 1, "redelivered": 0}]

    clock.advance(MINUTE_MS)  # the next minute: the first one is closed with what it counted
    history.sample()
    counters.values["tasks_redelivered"] = 2
    points = history.series()["points"]
    assert [p["at"] for p in points] == ["2027-01-15T08:00:00.000Z", "2027-01-15T08:01:00.000Z"]
    assert points[0] == {**points[0], "added": 3, "completed": 1, "redelivered": 0}
    assert points[1] == {**points[1], "added": 0, "completed": 0, "redelivered": 2}


def test_a_sample_within_the_same_minute_changes_nothing() -> None:
    history, clock, counters = _history()
    counters.values["tasks_added"] = 1
    clock.advance(30_000)
    history.sample()
    assert len(history.series()["points"]) == 1
    assert history.series()["points"][0]["added"] == 1


def test_skipped_minutes_count_zero_and_the_ring_keeps_an_hour() -> None:
    history, clock, counters = _history()
    counters.values["tasks_added"] = 5
    clock.advance(3 * MINUTE_MS)  # the sampler was late by two minutes
    history.sample()
    points = history.series()["points"]
    assert [p["added"] for p in points] == [5, 0, 0, 0]
    for _ in range(2 * POINTS):
        counters.values["tasks_added"] += 1
        clock.advance(MINUTE_MS)
        history.sample()
    points = history.series()["points"]
    assert len(points) == POINTS
    assert all(p["added"] == 1 for p in points[:-1]) and points[-1]["added"] == 0
    minutes = [p["at"] for p in points]
    assert minutes == sorted(minutes) and len(set(minutes)) == POINTS


def test_a_long_gap_and_a_clock_going_back_keep_the_series_bounded_and_ordered() -> None:
    history, clock, _ = _history()
    clock.advance(10 * POINTS * MINUTE_MS)
    history.sample()
    assert len(history.series()["points"]) == POINTS
    before = history.series()["points"]
    clock.advance(-5 * MINUTE_MS)  # the clock went back: counting goes on into the open minute
    history.sample()
    assert history.series()["points"] == before
    minutes = [p["at"] for p in before]
    assert minutes == sorted(minutes) and len(set(minutes)) == POINTS


def test_counter_resets_never_go_negative_and_no_counters_is_all_zero() -> None:
    history, clock, counters = _history()
    counters.values["tasks_added"] = 10
    clock.advance(MINUTE_MS)
    history.sample()
    counters.values["tasks_added"] = 4  # a counter that went down (it never should)
    assert history.series()["points"][-1]["added"] == 0
    empty = MetricsHistory(None, Clock(T0).now_ms)
    zero = {"at": "2027-01-15T08:00:00.000Z", "added": 0, "completed": 0, "redelivered": 0}
    assert empty.series()["points"] == [zero]


def test_the_page_allows_only_its_own_inline_script_and_style() -> None:
    page, csp = _page()
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.S)
    styles = re.findall(rb"<style>(.*?)</style>", page, re.S)
    assert len(scripts) == 1 and len(styles) == 1
    assert b"<script src" not in page and b'<link rel="stylesheet"' not in page

    def digest(body: bytes) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"

    assert f"script-src {digest(scripts[0])};" in csp
    assert f"style-src {digest(styles[0])};" in csp
    assert "default-src 'none'" in csp and "unsafe" not in csp and "frame-ancestors 'none'" in csp
    # Nothing from elsewhere: no URL but the SVG namespace.
    assert re.findall(rb"https?://[^\s\"']+", page) == [b"http://www.w3.org/2000/svg"]
    # Data is put in the page as text, never as markup.
    assert b"innerHTML" not in page and b"insertAdjacentHTML" not in page and b"document.write" not in page
