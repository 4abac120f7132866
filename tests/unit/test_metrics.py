"""BridgeMetrics: the inc-name table covers every name the domain code uses, and the exposition is right."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from bridge.domain.scheduler import SchedulerState
from bridge.observability.metrics import REQUEST_BUCKETS, ROUTES, BridgeMetrics

DOMAIN = Path(__file__).resolve().parents[2] / "bridge" / "domain"

# The names the queue's Metrics protocol documents (bridge/domain/queue.py, scheduler.py).
DOCUMENTED = {
    "tasks_added",
    "adds_deduplicated",
    "adds_entered_again",
    "tasks_delivered",
    "tasks_redelivered",
    "claim_conflicts",
    "claims",
    "claims_refiled",
    "tasks_completed",
    "tasks_dead_lettered",
    "results_published",
    "results_republished",
    "results_left_to_relay",
    "results_dropped",
    "tasks_recovered",
    "leases_refused",
    "acks_without_task_id",
    "acks_refused",
    "deliveries_failed",
}

EXPECTED_COUNTERS = {
    "tasks_added": ("queue_bridge_tasks_added_total", ()),
    "adds_deduplicated": ("queue_bridge_tasks_deduplicated_total", ()),
    "adds_entered_again": ("queue_bridge_tasks_entered_again_total", ()),
    "tasks_delivered": ("queue_bridge_tasks_delivered_total", ()),
    "tasks_redelivered": ("queue_bridge_tasks_redelivered_total", ("kind",)),
    "tasks_recovered": ("queue_bridge_tasks_recovered_total", ()),
    "tasks_completed": ("queue_bridge_tasks_completed_total", ("outcome",)),
    "tasks_dead_lettered": ("queue_bridge_tasks_dead_lettered_total", ("reason",)),
    "claim_conflicts": ("queue_bridge_claim_conflicts_total", ()),
    "claims_stale": ("queue_bridge_claims_stale_total", ()),
    "long_polls_abandoned": ("queue_bridge_long_polls_abandoned_total", ()),
    "adds_deferred": ("queue_bridge_adds_deferred_total", ()),
    "claims": ("queue_bridge_claims_total", ("source", "outcome")),
    "claims_refiled": ("queue_bridge_claims_refiled_total", ()),
    "hint_payloads_refused": ("queue_bridge_hint_payloads_refused_total", ()),
    "acks_named_fast": ("queue_bridge_acks_named_fast_total", ()),
    "results_published": ("queue_bridge_results_published_total", ()),
    "results_republished": ("queue_bridge_results_republished_total", ()),
    "results_left_to_relay": ("queue_bridge_results_left_to_relay_total", ()),
    "results_dropped": ("queue_bridge_results_dropped_total", ("reason",)),
    "count_updates_uncertain": ("queue_bridge_count_updates_uncertain_total", ()),
    "leases_refused": ("queue_bridge_leases_refused_total", ("reason",)),
    "acks_without_task_id": ("queue_bridge_acks_without_task_id_total", ()),
    "acks_refused": ("queue_bridge_acks_refused_total", ("reason",)),
    "requests_expired": ("queue_bridge_requests_expired_total", ("method",)),
    "deliveries_failed": ("queue_bridge_deliveries_failed_total", ("reason",)),
    "amqp_channels_lost": ("queue_bridge_amqp_channels_lost_total", ("channel",)),
    "tasks_due": ("queue_bridge_tasks_due_total", ()),
    "leases_extended": ("queue_bridge_leases_extended_total", ("outcome",)),
    "tasks_failed": ("queue_bridge_tasks_failed_total", ()),
    "tasks_parked": ("queue_bridge_tasks_parked_total", ("reason",)),
    "tasks_redriven": ("queue_bridge_tasks_redriven_total", ()),
    "tasks_discarded": ("queue_bridge_tasks_discarded_total", ()),
    "tasks_cancelled": ("queue_bridge_tasks_cancelled_total", ()),
    "tasks_purged": ("queue_bridge_tasks_purged_total", ()),
}


def _string_constants(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _string_constants(node.body) + _string_constants(node.orelse)
    raise AssertionError(f"metrics.inc called with a non-literal name at line {node.lineno}: keep names literal")


def domain_inc_calls() -> dict[str, set[str]]:
    """Every ``<...>.metrics.inc(name, ..., **labels)`` in bridge/domain: name -> label names passed."""
    found: dict[str, set[str]] = {}
    for path in sorted(DOMAIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "inc"):
                continue
            receiver = node.func.value
            if not (isinstance(receiver, ast.Attribute) and receiver.attr == "metrics"):
                continue
            labels = {kw.arg for kw in node.keywords if kw.arg is not None}
            for name in _string_constants(node.args[0]):
                found.setdefault(name, set()).update(labels)
    return found


@pytest.fixture
def metrics() -> BridgeMetrics:
    return BridgeMetrics(instance="test-1", version="9.9.9")


def value(m: BridgeMetrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_the_scan_finds_the_documented_names() -> None:
    assert set(domain_inc_calls()) >= DOCUMENTED


def test_every_name_the_domain_uses_is_routed_and_counted(metrics: BridgeMetrics) -> None:
    calls = domain_inc_calls()
    missing = set(calls) - set(ROUTES)
    assert not missing, f"metrics.inc names without a route in ROUTES: {sorted(missing)}"
    for name, label_names in calls.items():
        # Call exactly as the domain code does (same label names).
        metrics.inc(name, **{label: "x" for label in label_names})
        metrics.inc(name, 2.0, **{label: "x" for label in label_names})
    for name in calls:
        route = ROUTES[name]
        kept = {label: "x" for label in route.labels}
        assert value(metrics, f"queue_bridge_{route.metric}_total", **kept) == 3.0, name


def test_routes_match_the_documented_metric_names(metrics: BridgeMetrics) -> None:
    assert set(ROUTES) == set(EXPECTED_COUNTERS)
    for name, (metric, labels) in EXPECTED_COUNTERS.items():
        assert f"queue_bridge_{ROUTES[name].metric}_total" == metric
        assert ROUTES[name].labels == labels
        assert "owner" not in ROUTES[name].labels


def test_labelled_counters_keep_their_labels(metrics: BridgeMetrics) -> None:
    metrics.inc("tasks_redelivered", kind="claim")
    metrics.inc("tasks_redelivered", kind="resend")
    metrics.inc("tasks_redelivered", kind="resend")
    metrics.inc("tasks_completed", outcome="result")
    metrics.inc("tasks_completed", outcome="error")
    metrics.inc("tasks_dead_lettered", reason="integrity")
    metrics.inc("results_dropped", reason="integrity")
    metrics.inc("tasks_delivered", kind="claim")  # kind is dropped on this counter
    assert value(metrics, "queue_bridge_tasks_redelivered_total", kind="claim") == 1
    assert value(metrics, "queue_bridge_tasks_redelivered_total", kind="resend") == 2
    assert value(metrics, "queue_bridge_tasks_completed_total", outcome="result") == 1
    assert value(metrics, "queue_bridge_tasks_completed_total", outcome="error") == 1
    assert value(metrics, "queue_bridge_tasks_dead_lettered_total", reason="integrity") == 1
    assert value(metrics, "queue_bridge_results_dropped_total", reason="integrity") == 1
    assert value(metrics, "queue_bridge_tasks_delivered_total") == 1


def test_unknown_names_and_labels_raise(metrics: BridgeMetrics) -> None:
    with pytest.raises(KeyError):
        metrics.inc("tasks_addded")
    with pytest.raises(KeyError):
        metrics.inc("tasks_added", owner="worker-a")  # never an owner label
    with pytest.raises(KeyError):
        metrics.inc("tasks_completed")  # outcome is required
    with pytest.raises(KeyError):
        metrics.inc("tasks_completed", outcome="result", reason="x")


def test_observe_counts_requests_and_durations(metrics: BridgeMetrics) -> None:
    metrics.observe("fetch", "ok", 0.0004)
    metrics.observe("fetch", "ok", 0.003)
    metrics.observe("fetch", "unavailable", 6.0)
    metrics.observe("add", "bad_request", 0.02)
    metrics.observe("unknown", "bad_request", 0.0)
    metrics.observe("something-else", "Weird Outcome!", 0.01)  # bounded: becomes unknown / other
    assert value(metrics, "queue_bridge_requests_total", method="fetch", outcome="ok") == 2
    assert value(metrics, "queue_bridge_requests_total", method="fetch", outcome="unavailable") == 1
    assert value(metrics, "queue_bridge_requests_total", method="add", outcome="bad_request") == 1
    assert value(metrics, "queue_bridge_requests_total", method="unknown", outcome="bad_request") == 1
    assert value(metrics, "queue_bridge_requests_total", method="unknown", outcome="other") == 1
    h = "queue_bridge_request_duration_seconds"
    assert value(metrics, f"{h}_count", method="fetch") == 3
    assert value(metrics, f"{h}_bucket", method="fetch", le="0.0005") == 1
    assert value(metrics, f"{h}_bucket", method="fetch", le="0.005") == 2
    assert value(metrics, f"{h}_bucket", method="fetch", le="5.0") == 2
    assert value(metrics, f"{h}_bucket", method="fetch", le="+Inf") == 3
    assert value(metrics, f"{h}_sum", method="fetch") == pytest.approx(6.0034)
    assert REQUEST_BUCKETS[0] == 0.0005
    assert REQUEST_BUCKETS[-1] >= 30.0  # a long-poll fetch (waitMs up to 30 s) lands in a finite bucket


@dataclass
class FakeCache:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0


def test_key_cache_counters_are_read_at_scrape_time(metrics: BridgeMetrics) -> None:
    assert metrics.registry.get_sample_value("queue_bridge_key_cache_hits_total") is None  # not bound yet
    cache = FakeCache(hits=5, misses=2, coalesced=1)
    metrics.bind_key_cache(cache)
    assert value(metrics, "queue_bridge_key_cache_hits_total") == 5
    assert value(metrics, "queue_bridge_key_cache_misses_total") == 2
    assert value(metrics, "queue_bridge_key_cache_coalesced_total") == 1
    cache.hits += 10
    cache.misses += 1
    assert value(metrics, "queue_bridge_key_cache_hits_total") == 15
    assert value(metrics, "queue_bridge_key_cache_misses_total") == 3


def test_key_cache_without_coalesced_counter() -> None:
    @dataclass
    class Minimal:
        hits: int = 1
        misses: int = 2

    m = BridgeMetrics(instance="i", key_cache=Minimal())
    assert value(m, "queue_bridge_key_cache_hits_total") == 1
    assert m.registry.get_sample_value("queue_bridge_key_cache_coalesced_total") is None


def test_scheduler_gauges_follow_the_state() -> None:
    now = [1000.0]
    state = SchedulerState(last_tick_monotonic=998.5, lag_ms=250)
    m = BridgeMetrics(instance="i", scheduler=state, monotonic=lambda: now[0])
    assert value(m, "queue_bridge_scheduler_lag_seconds") == pytest.approx(0.25)
    assert value(m, "queue_bridge_scheduler_last_tick_age_seconds") == pytest.approx(1.5)
    state.last_tick_monotonic = 1000.0
    state.lag_ms = 0
    now[0] = 1000.2
    assert value(m, "queue_bridge_scheduler_lag_seconds") == 0
    assert value(m, "queue_bridge_scheduler_last_tick_age_seconds") == pytest.approx(0.2)


def test_results_pending_and_info(metrics: BridgeMetrics) -> None:
    metrics.set_results_pending(7)
    assert value(metrics, "queue_bridge_results_pending") == 7
    metrics.set_results_pending(0)
    assert value(metrics, "queue_bridge_results_pending") == 0
    assert value(metrics, "queue_bridge_info", version="9.9.9", instance="test-1") == 1


def test_default_version_is_the_package_version() -> None:
    m = BridgeMetrics(instance="i")
    text = m.render().decode()
    assert 'queue_bridge_info{instance="i",version="' in text


def test_each_bridge_has_its_own_registry() -> None:
    a = BridgeMetrics(instance="a", key_cache=FakeCache(hits=1), scheduler=SchedulerState())
    b = BridgeMetrics(instance="b", key_cache=FakeCache(hits=2), scheduler=SchedulerState())
    a.inc("tasks_added")
    assert value(a, "queue_bridge_tasks_added_total") == 1
    assert value(b, "queue_bridge_tasks_added_total") == 0
    assert value(b, "queue_bridge_key_cache_hits_total") == 2
    assert REGISTRY.get_sample_value("queue_bridge_tasks_added_total") is None


def test_exposition_has_every_metric_name() -> None:
    m = BridgeMetrics(instance="i", key_cache=FakeCache(), scheduler=SchedulerState())
    m.inc("tasks_redelivered", kind="claim")
    m.observe("ack", "ok", 0.01)
    text = m.render().decode()
    for metric, _ in EXPECTED_COUNTERS.values():
        assert f"# TYPE {metric} counter" in text
    for name in (
        "queue_bridge_requests_total",
        "queue_bridge_request_duration_seconds_bucket",
        "queue_bridge_key_cache_hits_total",
        "queue_bridge_key_cache_misses_total",
        "queue_bridge_scheduler_lag_seconds",
        "queue_bridge_scheduler_last_tick_age_seconds",
        "queue_bridge_results_pending",
        "queue_bridge_info",
    ):
        assert name in text, name
    assert 'queue_bridge_tasks_redelivered_total{kind="claim"} 1.0' in text


def test_the_key_ring_gauge_is_refreshed_as_it_is_scraped(tmp_path: Path) -> None:
    """`queue_bridge_keyring_file_rejected` was refreshed only by a key lookup: an idle bridge
    reported a broken file's state at the last lookup. Each scrape checks the file (once a second
    at most); a file put back as it was is the key-ring in use again (a re-review, 2026-12-07)."""
    from bridge.crypto import CachingKeyProvider, KeyringFileProvider, generate_keyring, write_keyring

    path = tmp_path / "keyring.json"
    write_keyring(path, generate_keyring(["acme"]))
    good = path.read_bytes()
    now = [0.0]
    ring = KeyringFileProvider(path, clock=lambda: now[0])
    m = BridgeMetrics(instance="i", key_cache=CachingKeyProvider(ring))
    assert m.registry.get_sample_value("queue_bridge_keyring_file_rejected") == 0
    path.write_bytes(good + b",")  # broken
    now[0] += 2
    assert m.registry.get_sample_value("queue_bridge_keyring_file_rejected") == 1  # no lookup made
    path.write_bytes(good)  # put back
    now[0] += 2
    assert m.registry.get_sample_value("queue_bridge_keyring_file_rejected") == 0


def test_the_key_ring_in_use_is_named_by_a_digest_that_changes_with_its_key_ids(tmp_path: Path) -> None:
    """Before `keyring promote` an operator checks that every bridge loaded the staged key: only the
    logs said so (found by review, 2026-12-07). The digest names the owners' key ids and current
    ids, never a secret: a staged key changes it, a promote changes it again."""
    from bridge.crypto import CachingKeyProvider, KeyringFileProvider, generate_keyring, write_keyring
    from bridge.crypto.keyring_file import rotate_keyring

    path = tmp_path / "keyring.json"
    doc = generate_keyring(["acme", "globex"])
    write_keyring(path, doc)
    now = [0.0]
    m = BridgeMetrics(instance="i", key_cache=CachingKeyProvider(KeyringFileProvider(path, clock=lambda: now[0])))

    def loaded() -> dict[str, float]:
        text = generate_latest(m.registry).decode()
        found = re.findall(r'^queue_bridge_keyring_loaded_info\{digest="([0-9a-f]{12})"\} (\S+)$', text, re.M)
        assert all(secret not in text for o in doc["owners"].values() for secret in o["keys"].values())
        return {digest: float(value) for digest, value in found}

    first = loaded()
    assert list(first.values()) == [2.0]
    rotate_keyring(doc, "acme")  # a new key, current
    write_keyring(path, doc)
    now[0] += 2
    second = loaded()
    assert list(second.values()) == [3.0] and second.keys() != first.keys()
