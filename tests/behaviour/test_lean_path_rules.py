"""The lean path of a task (1.3), on both stores: what a fetch and an ack may skip, and why skipping
it never costs a task or a result.

- A hint carries a small task's sealed payload: the fetch that takes it reads no payload. The copy
  is only trusted once it opens under the owner's key; one that does not is ignored, never fatal.
- A fetch that says ``fresh`` (the worker holds nothing) reads no worker pointer.
- An ack that names its task, its epoch and ``hasToken: false`` completes it in one
  compare-and-set; the lease records whether the task has a token, so a wrong ``hasToken`` costs a
  round trip, never a result.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from bridge.domain.hints import Hint, MemoryHints
from bridge.domain.records import QueueKey
from tests.queue_harness import MARGIN_MS, OWNER, TTL_S, Harness

pytestmark = pytest.mark.anyio


def spy(h: Harness, monkeypatch: pytest.MonkeyPatch, *names: str) -> Counter[str]:
    """Count calls of these store methods (the real ones still run)."""
    calls: Counter[str] = Counter()
    for name in names:
        real: Callable[..., Any] = getattr(h.store, name)

        def counted(*a: Any, _real: Callable[..., Any] = real, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(h.store, name, counted)
    return calls


async def test_a_hinted_fetch_of_a_small_task_reads_no_payload(
    hinted: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = hinted
    calls = spy(h, monkeypatch, "payload", "worker")
    task_id = await h.add({"invoice": 42}, tp="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    got = await h.fetch("w", fresh=True)
    assert got is not None and got.task_id == task_id
    assert got.value_json == b'{"invoice":42}'
    assert got.traceparent is not None and got.traceparent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736")
    assert calls["payload"] == 0, "the hint carried the payload"
    assert calls["worker"] == 0, "a fresh fetch reads no pointer"


async def test_a_large_task_is_read_from_the_store(hinted: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = hinted
    calls = spy(h, monkeypatch, "payload")
    task_id = await h.add("x" * 20_000)
    got = await h.fetch("w")
    assert got is not None and got.task_id == task_id and len(got.value_json) == 20_002
    assert calls["payload"] == 1


async def _tamper_next_hint(h: Harness) -> None:
    hints = h.hints
    assert isinstance(hints, MemoryHints)
    q = QueueKey(OWNER, h.service)
    taken = await hints.take(q, 0)
    assert taken is not None and taken.hint.payload is not None
    p = taken.hint.payload
    flipped = bytes([p.value.ciphertext[0] ^ 1]) + p.value.ciphertext[1:]
    forged = dataclasses.replace(p, value=dataclasses.replace(p.value, ciphertext=flipped))
    await hints.offer(q, dataclasses.replace(taken.hint, payload=forged))


async def test_a_hint_whose_payload_copy_does_not_open_is_served_from_the_store(hinted: Harness) -> None:
    h = hinted
    task_id = await h.add("the real value")
    await _tamper_next_hint(h)
    got = await h.fetch("w")
    assert got is not None and got.task_id == task_id and got.value_json == b'"the real value"'
    assert h.metrics.total("hint_payloads_refused") == 1
    assert h.metrics.total("tasks_dead_lettered", reason="integrity") == 0, "a bad copy never condemns a task"
    assert await h.ack("w", got) is True


async def test_a_hint_that_outlived_its_task_hands_nothing_out(hinted: Harness) -> None:
    h = hinted
    await h.add("short-lived")
    h.clock.advance(TTL_S * 1000 + 1)
    got = await h.fetch("w")
    assert h.metrics.total("deliveries_failed", reason="expired") >= 1
    assert h.metrics.total("claims", source="hint", outcome="won") == 0, "the hint's copy was not handed out"
    # Past the hint: the in-memory store expires the row on the test's clock; Cassandra's TTL runs
    # on real time, so there a scan finds the row alive, and the task's end (stored with it) says
    # it is over: nothing is handed out either way.
    assert got is None


async def test_a_named_tokenless_ack_is_one_compare_and_set(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    await h.add("v")
    got = await h.fetch("w")
    assert got is not None and got.has_token is False
    calls = spy(h, monkeypatch, "worker", "lease", "payload", "complete", "finish_worker", "insert_outbox")
    assert await h.ack("w", got, has_token=False) is True
    assert calls == Counter({"complete": 1}), "nothing read before, nothing written after"
    assert h.metrics.total("acks_named_fast") == 1
    # A retried copy of the same ack still answers true; an ack of an older epoch answers false.
    assert await h.ack("w", got, has_token=False) is True
    stale = dataclasses.replace(got, epoch=got.epoch + 1)
    assert await h.ack("w", stale, has_token=False) is False
    assert h.metrics.total("tasks_completed", outcome="result") == 1


async def test_an_ack_that_wrongly_says_no_token_still_sends_the_result(harness: Harness) -> None:
    h = harness
    await h.add("v", token={"wf": 7})
    got = await h.fetch("w")
    assert got is not None and got.has_token is True
    assert await h.ack("w", got, result="done", has_token=False) is True
    await h.queue.drain_background(5.0)
    assert len(h.sink.messages) == 1, "the lease says the task has a token: its result is published"
    assert h.metrics.total("acks_named_fast") == 0


async def test_a_fresh_fetch_moves_on_and_the_task_it_left_comes_back(harness: Harness) -> None:
    """``fresh`` is the worker's word that it holds nothing. Said wrongly, the worker is handed a new
    task and the one it held returns to the queue when its lease runs out: nothing is lost."""
    h = harness
    first_id = await h.add("first")
    second_id = await h.add("second")
    first = await h.fetch("w", ttr_ms=1_000)
    assert first is not None and first.task_id == first_id
    second = await h.fetch("w", ttr_ms=1_000, fresh=True)
    assert second is not None and second.task_id == second_id
    again = await h.fetch("w", ttr_ms=1_000)  # not fresh: the pointer names the second task
    assert again is not None and again.task_id == second_id
    assert await h.ack("w", again) is True
    back = await h.fetch_until("other", step_ms=250, limit_ms=1_000 + MARGIN_MS + 5_000 + 6_000)
    assert back.task_id == first_id and back.deliveries == 2


async def test_a_fetch_after_a_one_round_trip_ack_moves_on(harness: Harness) -> None:
    """The one-round-trip ack leaves the worker's pointer naming the task; a fetch that reads it
    (not ``fresh``) finds the lease done and claims the next task."""
    h = harness
    await h.add("a")
    b_id = await h.add("b")
    a = await h.fetch("w")
    assert a is not None
    assert await h.ack("w", a, has_token=False) is True
    b = await h.fetch("w")
    assert b is not None and b.task_id == b_id and b.deliveries == 1


def test_a_hint_without_payload_still_names_its_entry() -> None:
    task_id = uuid.uuid1()
    hint = Hint(task_id, 1, task_id, None, False)
    assert hint.payload is None and hint.entry().task_id == task_id


async def test_a_copy_whose_life_ends_while_its_claim_is_written_ahead_is_not_handed_out(
    hinted: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last-second rule (a task's copy is not handed out in the last second of its life: its
    completed lease may already be gone, and the claim would hand a finished task out again) holds
    at the claim, not only where the copy was first looked at: a write-ahead that took a second
    (a slow Cassandra) carried a copy checked with 1.5 s of life left into its last second, and the
    claim was made (found by review, 2026-12-06)."""
    h = hinted
    await h.add("short-lived")
    h.clock.advance(TTL_S * 1000 - 1_500)  # 1.5 s of life left: past the first look
    real = h.store.write_ahead

    async def slow(*args: Any, **kwargs: Any) -> Any:
        h.clock.advance(1_000)  # the write-ahead took a second: half a second left at the claim
        return await real(*args, **kwargs)

    monkeypatch.setattr(h.store, "write_ahead", slow)
    got = await h.fetch("w")
    assert h.metrics.total("deliveries_failed", reason="expired") >= 1
    assert h.metrics.total("claims", source="hint", outcome="won") == 0, "claimed in its last second"
    assert got is None
