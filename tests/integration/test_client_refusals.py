"""Requests the bridge can only refuse, sent by the Python client over and over or into the
dead-letter queue with nobody told (found by review), against the real servers:

* ``Task.keep_alive`` of a worker whose owner has no key: every beat was answered
  ``unknown_owner`` (each extend dead-lettered), logged, and sent again, a third of the lease
  later, then every 0.1 s; :attr:`Task.lost` never set. The first such answer now ends the
  heartbeat and marks the task lost, as ``Worker.run`` ends on it.
* ``Engine.add(..., wait=False)`` with an idempotency key the bridge refuses (over 255
  characters, a control character): published, dead-lettered by the bridge, and nobody told.
  Now a ValueError, and nothing reaches RabbitMQ.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from bridge.client import Task, Worker
from tests.client_time import iso_in
from tests.conftest import ENGINE_USER, OWNERS, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_keep_alive_of_a_worker_whose_owner_has_no_key_stops_at_the_first_refusal(
    make_bridge, servers, names, tmp_path
):
    from bridge.crypto import generate_keyring, write_keyring

    keyring = tmp_path / "only-a.json"
    write_keyring(keyring, generate_keyring([OWNERS[0], ENGINE_USER]))  # worker-b has no key
    await make_bridge(keyring=str(keyring))
    async with Worker(servers.amqp_url(OWNERS[1]), service="s", worker_id="w", exchange=names["exchange"]) as w:
        extends: list[Any] = []
        answers: list[str] = []
        real_call = w.call

        async def call(method: str, body: Any, **kw: Any) -> dict[str, Any]:
            if method == "extend":
                extends.append(body)
            try:
                return await real_call(method, body, **kw)
            except Exception as exc:
                answers.append(getattr(exc, "code", type(exc).__name__))
                raise

        w.call = call  # type: ignore[method-assign]
        # A lease of 1.5 s, renewed to 1.5 s: a beat every 0.5 s at first, then ever quicker.
        task = Task(w, str(uuid.uuid1()), None, 1, iso_in(1.5), {}, 1, False, 1_500)
        async with task.keep_alive():
            await asyncio.sleep(3.0)
    assert answers[:1] == ["unknown_owner"], answers
    assert len(extends) == 1, f"{len(extends)} extends sent, each refused unknown_owner: {answers}"
    assert task.lost


@pytest.mark.parametrize("key", ["k" * 256, "bad\nkey"], ids=["256-chars", "newline"])
async def test_an_add_without_wait_and_a_key_the_bridge_refuses_is_refused_before_it_is_sent(
    bridge, engine, workers, dead_letters, key
):
    svc = service_id()
    with pytest.raises(ValueError, match="message_id"):
        await asyncio.wait_for(engine.add(svc, "refused", message_id=key, wait=False), 15)
    assert await dead_letters.drain(1, timeout=3.0) == [], "the add was sent, and dead-lettered"
    # The same add with a key the bridge takes is stored (nothing else was wrong with it).
    assert (
        await asyncio.wait_for(engine.add(svc, "taken", message_id=key[:255].replace("\n", " "), wait=False), 15)
        is None
    )
    w = await workers(svc)
    task = None
    for _ in range(50):
        if (task := await w.fetch()) is not None:
            break
        await asyncio.sleep(0.1)
    assert task is not None and task.value == "taken"
    assert await task.ack("ok") is True
    assert await w.fetch() is None
