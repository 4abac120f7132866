"""The pure helpers of benchmarks/lifecycle.py (no servers, no bridge processes)."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime

import pytest

from benchmarks.lifecycle import (
    Row,
    auto_lead_s,
    by_second,
    due_times,
    fmt,
    iso_ms,
    ms_of_iso,
    parse_args,
    ratio,
    render,
    summary_ms,
)
from bridge.client.rpc import iso_not_before


@pytest.mark.parametrize("ms", [0, 1, 999, 1_764_633_600_123, 1_764_633_600_999, 1_764_633_601_001])
def test_iso_ms_round_trips_exactly_and_is_what_the_client_sends(ms: int) -> None:
    text = iso_ms(ms)
    assert text.endswith("Z")
    assert ms_of_iso(text) == ms
    assert iso_not_before(text) == text  # accepted as given: it carries an offset


def test_iso_ms_is_never_a_millisecond_early() -> None:
    # 1764633600.123 is not exact in binary; through a float it can come out as .122.
    assert iso_ms(1_764_633_600_123) == "2025-12-02T00:00:00.123Z"


def test_ms_of_iso_reads_offsets_and_naive_utc() -> None:
    assert ms_of_iso("2025-12-02T01:00:00.500+01:00") == ms_of_iso("2025-12-02T00:00:00.500Z")
    naive = ms_of_iso("2025-12-02T00:00:00.500")
    assert naive == int(datetime(2025, 12, 2, tzinfo=UTC).timestamp()) * 1000 + 500


def test_due_times_spread_evenly_in_order_within_the_window() -> None:
    dues = due_times(1_000, 60_000, 10_000)
    assert len(dues) == 10_000
    assert dues == sorted(dues)
    assert dues[0] == 1_000
    assert dues[-1] < 61_000
    assert max(b - a for a, b in itertools.pairwise(dues)) <= 7  # 6 ms apart, rounded
    assert due_times(5, 10, 1) == [5]


def test_summary_ms() -> None:
    s = summary_ms([30, 10, 20])
    assert s == {"count": 3, "p50_ms": 20.0, "p99_ms": pytest.approx(29.8), "max_ms": 30.0, "min_ms": 10.0}
    empty = summary_ms([])
    assert empty == {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "min_ms": None}


def test_by_second_groups_lateness_by_second_of_due_time() -> None:
    pairs = [(1_000, 10), (1_500, 30), (2_100, 100), (4_000, 7)]
    assert by_second(pairs, 1_000) == [20.0, 100.0, None, 7.0]
    assert by_second([], 0) == []


def test_ratio_and_fmt() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 1.0))
    assert fmt(1.234, "x") == "1.23x"
    assert fmt(7, " ms") == "7 ms"
    assert fmt(math.nan) == "n/a"
    assert fmt(None) == "n/a"


def test_auto_lead_leaves_time_for_the_adds() -> None:
    assert auto_lead_s(10_000) == pytest.approx(30.0)
    assert auto_lead_s(0) == 5.0


def test_render_aligns_rows_with_verdicts() -> None:
    text = render(
        [Row("extend", "extend p50 / floor", "1.05x", "<= 1.2x", True), Row("extend", "fetch p50", "9.00 ms")]
    )
    lines = text.splitlines()
    assert lines[0].startswith("phase")
    assert set(lines[1]) == {"-"}
    assert lines[2].endswith("PASS")
    assert lines[3].endswith("9.00 ms")


def test_parse_args_defaults_are_the_issue_sizes() -> None:
    args = parse_args([])
    assert args.phases == "extend,poison,delayed"
    assert (args.poison_tasks, args.poison_workers, args.max_deliveries) == (1000, 8, 5)
    assert (args.delayed_tasks, args.delayed_window, args.delayed_workers) == (10_000, 60.0, 16)
    assert args.delayed_bridges == "1,2"
    with pytest.raises(SystemExit):
        parse_args(["--max-deliveries", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--phases", "extend,nope"])
    with pytest.raises(SystemExit):
        parse_args(["--delayed-bridges", "1,x"])
    assert parse_args(["--phases", "poison"]).phases == "poison"
