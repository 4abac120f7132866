"""The parked listing, a page at a time (contract 1.11), against the real servers.

A request lists at most 1,000 tasks (the contract's most), and before 1.11 nothing went past them:
an incident that parked 5,000 tasks showed an operator the first 1,000 (the CLI said "more", and
could not list them). A reply that stopped short of the index's end now says where (``after``);
sent back, the next page starts there, and the pages together list every parked task once.
"""

from __future__ import annotations

import pytest

from bridge.client import BadRequestError
from tests.conftest import service_id
from tests.integration.test_lifecycle import call
from tests.integration.test_redrive_all import park_each_once

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_pages_sent_back_list_every_parked_task_once(bridge, engine, workers):
    svc = service_id()
    ids = await park_each_once(engine, workers, svc, 7)
    pages = []
    page = await engine.parked_page(svc, 3)
    while True:
        pages.append([t.id for t in page.tasks])
        if page.after is None:
            break
        assert len(pages) < 10, pages
        page = await engine.parked_page(svc, 3, after=page.after)
    listed = [task_id for p in pages for task_id in p]
    assert sorted(listed) == sorted(ids), pages
    assert len(listed) == len(set(listed)), "a task listed twice"
    assert [len(p) for p in pages][:2] == [3, 3], pages
    # A complete listing says so: no after.
    whole = await call(engine, "parked", {"serviceId": svc, "limit": 1000})
    assert whole["result"]["after"] is None and len(whole["result"]["tasks"]) == 7, whole


async def test_a_page_goes_on_past_tasks_redriven_since_the_one_before(bridge, engine, workers):
    """The cursor is a place in the index, not a task that must still be parked: the next page
    starts there even when the tasks before it went back to the queue meanwhile."""
    svc = service_id()
    ids = await park_each_once(engine, workers, svc, 5)
    first = await engine.parked_page(svc, 2)
    assert len(first.tasks) == 2 and first.after is not None
    assert await engine.redrive(svc, [t.id for t in first.tasks]) == 2
    rest = await engine.parked_page(svc, 10, after=first.after)
    assert sorted(t.id for t in rest.tasks) == sorted(set(ids) - {t.id for t in first.tasks})
    assert rest.after is None


async def test_a_malformed_after_is_a_bad_request(bridge, engine):
    with pytest.raises(BadRequestError, match="after"):
        await call(engine, "parked", {"serviceId": service_id(), "after": "not-a-task"})
