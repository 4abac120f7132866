"""The requester probe (``bridge.transport.liveness``) on the real broker: each probe is answered
for its own reply-to."""

from __future__ import annotations

import asyncio

import pytest

from bridge.domain.models import AddCommand
from tests.conftest import OWNERS, service_id, wait_for
from tests.integration.test_message_properties import long_poll_replying_to_a_server_named_queue

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_live_workers_probe_is_not_answered_by_a_gone_requesters_404(bridge, servers, names, workers):
    """Probes shared one channel, and a passive declare answered 404 (a requester gone) closes
    the channel: a live worker's probe sent beside it on that channel failed with the same 404, so
    its long-poll was taken for an orphan's and dropped with no reply. The worker waited out its
    client's timeout (40 s) while its task went to nobody (seen in W-fleet: a worker long-polling
    a queue while orphaned long-polls of another queue took re-exposed tasks). Here a gone
    requester's long-poll and a live worker's, on two queues, are handed a task at once."""
    gone_svc, live_svc = service_id(), service_id()
    conn = await long_poll_replying_to_a_server_named_queue(servers, names, gone_svc)  # 404 once gone
    waiting = lambda: sum(len(x.waiters) for x in bridge.hints._waiting.values())  # noqa: E731
    await wait_for(lambda: waiting() == 1, 10.0, what="the gone requester's long-poll waiting")
    await conn.close()  # the requester is gone, its reply queue with it

    live = await workers(live_svc, "alive")
    fetching = asyncio.create_task(live.fetch(wait_ms=10_000))
    await wait_for(lambda: waiting() == 2, 10.0, what="the live worker's long-poll waiting")
    gone_before = bridge.transport.probe.gone
    add = bridge.queue.add
    ids = await asyncio.gather(
        *(
            add(owner, AddCommand.model_validate({"serviceId": s, "value": s}), message_id=None, traceparent=None)
            for owner, s in (("guest", gone_svc), (OWNERS[0], live_svc))
        )
    )
    got = await asyncio.wait_for(fetching, 15.0)  # abandoned, it was never answered: a timeout here
    assert got is not None and got.id == ids[1], "the live worker's long-poll did not get its task"
    assert bridge.transport.probe.gone - gone_before == 1, "one requester gone: the other queue's"
    assert await got.ack("ok") is True
