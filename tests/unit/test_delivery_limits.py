"""Which delivery limit a queue gets (BRIDGE_MAX_DELIVERIES, BRIDGE_SERVICE_MAX_DELIVERIES, a
task's own maxDeliveries): pure logic, with the setting parsed as the bridge parses it."""

from __future__ import annotations

import re

import pytest

from bridge.config import Settings
from bridge.domain.context import Limits
from bridge.domain.records import QueueKey


def _limits(monkeypatch: pytest.MonkeyPatch, per_service: str) -> Limits:
    monkeypatch.setenv("BRIDGE_SERVICE_MAX_DELIVERIES", per_service)
    settings = Settings()
    return Limits(
        max_value_bytes=settings.max_value_bytes,
        default_ttr_ms=settings.default_time_to_recover_ms,
        max_ttr_ms=settings.max_time_to_recover_ms,
        max_deliveries=settings.max_deliveries,
        service_max_deliveries=settings.service_max_deliveries,
    )


def test_an_owners_own_map_names_one_queue_where_a_key_with_a_slash_names_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """``{"reports/daily": 3}`` is owner reports's service daily and also the service named
    "reports/daily" of every owner: an operator could not limit only one of them (found by
    review). ``{"reports": {"daily": 3}}`` names owner reports's service daily alone."""
    flat = _limits(monkeypatch, '{"reports/daily": 3}')
    assert flat.delivery_limit(QueueKey("reports", "daily"), None) == 3
    assert flat.delivery_limit(QueueKey("alice", "reports/daily"), None) == 3  # the known ambiguity
    exact = _limits(monkeypatch, '{"reports": {"daily": 3}}')
    assert exact.delivery_limit(QueueKey("reports", "daily"), None) == 3
    assert exact.delivery_limit(QueueKey("alice", "reports/daily"), None) == 10
    assert exact.delivery_limit(QueueKey("reports", "weekly"), None) == 10
    # A service named as an owner whose map is given gets no limit from that map.
    assert exact.delivery_limit(QueueKey("alice", "reports"), None) == 10


def test_the_most_exact_limit_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = _limits(monkeypatch, '{"daily": 2, "reports/daily": 3, "reports": {"daily": 4}}')
    assert limits.delivery_limit(QueueKey("reports", "daily"), None) == 4
    assert limits.delivery_limit(QueueKey("reports", "daily"), 7) == 7  # the task's own wins
    assert limits.delivery_limit(QueueKey("alice", "daily"), None) == 2
    both = _limits(monkeypatch, '{"daily": 2, "reports/daily": 3}')
    assert both.delivery_limit(QueueKey("reports", "daily"), None) == 3


@pytest.mark.parametrize("bad", ['{"reports": {"daily": 0}}', '{"reports": {"daily": {"x": 1}}}', '{"r": [1]}'])
def test_an_owners_map_is_checked_as_the_flat_limits_are(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("BRIDGE_SERVICE_MAX_DELIVERIES", bad)
    with pytest.raises(ValueError, match="service_max_deliveries"):
        Settings()


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ('{"billing": 0}', "'billing': 0 is not a delivery limit"),
        ('{"reports": {"daily": 0}}', "'reports': {'daily': 0}"),
        ('{"a": true}', "'a': true or false is not a delivery limit"),
        ('{"": 3}', "'' names no queue"),
        ('{"reports": {"": 3}}', "an empty service names no queue"),
    ],
)
def test_a_bad_limit_is_named_by_its_key(monkeypatch: pytest.MonkeyPatch, bad: str, said: str) -> None:
    """The union of a limit and an owner's map made pydantic say two errors naming neither key."""
    monkeypatch.setenv("BRIDGE_SERVICE_MAX_DELIVERIES", bad)
    with pytest.raises(ValueError, match=re.escape(said)):
        Settings()


def test_a_key_given_twice_is_refused_not_the_first_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """``{"reports": 5, "reports": {"daily": 3}}`` kept the owner's map and silently dropped the
    limit of every owner's service ``reports`` (found by review, 2026-12-07)."""
    monkeypatch.setenv("BRIDGE_SERVICE_MAX_DELIVERIES", '{"reports": 5, "reports": {"daily": 3}}')
    with pytest.raises(ValueError, match="'reports' is given twice"):
        Settings()


def test_a_quoted_or_decimal_limit_loads_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """A template that quotes its numbers (``"3"``) loaded before the keys were checked one by one,
    and still does (found by review, 2026-12-07: a check of its own refused it, a bridge that
    would not start after an upgrade)."""
    limits = _limits(monkeypatch, '{"billing": "3", "reports": {"daily": 4.0}}')
    assert limits.delivery_limit(QueueKey("o", "billing"), None) == 3
    assert limits.delivery_limit(QueueKey("reports", "daily"), None) == 4


def test_ids_that_begin_or_end_with_a_slash_can_be_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    """Owner and service ids may begin or end with "/": such keys were refused as naming no queue
    (found by re-review, 2026-12-07), and an owner "/acme" could get no limit of its own."""
    limits = _limits(monkeypatch, '{"/acme": {"billing": 3}, "/daily": 4}')
    assert limits.delivery_limit(QueueKey("/acme", "billing"), None) == 3
    assert limits.delivery_limit(QueueKey("o", "/daily"), None) == 4
