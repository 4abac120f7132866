"""W3C traceparent: validation on the way in, a child in the same trace on the way out."""

from __future__ import annotations

import pytest

from bridge.observability.tracing import child_traceparent, extract_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": VALID},
        {"traceparent": VALID.encode()},
        {"traceparent": bytearray(VALID.encode())},
        {"traceparent": f"  {VALID} "},
        {"Traceparent": VALID},
        {"traceparent": VALID, "tracestate": "congo=t61rcWkgMzE"},
    ],
)
def test_valid_traceparent_is_returned(headers: dict[str, object]) -> None:
    assert extract_traceparent(headers) == VALID


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        VALID.upper(),  # hex must be lowercase
        f"00-{TRACE}-{SPAN}-1",
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00-{TRACE}-{SPAN[:-1]}-01",
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{SPAN}-01",  # forbidden version
        f"0x-{TRACE}-{SPAN}-01",
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE}-{SPAN}-0g",
        f"01-{TRACE}-{SPAN}-01extra",  # later versions: extra data must follow a "-"
    ],
)
def test_invalid_traceparent_is_rejected(value: str) -> None:
    assert extract_traceparent({"traceparent": value}) is None


@pytest.mark.parametrize(
    "headers",
    [{}, None, {"other": VALID}, {"traceparent": 123}, {"traceparent": None}, {"traceparent": b"\xff\xfe"}],
)
def test_missing_or_non_text_header_is_none(headers: dict[str, object] | None) -> None:
    assert extract_traceparent(headers) is None


def test_later_version_is_read_as_version_00() -> None:
    assert extract_traceparent({"traceparent": f"01-{TRACE}-{SPAN}-01-more-fields"}) == VALID


def test_child_keeps_trace_and_flags_with_a_fresh_span() -> None:
    child = child_traceparent(VALID)
    assert child is not None
    version, trace_id, span_id, flags = child.split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01")
    assert span_id != SPAN
    assert len(span_id) == 16
    assert span_id != "0" * 16
    int(span_id, 16)
    assert extract_traceparent({"traceparent": child}) == child


def test_children_are_distinct_and_keep_the_unsampled_flag() -> None:
    parent = f"00-{TRACE}-{SPAN}-00"
    children = {child_traceparent(parent) for _ in range(50)}
    assert len(children) == 50
    assert all(c is not None and c.endswith("-00") and c.split("-")[1] == TRACE for c in children)


@pytest.mark.parametrize("parent", [None, "", "nonsense", f"00-{'0' * 32}-{SPAN}-01"])
def test_no_child_without_a_valid_parent(parent: str | None) -> None:
    assert child_traceparent(parent) is None
