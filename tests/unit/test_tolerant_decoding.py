"""The tolerant content-header decoders (bridge.transport.tolerant_decoding) against pamqp's own:
the same values wherever pamqp decodes, a value where it raises."""

from __future__ import annotations

import datetime
import struct
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import decode, encode

from bridge.transport import tolerant_decoding
from bridge.transport.tolerant_decoding import MAX_DEPTH, TOO_DEEP

tolerant_decoding.install()


def _table(entries: bytes) -> bytes:
    return struct.pack(">I", len(entries)) + entries


def _nested_tables(depth: int) -> bytes:
    """A header table {"n": {"a": {"a": ... {}}}} with ``depth`` tables below "n"'s."""
    value = b"F" + _table(b"")
    for _ in range(depth):
        value = b"F" + _table(b"\x01a" + value)
    return _table(b"\x01n" + value + b"\x01k" + b"S" + struct.pack(">I", 2) + b"ok")


def _nested_arrays(depth: int) -> bytes:
    value = b"A" + _table(b"")
    for _ in range(depth):
        value = b"A" + _table(value)
    return _table(b"\x01n" + value)


@pytest.mark.parametrize("depth", [600, 5000])
def test_tables_nested_past_the_limit_read_as_too_deep_and_the_rest_of_the_table_is_kept(depth: int) -> None:
    consumed, table = decode.field_table(_nested_tables(depth))
    assert consumed == len(_nested_tables(depth))
    assert table == {"n": TOO_DEEP, "k": "ok"}


def test_arrays_nested_past_the_limit_read_as_too_deep() -> None:
    data = _nested_arrays(3000)
    assert decode.field_table(data) == (len(data), {"n": TOO_DEEP})


def test_nesting_up_to_the_limit_decodes_in_full() -> None:
    _, table = decode.field_table(_nested_tables(MAX_DEPTH - 2))
    value: Any = table["n"]
    depth = 0
    while value:
        value, depth = value["a"], depth + 1
    assert depth == MAX_DEPTH - 2
    assert table["k"] == "ok"


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(max_size=20)
    | st.decimals(places=2, min_value=-1000, max_value=1000, allow_nan=False)
    | st.datetimes(
        min_value=datetime.datetime(1970, 1, 2),
        max_value=datetime.datetime(2100, 1, 1),
        timezones=st.just(datetime.UTC),
    ).map(lambda t: t.replace(microsecond=0)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(min_size=1, max_size=8), _values, max_size=6))
def test_any_table_pamqp_encodes_decodes_to_itself(table: dict[str, Any]) -> None:
    data = encode.field_table(table)
    consumed, back = decode.field_table(data)
    assert consumed == len(data)
    assert back == _normal(table)


def _normal(value: Any) -> Any:
    """What AMQP gives back for ``value``: decimals as pamqp writes them."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, Decimal):
        return Decimal(str(value))
    return value


@pytest.mark.parametrize(
    "header",
    [
        {"k": [None] * 40_000},  # an array of one-byte values in one header (a 128 KiB frame holds 130,000)
        {f"k{i}": 0 for i in range(20_000)},  # a table of many small values
    ],
    ids=["long array", "wide table"],
)
def test_each_value_of_a_long_header_is_decoded_from_its_own_bytes(
    header: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pamqp handed each value the whole rest of the frame (copied twice a value): a header of
    130,000 one-byte values cost 0.38 s of the event loop, any tenant's to send. Each value now
    gets its own bytes: the copying is linear in the header's size (found by review, 2026-12-07)."""
    data = encode.field_table(header)
    handed = 0  # bytes handed to the value decoder, all values together
    embedded_value = decode.embedded_value

    def measured(value: bytes) -> Any:
        nonlocal handed
        handed += len(value)
        return embedded_value(value)

    monkeypatch.setattr(decode, "embedded_value", measured)
    consumed, table = decode.field_table(data)
    assert (consumed, table) == (len(data), header)
    # Each byte is handed once per level it is nested in (here at most 2), but for the last
    # values, which get the short rest (a constant: at most _SMALL_REST^2 / 2 bytes); before,
    # about n^2 / 2 for n values (800 million bytes for the array).
    small = tolerant_decoding._SMALL_REST
    assert handed <= 2 * len(data) + small * small, f"{handed} bytes handed to decode {len(data)}"


@pytest.mark.parametrize(
    "value",
    [b"S\x00\x00\x00\x09short", b"A\x00\x00\x00\x07V", b"F\x00\x00", b"l\x00\x01", b"Q\x00", b"T\x00\x00\x00"],
    ids=["long string past the data", "array past the data", "table length cut", "int cut", "unknown type", "time cut"],
)
def test_a_value_running_past_its_data_decodes_or_fails_as_pamqp_says(value: bytes) -> None:
    """A value cut short is given the rest of the data, as pamqp gives it: the same result or the
    same error."""
    data = struct.pack(">I", 3 + len(value)) + b"\x01k" + value + b"\xff"
    ours = _outcome(lambda: decode.field_table(data))
    monkey = _outcome(lambda: _pamqp_rest_of_frame_table(data))
    assert ours == monkey


def _outcome(call: Any) -> Any:
    try:
        return ("ok", call())
    except Exception as exc:  # the error's kind and text are what is compared
        return ("error", type(exc).__name__, str(exc))


def _pamqp_rest_of_frame_table(value: bytes) -> Any:
    """The tolerant table decoder as it was: each value handed the whole rest of the frame."""
    length = struct.unpack(">I", value[0:4])[0]
    end = 4 + length
    if end > len(value):
        raise ValueError("Field table length exceeds available data")
    offset, data = 4, {}
    while offset < end:
        key_length = value[offset]
        offset += 1
        if offset + key_length > end:
            raise ValueError("Field table key length exceeds data")
        key = value[offset : offset + key_length].decode("utf-8", "surrogateescape")
        offset += key_length
        consumed, result = decode.embedded_value(value[offset:])
        offset += consumed
        data[key] = result
    return end, data
