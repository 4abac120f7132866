"""jsonvalue.dumps: what it refuses to write rather than change."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.domain import jsonvalue
from bridge.domain.jsonvalue import JsonError

NAN, INF = float("nan"), float("inf")


@dataclasses.dataclass
class _Score:
    value: float


class _Level(enum.Enum):
    UNKNOWN = NAN


@pytest.mark.parametrize(
    "value",
    [
        NAN,
        INF,
        -INF,
        {"score": NAN},
        [1, None, {"a": [INF]}],
        (1, -INF),
        {"null": None, "deep": [[[{"x": NAN}]]]},
        _Score(NAN),
        _Level.UNKNOWN,
        {"big": 2**70, "score": NAN},  # the exact path (an integer beyond 64 bits)
    ],
)
def test_nan_and_infinity_are_refused_not_written_as_null(value: Any) -> None:
    """orjson writes a float NaN or Infinity as ``null`` without a word: a worker's result
    ``{"score": nan}`` reached the engine as ``{"score": null}``. ``dumps`` now refuses them, as
    ``loads`` (and the bridge, in an ack) does."""
    with pytest.raises(JsonError):
        jsonvalue.dumps(value)


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (None, b"null"),
        ({"a": None, "s": "null", "f": 1.5}, b'{"a":null,"s":"null","f":1.5}'),
        ([None, 0.0, -1e308], b"[null,0.0,-1e+308]"),
        (_Score(2.5), b'{"value":2.5}'),
    ],
)
def test_nulls_and_finite_floats_are_written_as_they_are(value: Any, written: bytes) -> None:
    assert jsonvalue.dumps(value) == written


_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
_values = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


@settings(max_examples=300, deadline=None)
@given(value=_values)
def test_dumps_refuses_exactly_the_values_holding_a_non_finite_float(value: Any) -> None:
    if _non_finite(value):
        with pytest.raises(JsonError):
            jsonvalue.dumps(value)
    else:
        assert jsonvalue.loads(jsonvalue.dumps(value)) == value
