"""The bridge's own broker user names the owner of the adds it moves to its retry lane (x-owner),
so the bridge trusts it for that: for adds alone. Trusted for every method, anyone holding the
bridge's credentials (the default guest, or a user shared with another component) fetched and
acked any tenant's tasks with an x-owner header (found by review, 2026-12-06; docs/security.md)."""

from __future__ import annotations

import pytest

from bridge.client.errors import UnauthorizedError
from bridge.client.rpc import Engine
from tests.conftest import BRIDGE_USER, OWNERS, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_the_bridges_own_user_may_not_fetch_for_another_owner(bridge, engine, servers, names):
    svc = service_id()
    await engine.add(svc, "tenant a's task")
    async with Engine(servers.amqp_url(BRIDGE_USER), owner=OWNERS[0], exchange=names["exchange"]) as as_bridge:
        with pytest.raises(UnauthorizedError):
            await as_bridge.call("fetch", {"serviceId": svc, "workerId": "intruder"}, owner=OWNERS[0])
        # ... while an add naming its owner is taken, as the retry lane's are.
        added = await as_bridge.call("add", {"serviceId": svc, "value": 2}, owner=OWNERS[0])
        assert "result" in added
