"""A copy of a cancel (RabbitMQ's redelivery after the bridge that applied it died before its
reply, or a caller's resend with the same message-id) answers true, as its first copy did: the
cancel's completion id is derived from the request's id (docs/asyncapi.yaml, cancel)."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import OWNERS, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_cancel_sent_twice_with_one_message_id_answers_true_twice(make_bridge, engine):
    await make_bridge()
    await make_bridge()  # two bridges: the copy may be taken by either
    svc = service_id()
    task_id = await engine.add(svc, "v")
    body = {"serviceId": svc, "taskId": task_id}
    mid = uuid.uuid4().hex
    first = await engine.call("cancel", body, owner=OWNERS[0], message_id=mid)
    again = await engine.call("cancel", body, owner=OWNERS[0], message_id=mid)
    assert first["result"] is True and again["result"] is True
    # Another request (its own message-id, or none: its correlation-id) is told the truth.
    assert (await engine.call("cancel", body, owner=OWNERS[0], message_id=uuid.uuid4().hex))["result"] is False
    assert (await engine.call("cancel", body, owner=OWNERS[0]))["result"] is False


async def test_engine_cancel_resent_with_its_request_id_answers_true_again(make_bridge, engine):
    await make_bridge()
    svc = service_id()
    task_id = await engine.add(svc, "v")
    rid = uuid.uuid4().hex * 10  # longer than an AMQP message-id may be: sent as its digest
    assert await engine.cancel(svc, task_id, request_id=rid) is True
    assert await engine.cancel(svc, task_id, request_id=rid) is True  # the retry after a lost reply
    assert await engine.cancel(svc, task_id) is False
