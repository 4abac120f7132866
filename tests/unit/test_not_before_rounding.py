"""A ``notBefore`` with more precision than a millisecond is never due early
(``bridge.domain.models.instant``, ``AddCommand.due_ms``)."""

from __future__ import annotations

from bridge.domain.models import AddCommand, instant, parse

SECOND_MS = instant("2026-12-02T10:00:00Z")


def test_a_sub_millisecond_not_before_is_due_at_the_next_millisecond() -> None:
    add = parse(AddCommand, {"serviceId": "s", "value": 1, "notBefore": "2026-12-02T10:00:00.0009Z"})
    assert add.due_ms(SECOND_MS - 1) == SECOND_MS + 1
    assert add.due_ms(SECOND_MS) == SECOND_MS + 1  # not due at .000: that is before .0009


def test_a_whole_millisecond_is_not_moved() -> None:
    add = parse(AddCommand, {"serviceId": "s", "value": 1, "notBefore": "2026-12-02T10:00:00.123+00:00"})
    assert add.due_ms(0) == SECOND_MS + 123
    assert instant("2026-12-02T10:00:00.123999Z") == SECOND_MS + 123  # a bound elsewhere: as written, floored
    assert instant("2026-12-02T10:00:00.123999Z", round_up=True) == SECOND_MS + 124


def test_a_fraction_of_the_last_millisecond_is_refused_when_the_add_is_read() -> None:
    """Rounded up, it is past the last time the contract names: refused as the add is parsed, not
    accepted there and refused (as ``internal`` or a contradicting ``bad_request``) when stored."""
    import pytest

    from bridge.domain.errors import BadRequest

    with pytest.raises(BadRequest, match="notBefore: "):
        parse(AddCommand, {"serviceId": "s", "value": 1, "notBefore": "9999-12-31T23:59:59.9995Z"})
    add = parse(AddCommand, {"serviceId": "s", "value": 1, "notBefore": "9999-12-31T23:59:59.999Z"})
    assert add.due_ms(0) == instant("9999-12-31T23:59:59.999Z")
