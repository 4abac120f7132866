"""The client's side of contract 1.4 (worker lifecycle, queue management), without servers.

``RpcClient.call`` is replaced by a fake bridge that records each request (method, body, owner)
and answers from a script, so what is checked here is what the client sends and how it reads the
answers: the add's new fields, notBefore's wire form, the engine's management requests, extend
and fail (and which task they name), and the keep_alive heartbeat. The same requests against the
real bridge are in tests/integration/test_lifecycle_client.py. The CLI's usage errors for the new
commands run as subprocesses with unreachable servers, as in tests/unit/test_cli.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.client import (
    BadRequestError,
    Engine,
    FailOutcome,
    ParkedTask,
    RequestTimeout,
    ServiceStats,
    Task,
    UnavailableError,
    Worker,
)
from bridge.client.rpc import MIN_BEAT_S, iso_not_before
from bridge.crypto import generate_keyring, write_keyring
from tests.cli import cli_many, no_traceback, ok
from tests.client_time import iso_in, until

pytestmark = pytest.mark.anyio

URL = "amqp://worker-a:worker-a@127.0.0.1:1/"  # never connected: every request goes to the fake
Reply = dict[str, Any] | BaseException | Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class FakeBridge:
    """Stands in for ``RpcClient.call``: records requests, answers from per-method scripts.

    A script is a list consumed in order (its last answer repeats): a reply body, an exception to
    raise, or an async function of the request body (to hold an answer back)."""

    def __init__(self, **scripts: list[Reply]) -> None:
        self.scripts = scripts
        self.calls: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def bodies(self, method: str) -> list[dict[str, Any]]:
        return [body for m, body, _ in self.calls if m == method]

    async def call(self, method: str, body: Any, **kw: Any) -> dict[str, Any]:
        self.calls.append((method, body, kw))
        script = self.scripts[method]
        reply = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(reply, BaseException):
            raise reply
        if callable(reply):
            reply = await reply(body)
        return {**reply, "_headers": {}}


def attach(client: Engine | Worker, bridge: FakeBridge, monkeypatch: pytest.MonkeyPatch) -> FakeBridge:
    monkeypatch.setattr(client, "call", bridge.call)
    return bridge


def held_task(worker: Worker, *, task_id: str = "t1", epoch: int = 7, lease_s: float = 30.0) -> Task:
    """A task as a fetch would have handed it out (and made current)."""
    task = Task(worker, task_id, {"v": 1}, 1, iso_in(lease_s), {}, epoch, True)
    worker.current = task
    return task


def extended(body: dict[str, Any], lease_s: float = 30.0) -> dict[str, Any]:
    return {
        "result": True,
        "task": {"id": body.get("taskId"), "epoch": body.get("epoch"), "leaseExpiresAt": iso_in(lease_s)},
    }


async def renewed(body: dict[str, Any]) -> dict[str, Any]:
    return extended(body)


def heartbeats() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("keep-alive ") and not t.done()]


# --- add ----------------------------------------------------------------------------------------


async def test_add_sends_the_new_fields_with_the_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(URL, owner="tenant-a")
    bridge = attach(engine, FakeBridge(add=[{"result": True, "task": {"id": "t1"}}]), monkeypatch)
    assert await engine.add("svc", {"x": 1}, token={"p": 1}, delay_ms=1500, max_deliveries=3) == "t1"
    assert await engine.add("svc", "plain") == "t1"
    (method, body, kw), (_, plain, _) = bridge.calls
    assert method == "add"
    assert body == {"serviceId": "svc", "value": {"x": 1}, "token": {"p": 1}, "delayMs": 1500, "maxDeliveries": 3}
    assert kw["owner"] == "tenant-a" and kw["message_id"]
    assert plain == {"serviceId": "svc", "value": "plain"}  # a 1.3 add is unchanged


async def test_add_not_before_is_sent_as_utc_iso_8601(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(URL)
    bridge = attach(engine, FakeBridge(add=[{"result": True, "task": {"id": "t1"}}]), monkeypatch)
    paris = timezone(timedelta(hours=2))
    await engine.add("svc", 1, not_before=datetime(2026, 12, 2, 12, 0, 0, tzinfo=paris))
    await engine.add("svc", 1, not_before="2026-12-02T10:00:00+01:00")
    first, second = bridge.bodies("add")
    assert first["notBefore"] == "2026-12-02T10:00:00.000Z"
    assert second["notBefore"] == "2026-12-02T10:00:00+01:00"  # a string with an offset goes as given
    assert "delayMs" not in first


def test_not_before_rounds_up_to_the_bridges_milliseconds() -> None:
    at = datetime(2026, 1, 1, 0, 0, 0, 123_001, tzinfo=UTC)
    assert iso_not_before(at) == "2026-01-01T00:00:00.124Z"  # never before the moment asked for
    assert iso_not_before(at.replace(microsecond=123_000)) == "2026-01-01T00:00:00.123Z"
    assert iso_not_before(datetime(2026, 12, 31, 23, 59, 59, 999_500, tzinfo=UTC)) == "2027-01-01T00:00:00.000Z"
    assert iso_not_before("2026-12-02T10:00:00Z") == "2026-12-02T10:00:00Z"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"not_before": datetime(2026, 12, 2, 10, 0)}, "timezone-aware"),
        ({"not_before": "2026-12-02T10:00:00"}, "offset"),
        ({"not_before": "next tuesday"}, "ISO 8601"),
        ({"delay_ms": 10, "not_before": datetime.now(UTC)}, "not both"),
    ],
)
async def test_add_refuses_what_the_bridge_would_misread(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], words: str
) -> None:
    engine = Engine(URL)
    bridge = attach(engine, FakeBridge(add=[{"result": True, "task": {"id": "t1"}}]), monkeypatch)
    with pytest.raises(ValueError, match=words):
        await engine.add("svc", 1, **kwargs)
    assert bridge.calls == []  # nothing sent


# --- the engine's queue management --------------------------------------------------------------


async def test_management_requests_and_their_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(URL, owner="tenant-a")
    parked_doc = {
        "id": "p1",
        "deliveries": 3,
        "reason": "delivery_limit",
        "lastError": {"why": "timeout"},
        "parkedAt": "2026-01-01T00:00:01.000Z",
        "addedAt": "2026-01-01T00:00:00.000Z",
        "hasToken": True,
    }
    stats_doc = {"serviceId": "svc", "ready": 2, "inFlight": 1, "delayed": 4, "parked": 1, "oldestReadyAgeMs": 1200}
    bridge = attach(
        engine,
        FakeBridge(
            cancel=[{"result": True}, {"result": False}],
            purge=[{"result": {"purged": 5, "more": False}}],
            stats=[
                {"result": {"services": [stats_doc, {**stats_doc, "serviceId": "other", "oldestReadyAgeMs": None}]}}
            ],
            parked=[{"result": {"tasks": [parked_doc, {**parked_doc, "id": "p2", "lastError": None}]}}],
            redrive=[{"result": {"redriven": 2}}, {"result": {"redriven": 2}}, {"result": {"redriven": 0}}],
            discard=[{"result": {"discarded": 1}}],
        ),
        monkeypatch,
    )
    assert await engine.cancel("svc", "t1") is True
    assert await engine.cancel("svc", "t1") is False
    assert await engine.purge("svc") == 5
    assert await engine.stats("svc") == [
        ServiceStats("svc", 2, 1, 4, 1, 1200),
        ServiceStats("other", 2, 1, 4, 1, None),
    ]
    await engine.stats()
    parked = await engine.parked("svc", limit=10)
    assert parked[0] == ParkedTask(
        "p1", 3, "delivery_limit", {"why": "timeout"}, "2026-01-01T00:00:01.000Z", "2026-01-01T00:00:00.000Z", True
    )
    assert parked[1].last_error is None
    assert await engine.redrive("svc", ["p1", "p2"]) == 2
    assert await engine.redrive("svc", all=True) == 2
    assert await engine.discard("svc", ["p1"]) == 1

    sent = [(method, body) for method, body, _ in bridge.calls]
    assert sent == [
        ("cancel", {"serviceId": "svc", "taskId": "t1"}),
        ("cancel", {"serviceId": "svc", "taskId": "t1"}),
        ("purge", {"serviceId": "svc"}),
        ("stats", {"serviceId": "svc"}),
        ("stats", {"partial": True}),  # every queue of the owner: those that can be read (1.10)
        ("parked", {"serviceId": "svc", "limit": 10}),
        ("redrive", {"serviceId": "svc", "taskIds": ["p1", "p2"]}),
        ("redrive", {"serviceId": "svc", "all": True}),
        ("redrive", {"serviceId": "svc", "all": True}),  # again until it answers 0
        ("discard", {"serviceId": "svc", "taskIds": ["p1"]}),
    ]
    assert {kw["owner"] for _, _, kw in bridge.calls} == {"tenant-a"}  # x-owner on every one


async def test_purge_is_sent_again_while_the_bridge_says_more(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(URL)
    rounds: list[Reply] = [
        {"result": {"purged": 3, "more": True}},
        {"result": {"purged": 2, "more": True}},
        {"result": {"purged": 0, "more": True}},  # nothing left that is ready: stop, not loop
    ]
    bridge = attach(engine, FakeBridge(purge=rounds), monkeypatch)
    assert await engine.purge("svc") == 5
    assert len(bridge.calls) == 3
    bridge = attach(engine, FakeBridge(purge=[{"result": {"purged": 1, "more": False}}]), monkeypatch)
    assert await engine.purge("svc") == 1
    assert len(bridge.calls) == 1


async def test_a_redrive_is_awaited_as_long_as_the_bridge_paces_it(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(URL)
    rounds: list[Reply] = [{"result": {"redriven": 1}}, {"result": {"redriven": 1}}, {"result": {"redriven": 0}}]
    bridge = attach(engine, FakeBridge(redrive=rounds), monkeypatch)
    await engine.redrive("svc", [f"p{i}" for i in range(100)])
    await engine.redrive("svc", all=True, redrive_rate=100)
    assert [kw["wait_s"] for _, _, kw in bridge.calls] == [2.0, 10.0, 10.0]  # 100 / 50 a second; 1000 / 100


async def test_redrive_all_is_sent_again_until_the_bridge_answers_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``all`` request puts back at most 1000 parked tasks (the contract: send it again until it
    answers 0). The client sent it once: with 1001 parked, ``redrive(all=True)`` (and the CLI's
    ``redrive --all``) answered 1000 and left one parked. An answer below 1000 is not the end
    (the bridge skips listed tasks no longer parked); only 0 is."""
    engine = Engine(URL)
    rounds: list[Reply] = [{"result": {"redriven": n}} for n in (1000, 7, 1, 0)]
    bridge = attach(engine, FakeBridge(redrive=rounds), monkeypatch)
    assert await engine.redrive("svc", all=True) == 1008
    assert bridge.bodies("redrive") == [{"serviceId": "svc", "all": True}] * 4


async def test_redrive_takes_ids_or_all_and_empty_lists_ask_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(URL)
    bridge = attach(engine, FakeBridge(redrive=[{"result": {"redriven": 9}}]), monkeypatch)
    with pytest.raises(ValueError, match="exactly one"):
        await engine.redrive("svc")
    with pytest.raises(ValueError, match="exactly one"):
        await engine.redrive("svc", ["p1"], all=True)
    assert await engine.redrive("svc", []) == 0
    assert await engine.discard("svc", []) == 0
    assert bridge.calls == []


async def test_an_error_answer_is_raised_as_its_class(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(URL)
    attach(engine, FakeBridge(purge=[BadRequestError("serviceId is required", "bad_request")]), monkeypatch)
    with pytest.raises(BadRequestError):
        await engine.purge("")


# --- extend and fail ----------------------------------------------------------------------------


async def test_extend_names_the_held_task_and_renews_its_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = Worker(URL, service="svc", worker_id="w1", time_to_recover_ms=20_000)
    bridge = attach(worker, FakeBridge(extend=[renewed]), monkeypatch)
    task = held_task(worker, lease_s=1)
    before = task.lease_expires_at
    assert await worker.extend() is True
    assert await task.extend(5_000) is True
    assert await worker.extend(task_id="other", epoch=3) is True
    first, second, third = bridge.bodies("extend")
    assert first == {"serviceId": "svc", "workerId": "w1", "taskId": "t1", "epoch": 7, "timeToRecover": 20_000}
    assert second["timeToRecover"] == 5_000 and second["taskId"] == "t1"
    assert (third["taskId"], third["epoch"]) == ("other", 3)
    assert task.lease_expires_at > before  # ISO 8601 in UTC sorts as time
    assert not task.lost


async def test_extend_answered_false_marks_the_task_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    attach(worker, FakeBridge(extend=[{"result": False}]), monkeypatch)
    task = held_task(worker)
    assert await worker.extend() is False
    assert not task.lost  # the worker's own request: only the task's extend says it is lost
    assert await task.extend() is False
    assert task.lost


async def test_fail_is_a_technical_failure_and_ack_error_a_business_one(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    outcome = {"id": "t1", "deliveries": 2, "parked": False, "retryAt": "2026-01-01T00:00:05.000Z"}
    bridge = attach(
        worker,
        FakeBridge(
            fail=[{"result": True, "task": outcome}, {"result": False}],
            ack=[{"result": True}],
            fetch=[{"result": None}],
        ),
        monkeypatch,
    )
    task = held_task(worker)
    assert await task.fail({"why": "db down"}, retry_in_ms=500) == FailOutcome(
        "t1", 2, False, "2026-01-01T00:00:05.000Z"
    )
    assert bridge.bodies("fail") == [
        {
            "serviceId": "svc",
            "workerId": "w1",
            "taskId": "t1",
            "epoch": 7,
            "error": {"why": "db down"},
            "retryInMs": 500,
        }
    ]
    # Answered: the worker holds nothing, and its next fetch says so.
    assert await worker.fetch() is None
    assert bridge.bodies("fetch")[0].get("fresh") is True

    task = held_task(worker, task_id="t2", epoch=1)
    assert await task.ack_error({"code": "no such invoice"}) is True
    assert bridge.bodies("ack") == [
        {
            "serviceId": "svc",
            "workerId": "w1",
            "taskId": "t2",
            "epoch": 1,
            "hasToken": True,
            "error": {"code": "no such invoice"},
        }
    ]
    with pytest.raises(ValueError, match="None"):
        await task.ack_error(None)  # would be a successful ack with a null result
    held_task(worker, task_id="t3")
    assert await worker.fail() is None  # no longer this worker's
    assert bridge.bodies("fail")[-1] == {"serviceId": "svc", "workerId": "w1", "taskId": "t3", "epoch": 7}


async def test_a_fail_without_an_answer_leaves_the_worker_unsure(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    bridge = attach(worker, FakeBridge(fail=[RequestTimeout("no reply")], fetch=[{"result": None}]), monkeypatch)
    held_task(worker)
    with pytest.raises(RequestTimeout):
        await worker.fail({"e": 1})
    await worker.fetch()
    assert "fresh" not in bridge.bodies("fetch")[0]  # it may still hold the task


async def test_a_request_about_no_task_is_refused_unless_held_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Worker that fetched nothing and names no task would send a request naming none, which
    the bridge applies to whatever the worker id holds (contract 1.0): refused before anything
    is sent, unless ``held=True`` asks for exactly that (then no ``taskId`` goes)."""
    worker = Worker(URL, service="svc", worker_id="w1")
    outcome = {"id": "t9", "deliveries": 1, "parked": False, "retryAt": "2026-01-01T00:00:05.000Z"}
    bridge = attach(
        worker,
        FakeBridge(ack=[{"result": True}], fail=[{"result": True, "task": outcome}], extend=[renewed]),
        monkeypatch,
    )
    for name, request in {
        "ack": lambda: worker.ack("r"),
        "fail": lambda: worker.fail({"e": 1}),
        "extend": lambda: worker.extend(),
    }.items():
        with pytest.raises(ValueError, match=f"no task to {name}"):
            await request()
    assert bridge.calls == []
    assert await worker.ack("r", held=True) is True
    assert (await worker.fail({"e": 1}, held=True)) == FailOutcome("t9", 1, False, "2026-01-01T00:00:05.000Z")
    assert await worker.extend(held=True) is True
    nameless = {"serviceId": "svc", "workerId": "w1"}
    assert bridge.bodies("ack") == [{**nameless, "result": "r"}]
    assert bridge.bodies("fail") == [{**nameless, "error": {"e": 1}}]
    assert bridge.bodies("extend") == [nameless]


# --- keep_alive ---------------------------------------------------------------------------------


async def test_keep_alive_beats_while_the_block_runs_and_stops_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    bridge = attach(worker, FakeBridge(extend=[renewed]), monkeypatch)
    task = held_task(worker, lease_s=0.3)
    async with task.keep_alive(every_s=0.01, ttr_ms=300) as same:
        assert same is task
        await until(lambda: len(bridge.bodies("extend")) >= 3, what="three beats")
        assert len(heartbeats()) == 1
    assert heartbeats() == []  # gone as the block ends: nothing beats for a task left alone
    assert {b["timeToRecover"] for b in bridge.bodies("extend")} == {300}
    assert {(b["taskId"], b["epoch"]) for b in bridge.bodies("extend")} == {("t1", 7)}
    assert not task.lost


async def test_keep_alive_stops_and_marks_the_task_lost_when_extend_answers_false(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    bridge = attach(worker, FakeBridge(extend=[renewed, {"result": False}]), monkeypatch)
    task = held_task(worker)
    async with task.keep_alive(every_s=0.01):
        await until(lambda: task.lost, what="the task marked lost")
        await until(lambda: heartbeats() == [], what="the heartbeat to stop")  # while the block still runs
        assert len(bridge.bodies("extend")) == 2


async def test_keep_alive_retries_transport_errors_at_the_next_beat(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    script: list[Reply] = [RequestTimeout("no reply"), UnavailableError("cassandra down", "unavailable"), renewed]
    bridge = attach(worker, FakeBridge(extend=script), monkeypatch)
    task = held_task(worker)
    with caplog.at_level(logging.WARNING, logger="bridge.client"):
        async with task.keep_alive(every_s=0.01):
            await until(lambda: len(bridge.bodies("extend")) >= 4, what="beats after the errors")
            assert len(heartbeats()) == 1  # still beating
    assert not task.lost
    messages = [r.getMessage() for r in caplog.records if r.name == "bridge.client"]
    assert any("no reply" in m for m in messages) and any("cassandra down" in m for m in messages), messages


async def test_keep_alive_ends_with_an_exception_or_a_cancellation_of_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    attach(worker, FakeBridge(extend=[renewed]), monkeypatch)
    task = held_task(worker)
    with pytest.raises(KeyError):
        async with task.keep_alive(every_s=0.01):
            raise KeyError("the handler's own error")
    assert heartbeats() == []

    entered = asyncio.Event()

    async def handler() -> None:
        async with task.keep_alive(every_s=0.01):
            entered.set()
            await asyncio.Event().wait()  # a handler blocked for good

    running = asyncio.create_task(handler())
    await entered.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running  # the cancellation goes through: keep_alive does not swallow it
    assert heartbeats() == []


async def test_keep_alive_cancelled_mid_extend_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    sent = asyncio.Event()

    async def never_answered(body: dict[str, Any]) -> dict[str, Any]:
        sent.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    attach(worker, FakeBridge(extend=[never_answered]), monkeypatch)
    task = held_task(worker)
    async with task.keep_alive(every_s=0.01):
        await sent.wait()
    assert heartbeats() == []
    assert not task.lost


async def test_a_late_false_after_the_ack_is_not_a_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """A beat in flight when the handler acks is answered false (the task is done): not lost."""
    worker = Worker(URL, service="svc", worker_id="w1")
    sent, release = asyncio.Event(), asyncio.Event()

    async def held_back(body: dict[str, Any]) -> dict[str, Any]:
        sent.set()
        await release.wait()
        return {"result": False}

    bridge = attach(worker, FakeBridge(extend=[held_back], ack=[{"result": True}]), monkeypatch)
    task = held_task(worker)
    async with task.keep_alive(every_s=0.01):
        await sent.wait()
        assert await task.ack("done") is True
        release.set()
        await until(lambda: heartbeats() == [], what="the heartbeat to end after the ack")
    assert not task.lost
    assert len(bridge.bodies("extend")) == 1  # and no beat after the ack


def test_the_default_beat_is_a_third_of_the_lease_left() -> None:
    worker = Worker(URL, service="svc", worker_id="w1", time_to_recover_ms=9_000)
    task = held_task(worker, lease_s=30)
    assert 9.5 <= task._beat_interval(None) <= 10.0
    assert task._beat_interval(3_000) == pytest.approx(1.0)  # capped by the lease each beat asks for
    task.lease_expires_at = iso_in(-5)  # run out (or a clock ahead of the bridge's): beat at once
    assert task._beat_interval(None) == MIN_BEAT_S
    task.lease_expires_at = "not a date"  # then the lease asked for is all there is to go by
    assert task._beat_interval(None) == pytest.approx(3.0)
    worker.time_to_recover_ms = None
    assert task._beat_interval(None) == pytest.approx(1.0)  # nothing to go by: every second


async def test_keep_alive_refuses_a_non_positive_interval() -> None:
    task = held_task(Worker(URL, service="svc", worker_id="w1"))
    with pytest.raises(ValueError, match="positive"):
        async with task.keep_alive(every_s=0):
            pass


# --- the CLI's new commands, offline --------------------------------------------------------------


async def test_cli_new_commands_help_and_usage_errors(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.json"
    write_keyring(keyring, generate_keyring(["worker-a", "engine"]))
    env = {
        "BRIDGE_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
        "BRIDGE_CASSANDRA_HOSTS": "127.0.0.1",
        "BRIDGE_CASSANDRA_PORT": "1",
        "BRIDGE_KEYRING": str(keyring),
        "BRIDGE_EXCHANGE": "qb-offline",
        "BRIDGE_HTTP_PORT": "0",
    }
    helps = ["extend", "fail", "cancel", "purge", "queue-stats", "parked", "redrive", "discard", "stats"]
    usage = [
        (("purge", "svc"), "--yes"),
        (("redrive", "svc"), "exactly one"),
        (("redrive", "svc", "p1", "--all"), "exactly one"),
        (("discard", "svc"), "TASK_ID"),
        (("add", "svc", "1", "--not-before", "2026-12-02T10:00:00"), "offset"),
        (("add", "svc", "1", "--not-before", "2026-12-02T10:00:00Z", "--delay-ms", "5"), "not both"),
        (("fail", "svc", "--worker", "w", "--error", "{oops"), "not valid JSON"),
        (("parked", "svc", "--limit", "0"), "--limit"),
    ]
    procs = await cli_many(
        *(((name, "--help"), {}) for name in helps),
        *((args, {}) for args, _ in usage),
        (("queue-stats", "svc"), {}),
        env=env,
    )
    for name, proc in zip(helps, procs, strict=False):
        assert "Usage:" in ok(proc), name
    for (args, words), proc in zip(usage, procs[len(helps) :], strict=False):
        assert proc.returncode == 2, (args, proc)
        assert words in proc.stderr, (args, proc.stderr)
        no_traceback(proc)
    unreachable = procs[-1]
    assert unreachable.returncode == 1, unreachable
    assert "cannot connect to RabbitMQ" in unreachable.stderr and unreachable.stdout == ""
    no_traceback(unreachable)


# --- ack_and_fetch (1.6) ---------------------------------------------------------------------------


def next_task(task_id: str) -> dict[str, Any]:
    task = {"id": task_id, "epoch": 1, "deliveries": 1, "leaseExpiresAt": iso_in(30), "hasToken": False}
    return {"result": True, "next": {"result": {"n": 2}, "task": task}}


async def test_ack_and_fetch_names_its_task_asks_for_the_next_and_makes_it_current(monkeypatch) -> None:
    worker = Worker(URL, service="svc", worker_id="w1", time_to_recover_ms=20_000)
    bridge = attach(worker, FakeBridge(ack=[next_task("t2")]), monkeypatch)
    held_task(worker)
    acked, task = await worker.ack_and_fetch({"ok": 1})
    assert acked is True and task is not None and task.id == "t2" and worker.current is task
    [body] = bridge.bodies("ack")
    assert body["taskId"] == "t1" and body["epoch"] == 7 and body["result"] == {"ok": 1}
    assert body["next"] == {"fresh": True, "timeToRecover": 20_000}


async def test_ack_and_fetch_retried_after_a_lost_reply_is_not_fresh(monkeypatch) -> None:
    """The lost reply's ack may have claimed a next task: the retry must let the bridge hand that
    one again (no ``fresh``), or it would stay leased to this worker until its lease ran out."""
    worker = Worker(URL, service="svc", worker_id="w1")
    bridge = attach(worker, FakeBridge(ack=[RequestTimeout("no reply"), next_task("t2")]), monkeypatch)
    held_task(worker)
    with pytest.raises(RequestTimeout):
        await worker.ack_and_fetch("done")
    acked, task = await worker.ack_and_fetch("done")
    assert acked is True and task is not None and task.id == "t2"
    first, retry = bridge.bodies("ack")
    assert first["next"]["fresh"] is True and retry["next"]["fresh"] is False
    assert retry["taskId"] == first["taskId"] == "t1"


async def test_after_an_unanswered_claim_the_first_request_past_its_deadline_reads_the_pointer(monkeypatch) -> None:
    """A request that got no answer may have claimed a task for this worker at a bridge (its reply
    lost) any time until its deadline; past that deadline the worker said ``fresh`` again at once,
    the bridge skipped the pointer naming that task, and it waited out its whole lease (up to
    12 h; a delivery spent, a task at its limit parked without running). The first claiming request
    past the deadline (a fetch, or an ack's ``next``) is sent without ``fresh``, and ``fresh`` comes
    back once such a request is answered (found by review, 2026-12-07)."""
    worker = Worker(URL, service="svc", worker_id="w1")
    bridge = attach(
        worker,
        FakeBridge(ack=[RequestTimeout("no reply"), next_task("t2"), next_task("t3")]),
        monkeypatch,
    )
    held_task(worker)
    with pytest.raises(RequestTimeout):
        await worker.ack_and_fetch("done")  # its copy may claim at a bridge until its deadline
    _, t2 = await worker.ack_and_fetch("done")  # the retry (not fresh), answered: t2
    assert t2 is not None
    worker._unsure_until = 0.0  # the unanswered copy's deadline has passed
    _, t3 = await worker.ack_and_fetch("done with t2")
    assert t3 is not None
    assert bridge.bodies("ack")[2]["next"]["fresh"] is False, "the pointer unread since the lost claim"
    await worker.ack_and_fetch("done with t3")
    assert bridge.bodies("ack")[3]["next"]["fresh"] is True, "read once past the deadline: fresh again"


async def test_ack_and_fetch_whose_next_fetch_failed_leaves_the_next_fetch_not_fresh(monkeypatch) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    failed = {"result": True, "next": {"error": {"code": "unavailable", "message": "cassandra unavailable"}}}
    bridge = attach(worker, FakeBridge(ack=[failed], fetch=[{"result": None}]), monkeypatch)
    held_task(worker)
    assert await worker.ack_and_fetch("done") == (True, None)
    assert worker.current is None
    await worker.fetch()
    assert "fresh" not in bridge.bodies("fetch")[0]


async def test_ack_and_fetch_answered_by_a_bridge_before_1_6_is_an_ack_only(monkeypatch) -> None:
    """A 1.5 bridge ignores ``next``: its reply has none, and the worker then fetches on its own."""
    worker = Worker(URL, service="svc", worker_id="w1")
    bridge = attach(worker, FakeBridge(ack=[{"result": True}], fetch=[{"result": None}]), monkeypatch)
    held_task(worker)
    assert await worker.ack_and_fetch("done") == (True, None)
    await worker.fetch()
    assert "fresh" not in bridge.bodies("fetch")[0]


# --- the bridge's clock (x-now on replies) -------------------------------------------------------


def reply_saying(now_ms: Any, correlation_id: str | None = None) -> Any:
    """A reply as the client's consumer gets it, with ``now_ms`` as its x-now header (``...``: none)."""
    headers = {} if now_ms is ... else {"x-now": now_ms}
    return SimpleNamespace(correlation_id=correlation_id, headers=headers, body=b'{"result": null}')


async def answered(client: Any, now_ms: Any) -> None:
    """A reply to a request ``client`` sent (a late one: nobody waits for it), saying ``now_ms``."""
    correlation_id = uuid.uuid4().hex
    client._issued[correlation_id] = None
    await client._on_reply(reply_saying(now_ms, correlation_id))


async def test_a_message_answering_no_request_sent_tells_no_time() -> None:
    """Only a reply to a request of the client's tells the bridge's time: any other message on the
    reply channel (a forged one with a far-future x-now) moved the clock for a minute."""
    worker = Worker(URL, service="svc", worker_id="w1")
    await worker._on_reply(reply_saying(int(time.time() * 1000) + 3_600_000, uuid.uuid4().hex))
    await worker._on_reply(reply_saying(int(time.time() * 1000) + 3_600_000))
    assert worker.clock_offset_ms is None


async def test_deadlines_are_set_on_the_bridges_clock_once_a_reply_says_it() -> None:
    """A host clock 30 s behind the bridge's made every deadline 30 s late by the bridge's clock
    (past it on arrival, with a 10 s timeout): the client now adds the offset the replies say."""
    worker = Worker(URL, service="svc", worker_id="w1", timeout=10.0)
    loop = asyncio.get_running_loop()

    def deadline_and_timestamp() -> tuple[float, float]:
        message = worker._message("ack", b"{}", loop.time() + worker.timeout, True, None, None, None)
        assert message.timestamp is not None
        return (message.headers or {})["x-deadline"] / 1000, message.timestamp.timestamp()

    deadline, sent = deadline_and_timestamp()
    assert worker.clock_offset_ms is None
    assert deadline == pytest.approx(time.time() + 10.0, abs=0.5), "no offset before any reply"
    await answered(worker, int(time.time() * 1000) + 30_000)  # a late one: nobody waits for it
    assert worker.clock_offset_ms == pytest.approx(30_000, abs=500)
    deadline, sent = deadline_and_timestamp()
    assert deadline == pytest.approx(time.time() + 30.0 + 10.0, abs=0.5)
    assert sent == pytest.approx(time.time() + 30.0, abs=1.5)  # whole seconds: judged by the bridge's clock too


async def test_a_reply_held_on_its_way_does_not_pull_the_offset_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply held behind a broker's flow control says a time already past: its offset is too
    small by the delay. Taken as it came, a keep-alive timed on it beat after its lease ended. The
    offset is the largest of the last minute's replies; past the minute, the newer ones count."""
    import bridge.client.rpc as rpc

    mono = [1_000.0]
    monkeypatch.setattr(rpc.time, "monotonic", lambda: mono[0])
    worker = Worker(URL, service="svc", worker_id="w1", timeout=10.0)
    await answered(worker, int(time.time() * 1000) + 30_000)
    await answered(worker, int(time.time() * 1000) + 30_000 - 20_000)  # held 20 s on its way
    assert worker.clock_offset_ms == pytest.approx(30_000, abs=500)
    mono[0] += rpc.OFFSET_WINDOW_S + 1  # a minute on, the host's clock stepped: the new offset holds
    await answered(worker, int(time.time() * 1000) - 5_000)
    assert worker.clock_offset_ms == pytest.approx(-5_000, abs=500)


@pytest.mark.parametrize("now", [..., None, "1800000000000", 1.8e12, True, 0, -5, [1]])
async def test_a_reply_without_a_usable_x_now_changes_nothing(now: Any) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    await answered(worker, now)
    assert worker.clock_offset_ms is None
    await answered(worker, int(time.time() * 1000) + 20_000)
    await answered(worker, now)  # a bridge without it (an older one) keeps what was learnt
    assert worker.clock_offset_ms == pytest.approx(20_000, abs=500)


async def test_a_clock_off_by_more_than_a_second_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.client"):
        close = Worker(URL, service="svc", worker_id="w0")
        await answered(close, int(time.time() * 1000) + 300)  # within a second: nothing said
        assert caplog.records == []
        worker = Worker(URL, service="svc", worker_id="w1")
        for _ in range(3):
            await answered(worker, int(time.time() * 1000) - 12_000)
    (record,) = caplog.records
    assert "12.0 s ahead of the bridge's" in record.getMessage()


async def test_the_beat_reckons_the_lease_left_on_the_bridges_clock() -> None:
    """A lease of 30 s by the bridge's clock, on a host 60 s behind it: a third of 90 s (30 s)
    would beat after the lease ran out."""
    worker = Worker(URL, service="svc", worker_id="w1")
    await answered(worker, int(time.time() * 1000) + 60_000)
    task = held_task(worker, lease_s=60 + 30)  # the bridge's now + 30 s, on this host's clock
    assert task._beat_interval(None) == pytest.approx(10.0, abs=0.5)


@pytest.mark.parametrize(
    "reason",
    [
        "PRECONDITION_FAILED - message size 17825793 is larger than configured max size 16777216",
        "PRECONDITION_FAILED - message size 17825793 is larger than max size 16777216",  # at the 512 MiB ceiling
    ],
)
def test_a_channel_closed_for_a_message_over_the_brokers_size_is_payload_too_large(reason: str) -> None:
    """RabbitMQ says it two ways (``rabbit_channel:check_msg_size``); only the request over the
    bound is refused, the others on the channel were merely lost with it."""
    from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

    from bridge.client.errors import PayloadTooLargeError
    from bridge.client.rpc import _too_large

    assert isinstance(_too_large(ChannelPreconditionFailed(reason), 17825793), PayloadTooLargeError)
    assert _too_large(ChannelPreconditionFailed(reason), 100) is None
    assert _too_large(ChannelNotFoundEntity(reason), 17825793) is None
