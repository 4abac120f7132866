"""Smoke tests of the two real servers themselves, without the bridge."""

from __future__ import annotations

import uuid

import aio_pika
import pytest

pytestmark = pytest.mark.integration


def test_cassandra_lightweight_transaction(cql):
    ks = f"qb_smoke_{uuid.uuid4().hex[:8]}"
    cql.execute(f"CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}")
    try:
        cql.execute(f"CREATE TABLE {ks}.t (k text PRIMARY KEY, v int)")
        insert = cql.prepare(f"INSERT INTO {ks}.t (k, v) VALUES (?, ?) IF NOT EXISTS")
        first = cql.execute(insert, ("a", 1))
        assert first.was_applied is True
        second = cql.execute(insert, ("a", 2))
        assert second.was_applied is False
        assert second.one()["v"] == 1  # the LWT reports the row that won
        assert cql.execute(f"SELECT v FROM {ks}.t WHERE k = 'a'").one()["v"] == 1
    finally:
        cql.execute(f"DROP KEYSPACE {ks}")


@pytest.mark.anyio
async def test_rabbitmq_persistent_publish_with_confirms_and_manual_ack(servers):
    conn = await aio_pika.connect_robust(servers.amqp_url("guest"))
    try:
        channel = await conn.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"qb-smoke-{uuid.uuid4().hex[:8]}", durable=True, auto_delete=True)
        confirm = await channel.default_exchange.publish(
            aio_pika.Message(b"hello", delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue.name
        )
        assert confirm is not None  # the broker confirmed the publish
        message = await queue.get(no_ack=False, timeout=5)
        assert message is not None
        assert message.body == b"hello"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        await message.ack()
        assert await queue.get(fail=False) is None  # acked: gone, not redelivered
        await queue.delete()
    finally:
        await conn.close()
