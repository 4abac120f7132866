"""A publisher-confirm channel RabbitMQ nacks is renewed, at most once a period, and only for
nacks (``bridge.transport.renewal``); the renewal itself runs against the real broker in
tests/integration/test_channel_restore.py and test_rabbitmq_cluster.py."""

from __future__ import annotations

from typing import Any

from aiormq.abc import DeliveredMessage
from aiormq.exceptions import DeliveryError, PublishError
from pamqp import commands

from bridge.transport.renewal import RENEW_MIN_INTERVAL_S, ChannelRenewal, nacked


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
    for i in range(50):  # a nack every 0.1 s for 5 s
        now[0] = 100.0 + i * 0.1
        renewal.refused(NACK)
    assert renewal.renewals == 1 and len(spawned) == 1
    now[0] = 100.0 + RENEW_MIN_INTERVAL_S + 0.01
    renewal.refused(NACK)
    assert renewal.renewals == 2


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
        renewal.refused(exc)
    assert renewal.renewals == 0 and not spawned
