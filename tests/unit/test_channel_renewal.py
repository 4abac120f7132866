"""A publisher-confirm channel RabbitMQ nacks is renewed, at most once a period, and only for
nacks (``bridge.transport.renewal``); the renewal itself runs against the real broker in
tests/integration/test_channel_restore.py and test_rabbitmq_cluster.py."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
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


@pytest.mark.parametrize("services", [1, 50])
def test_a_queue_that_keeps_refusing_renews_the_channel_ever_less_often(services: int) -> None:
    """One tenant's results queue at its length limit with reject-publish (bound to one service,
    or to 50): its results nacked, each sent again by the relay every 10 s, every other tenant's
    confirmed. Each nack renewed the shared channel every 5 s, failing the other tenants' results
    in flight on it (found by review, 2026-12-07); so did a backoff per service (each started
    at 5 s: 659 renewals in an hour with 50 services, found by the re-review)."""
    now = [0.0]
    renewal, spawned = _renewal(now)
    for second in range(3_600):
        for n in range(services):
            if (second + n) % 10 == 0:  # each service's result sent again every 10 s
                now[0] = second + n / 1_000
                renewal.refused(NACK, f"results svc-{n}")
    # at 0, 5, 15, 35, 75, 155, 315, then every 300 s (615 ... 3315): 17
    assert 16 <= renewal.renewals <= 18 and len(spawned) == renewal.renewals, renewal.renewals
    assert RENEW_MAX_INTERVAL_S == 300.0


def test_nacks_after_a_quiet_spell_renew_at_the_shortest_wait_again() -> None:
    """A queue full for a quarter of an hour left the wait at 5 minutes; a RabbitMQ #9208 election
    a day later (a channel renewed during it is refused again) waited those 5 minutes for its
    second renewal instead of 5 s (found by the re-review, 2026-12-07)."""
    now = [0.0]
    renewal, _ = _renewal(now)
    for t in range(0, 900, 10):
        now[0] = float(t)
        renewal.refused(NACK, "results full")
    before = renewal.renewals
    for t in (100_000.0, 100_000.5, 100_005.0):
        now[0] = t
        renewal.refused(NACK, "results full")  # the same queue, its leader lost a day later
    assert renewal.renewals == before + 2  # at 100,000 and 100,005


def test_a_quorum_queue_refused_among_confirmed_ones_renews_the_channel_until_served() -> None:
    """RabbitMQ #9208 refuses one quorum queue on a channel while the others are served, and a
    channel renewed while the queue still elects its leader is refused again: the renewal 5 s
    later is served (the 3-node drill in test_rabbitmq_cluster.py). Counting nacks in a row over
    the channel (other queues' confirms reset it) never renewed it, and one renewal per
    destination until confirmed was too few (both found in 2026-12-07's review and CI)."""
    now = [0.0]
    renewal, spawned = _renewal(now)
    renewal.refused(NACK, "results svc-a")
    assert renewal.renewals == 1 and len(spawned) == 1
    for i in range(1, 51):  # refused again on the renewed channel, every 0.1 s
        now[0] = i * 0.1
        renewal.refused(NACK, "results svc-a")
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


def test_back_to_back_elections_each_get_their_second_renewal_5_s_after_the_first() -> None:
    """A rolling restart of the broker: an election a minute, each refusing the channel renewed
    during it until the renewal 5 s later. With a minute's quiet needed to start afresh, the
    second's second renewal came 20 s after its first, the third's 80 s (found by the re-review,
    2026-12-07)."""
    now = [0.0]
    renewal, _ = _renewal(now)
    renewed_at: list[float] = []
    for election in (0.0, 60.0, 120.0):
        for i in range(100):  # nacks every 0.1 s until a renewal 5 s or more after the first
            now[0] = election + i * 0.1
            before = renewal.renewals
            renewal.refused(NACK, "results q")
            if renewal.renewals > before:
                renewed_at.append(now[0])
                if now[0] - election >= RENEW_MIN_INTERVAL_S:
                    break  # served: no nack after it
    assert [round(t - e, 1) for t, e in zip(renewed_at, (0, 0, 60, 60, 120, 120), strict=True)] == [0, 5] * 3


def test_a_full_queue_drained_slowly_keeps_the_wait_growing() -> None:
    """Its consumer takes a message whenever a slot frees: some publishes to it confirmed among
    the nacks. A reset of the wait at such a confirm (tried) renewed every 5-10 s again: 200
    renewals in 1,000 s (found by the re-review, 2026-12-07). Nacks every 0.5 s."""
    now = [0.0]
    renewal, _ = _renewal(now)
    for step in range(2_000):
        now[0] = step * 0.5
        renewal.refused(NACK, "results full")
    assert renewal.renewals <= 10, renewal.renewals  # 0, 5, 15, 35, 75, 155, 315, 615, 915


def test_an_election_after_a_full_queue_drained_gets_its_second_renewal_5_s_after_its_first() -> None:
    """A queue full for a quarter of an hour left the wait at 5 minutes; an election 100 s after
    it drained needed quiet as long as that wait to start afresh: its second renewal came 5
    minutes after its first (found by the re-review, 2026-12-07). Quiet is enough after 90 s."""
    now = [0.0]
    renewal, _ = _renewal(now)
    for second in range(900):  # nacks every second: full
        now[0] = float(second)
        renewal.refused(NACK, "results full")
    before = renewal.renewals
    renewed_at: list[float] = []
    for i in range(100):  # drained at 899; an election at 1,000: nacks every 0.1 s
        now[0] = 1_000 + i * 0.1
        renewal.refused(NACK, "results elected")
        if renewal.renewals > before + len(renewed_at):
            renewed_at.append(round(now[0] - 1_000, 1))
    assert renewed_at[:2] == [0.0, 5.0], renewed_at


def test_a_full_queue_reached_only_by_the_relays_retries_backs_off_to_5_minutes() -> None:
    """The relay retries a bucket owing results 1 s, 2 s, 4 s ... up to 60 s apart (and its sweep
    runs every second): each retry's publish nacked."""
    now = [0.0]
    renewal, _ = _renewal(now)
    at, backoff = 0.0, 1.0
    renewed_at: list[float] = []
    while at < 3_600:
        now[0] = at
        before = renewal.renewals
        renewal.refused(NACK, "results full")
        if renewal.renewals > before:
            renewed_at.append(at)
        at += backoff + 1.0
        backoff = min(backoff * 2, 60.0)
    late = [b - a for a, b in itertools.pairwise(renewed_at) if a > 600]
    assert late and min(late) >= RENEW_MAX_INTERVAL_S - 1, renewed_at  # every 5 minutes, not every retry
