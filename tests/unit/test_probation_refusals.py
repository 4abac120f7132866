"""A reply that fails on the probation connection is counted as a forged ``reply_to`` only when the
broker refused it (``bridge.transport.replies``); the refusal itself runs against the real broker
in tests/integration/test_security.py."""

from __future__ import annotations

import aiormq.exceptions

from bridge.transport.replies import _NotConfirmed, _refused_by_broker


def test_only_the_brokers_refusal_counts_as_a_forged_reply_to() -> None:
    """Every failure there was logged as "its requester sent a forged reply_to" and counted: a
    broker restart or a failover (every reply goes through probation until its node is proven
    again) read as a forgery per reply (found by review, 2026-12-07)."""
    refused = [
        aiormq.exceptions.ConnectionInternalError(541, "INTERNAL_ERROR"),
        aiormq.exceptions.ConnectionClosed(541, "INTERNAL_ERROR"),
        _NotConfirmed("the broker refused the reply (Nack)"),
    ]
    lost = [
        aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED - broker forced connection closure"),
        aiormq.exceptions.ChannelInvalidStateError("<Channel> closed"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ]
    assert all(_refused_by_broker(e) for e in refused)
    assert not any(_refused_by_broker(e) for e in lost)
