"""A publisher-confirm channel RabbitMQ nacks is renewed, at most once a period, and only for
nacks (``bridge.transport.renewal``); the renewal itself runs against the real broker in
tests/integration/test_channel_restore.py and test_rabbitmq_cluster.py."""

from __future__ import annotations

from typing import Any

from aiormq.abc import DeliveredMessage
from aiormq.exceptions import DeliveryError, PublishError
from pamqp import commands

from bridge.transport.renewal import RENEW_MAX_INTERVAL_S, RENEW_MIN_INTERVAL_S, ChannelRenewal, nacked


class _Done:
    def done(self) -> bool:
        return True


def _renewal(now: list[float]) -> tuple[ChannelRenewal, list[Any]]:
    spawned: list[Any] = []

    def spawn(work: Any) -> Any:
        work.close()  # not run here: only that a renewal was started
        spawned.append(work)
        return _Done()

    return ChannelRenewal("results", lambda: None, spawn, clock=lambda: now[0]), spawned


NACK = DeliveryError(None, commands.Basic.Nack(delivery_tag=1))


def test_a_nack_renews_the_channel_at_most_once_a_period() -> None:
    now = [100.0]
    renewal, spawned = _renewal(now)
    for i in range(50):  # a nack every 0.1 s for 5 s, each to another destination
        now[0] = 100.0 + i * 0.1
        renewal.refused(NACK, f"svc-{i}")
    assert renewal.renewals == 1 and len(spawned) == 1
    now[0] = 100.0 + RENEW_MIN_INTERVAL_S + 0.01
    renewal.refused(NACK, "svc-x")
    assert renewal.renewals == 2


def test_a_destination_still_refused_on_renewed_channels_renews_them_ever_less_often() -> None:
    """One tenant's results queue at its length limit with reject-publish: its results nacked,
    every other tenant's confirmed. Each nack renewed the shared channel every 5 s, failing the
    other tenants' results in flight on it (found by review, 2026-12-07). A destination refused
    again after a renewal made for it waits twice as long for the next, up to 5 minutes."""
    now = [0.0]
    renewal, spawned = _renewal(now)
    for i in range(1_000):  # a nack a second for 1,000 s
        now[0] = float(i)
        renewal.refused(NACK, "full-queue")
        renewal.confirmed("other-tenant")
    # at 0, 5, 15, 35, 75, 155, 315 (the interval now at its cap), 615, 915
    assert renewal.renewals == 9 and len(spawned) == 9
    assert RENEW_MAX_INTERVAL_S == 300.0


def test_a_destination_confirmed_again_renews_at_its_next_nack() -> None:
    now = [0.0]
    renewal, _ = _renewal(now)
    for t in (0.0, 5.0, 15.0):
        now[0] = t
        renewal.refused(NACK, "full-queue")
    assert renewal.renewals == 3
    renewal.confirmed("full-queue")  # drained: served again
    now[0] = 20.0  # 5 s after the last renewal, where the backoff would have wanted 35
    renewal.refused(NACK, "full-queue")
    assert renewal.renewals == 4


def test_a_quorum_queue_refused_among_confirmed_ones_renews_the_channel_until_served() -> None:
    """RabbitMQ #9208 refuses one quorum queue on a channel while the others are served, and a
    channel renewed while the queue still elects its leader is refused again: the renewal 5 s
    later is served (the 3-node drill in test_rabbitmq_cluster.py). Counting nacks in a row over
    the channel (other queues' confirms reset it) never renewed it, and one renewal per
    destination until confirmed was too few (both found in 2026-12-07's review and CI)."""
    now = [0.0]
    renewal, spawned = _renewal(now)
    renewal.confirmed("svc-b")
    renewal.refused(NACK, "svc-a")
    assert renewal.renewals == 1 and len(spawned) == 1
    for i in range(1, 51):  # refused again on the renewed channel, every 0.1 s
        now[0] = i * 0.1
        renewal.confirmed("svc-b")
        renewal.refused(NACK, "svc-a")
    assert renewal.renewals == 2  # at 5 s


def test_only_a_nack_renews_the_channel() -> None:
    returned = PublishError(
        DeliveredMessage(
            delivery=commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="x", routing_key="k"),
            header=None,  # type: ignore[arg-type]
            body=b"",
            channel=None,  # type: ignore[arg-type]
        ),
        commands.Basic.Return(),
    )
    others = [returned, DeliveryError(None, commands.Basic.Ack(delivery_tag=1)), TimeoutError(), RuntimeError("x")]
    assert nacked(NACK) and not any(nacked(e) for e in others)
    now = [0.0]
    renewal, spawned = _renewal(now)
    for exc in others:
        renewal.refused(exc, "k")
    assert renewal.renewals == 0 and not spawned
