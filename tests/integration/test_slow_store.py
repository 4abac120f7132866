"""Cassandra slow rather than down: a latency-injecting proxy between a bridge and its node. Requests
are answered (a result or a clear `unavailable`) before their callers give up, an unknown outcome
is never settled by a read alone, and a bridge whose node stalls stops taking requests."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from typing import Any

import pytest

from bridge.client import Engine, UnavailableError
from bridge.client.errors import TransportError
from tests.conftest import ENGINE_USER, OWNERS, service_id, settings_from, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


class SlowProxy(TcpProxy):
    """TcpProxy that delays each chunk (order kept) and can stall a direction, then release it.

    ``request_delay`` / ``reply_delay``: (lo, hi) seconds added to each chunk in that direction.
    ``stall_requests()`` / ``stall_replies()``: hold every chunk of that direction until ``release()``.
    """

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.request_delay: tuple[float, float] = (0.0, 0.0)
        self.reply_delay: tuple[float, float] = (0.0, 0.0)
        self.requests_open = asyncio.Event()
        self.replies_open = asyncio.Event()
        self.requests_open.set()
        self.replies_open.set()
        self.chunks = {True: 0, False: 0}
        # CQL v4 request frames containing one of these byte strings are held this many seconds
        # (the other frames of the connection go on: stream ids make reordering legal), as a
        # coordinator stalled on that one statement (a GC pause) while others are served.
        self.holds: dict[bytes, float] = {}
        self.held_frames = 0
        self._late: set[asyncio.Task[None]] = set()

    def stall_requests(self) -> None:
        self.requests_open.clear()

    def stall_replies(self) -> None:
        self.replies_open.clear()

    def release(self) -> None:
        self.requests_open.set()
        self.replies_open.set()

    def fast(self) -> None:
        self.request_delay = self.reply_delay = (0.0, 0.0)
        self.release()

    async def _pipe(  # noqa: C901 - a test proxy: delays, stalls and frame holds in one loop
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        gate = self.replies_open if replies else self.requests_open

        async def forward() -> None:
            try:
                while (item := await q.get()) is not None:
                    at, data = item
                    if (left := at - loop.time()) > 0:
                        await asyncio.sleep(left)
                    await gate.wait()
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    writer.close()

        fwd = asyncio.create_task(forward())
        last = 0.0
        buf = b""

        async def late(frame: bytes, after: float) -> None:
            await asyncio.sleep(after)
            with contextlib.suppress(Exception):
                writer.write(frame)
                await writer.drain()

        def frames(data: bytes) -> bytes:
            """Hold the matching whole frames; what is left to forward in order."""
            nonlocal buf
            buf += data
            out = b""
            while len(buf) >= 9:
                size = 9 + int.from_bytes(buf[5:9], "big")
                if len(buf) < size:
                    break
                frame, buf = buf[:size], buf[size:]
                pat = next((pat for pat in self.holds if pat in frame), None)
                hit = None if pat is None else self.holds.pop(pat)  # one frame per pattern
                if hit is None:
                    out += frame
                else:
                    self.held_frames += 1
                    t = asyncio.create_task(late(frame, hit))
                    self._late.add(t)
                    t.add_done_callback(self._late.discard)
            return out

        try:
            while data := await reader.read(65536):
                self.chunks[replies] += 1
                if not replies and self.holds:
                    data = frames(data)
                    if not data:
                        continue
                elif not replies and buf:
                    data, buf = buf + data, b""
                lo, hi = self.reply_delay if replies else self.request_delay
                at = max(loop.time() + random.uniform(lo, hi), last)
                last = at
                q.put_nowait((at, data))
        except (ConnectionError, OSError):
            pass
        finally:
            q.put_nowait(None)
            with contextlib.suppress(BaseException):
                await fwd


@pytest.fixture
async def slow_proxy(servers):
    proxy = await SlowProxy(servers.cassandra_hosts[0], servers.cassandra_port).start()
    yield proxy
    proxy.fast()
    await proxy.stop()


@pytest.fixture
async def slow_bridge(bridge_env, slow_proxy):
    from bridge.app import Bridge

    made: list[Any] = []

    async def make(**overrides: Any) -> Any:
        b = Bridge(settings_from(bridge_env, cassandra_port=slow_proxy.port, **overrides))
        await b.start()
        made.append(b)
        return b

    yield make
    slow_proxy.fast()
    for b in made:
        await b.stop()


async def bounded(coro: Any, limit: float, what: str) -> Any:
    """Await ``coro``: its own answer (value or exception), failing the test if it takes longer."""
    t0 = time.monotonic()
    try:
        return await asyncio.wait_for(coro, limit)
    except TimeoutError:
        raise AssertionError(f"{what}: no outcome within {limit}s (started {time.monotonic() - t0:.1f}s ago)") from None


async def idle(b: Any, timeout: float) -> None:
    """Every delivery the bridge took is settled (no request task in flight)."""
    await wait_for(lambda: not b.transport._inflight, timeout, what="the bridge settled every delivery")


def stored_tasks(cql: Any, ks: str, svc: str) -> list[Any]:
    """The stored tasks of a service: their own rows in lane 1 (fresh) of ``ready`` (not the second
    entries of tasks whose write landed late: ``seq`` is another time uuid there)."""
    rows = cql.execute(f"SELECT seq, task_id FROM {ks}.ready WHERE service = %s AND lane = 1 ALLOW FILTERING", (svc,))
    return [r["task_id"] or r["seq"] for r in rows if r["task_id"] in (None, r["seq"])]


async def test_slow_round_trips_every_rpc_answered_and_settled(slow_bridge, slow_proxy, servers, names, workers, cql):
    """200-800 ms per store reply: adds, fetches, extends, acks and long-polls are all answered
    (success or a clear error) within the client's deadline + a bound, every delivery settled."""
    b = await slow_bridge()
    svc = service_id()
    slow_proxy.reply_delay = (0.2, 0.8)
    outcomes: dict[str, list[str]] = {}

    def note(kind: str, what: str) -> None:
        outcomes.setdefault(kind, []).append(what)

    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=60) as eng:
        adds = await bounded(
            asyncio.gather(*(eng.add(svc, i, message_id=f"m-{i}") for i in range(12)), return_exceptions=True),
            90,
            "12 adds",
        )
        for a in adds:
            note("add", type(a).__name__ if isinstance(a, BaseException) else "ok")
        ws = [await workers(svc, f"w{i}", timeout=10) for i in range(4)]
        waiter = await workers(svc, "waiter", timeout=10)
        long_poll = asyncio.create_task(waiter.fetch(wait_ms=5000))

        async def work(w: Any) -> None:
            for _ in range(4):
                try:
                    t = await bounded(w.fetch(time_to_recover_ms=30_000), 10 + 15, "fetch")
                except (UnavailableError, TransportError) as exc:
                    note("fetch", type(exc).__name__)
                    continue
                note("fetch", "ok" if t else "none")
                if t is None:
                    return
                try:
                    note("extend", str(await bounded(t.extend(30_000), 25, "extend")))
                except (UnavailableError, TransportError) as exc:
                    note("extend", type(exc).__name__)
                try:
                    note("ack", str(await bounded(t.ack("done"), 25, "ack")))
                except (UnavailableError, TransportError) as exc:
                    note("ack", type(exc).__name__)

        await asyncio.gather(*(work(w) for w in ws))
        try:
            lp = await bounded(long_poll, 30, "long-poll")
            note("long_poll", "ok" if lp else "none")
        except (UnavailableError, TransportError) as exc:
            note("long_poll", type(exc).__name__)
    await idle(b, 30)
    print(outcomes)
    assert len(set(stored_tasks(cql, servers.keyspace, svc))) == 12


@pytest.mark.timeout(120)  # 40 s in a loaded CI, and its own waits bound each step
@pytest.mark.parametrize("direction", ["requests", "replies"])
async def test_a_stall_that_ends_every_rpc_answered_nothing_lost_or_doubled(
    slow_bridge, slow_proxy, servers, names, workers, cql, direction
):
    """A 6 s stall (longer than BRIDGE_CASSANDRA_TIMEOUT 5 s), then the store is fast again."""
    b = await slow_bridge()
    svc = service_id()
    outcomes: dict[str, list[str]] = {}

    def note(kind: str, what: str) -> None:
        outcomes.setdefault(kind, []).append(what)

    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=60) as eng:
        for i in range(6):
            await eng.add(svc, f"before-{i}", message_id=f"b-{i}")
        ws = [await workers(svc, f"w{i}", timeout=10) for i in range(3)]
        held = [await w.fetch(time_to_recover_ms=60_000) for w in ws]
        assert all(held)
        (slow_proxy.stall_requests if direction == "requests" else slow_proxy.stall_replies)()
        t0 = time.monotonic()
        adds = [asyncio.create_task(eng.add(svc, f"during-{i}", message_id=f"d-{i}")) for i in range(6)]

        async def op(kind: str, coro: Any) -> Any:
            try:
                r = await bounded(coro, 10 + 15, kind)
                note(kind, "ok" if not isinstance(r, bool) else str(r))
                return r
            except (UnavailableError, TransportError) as exc:
                note(kind, type(exc).__name__)
                return exc

        lp = await workers(svc, "lp", timeout=10)
        ops = [
            asyncio.create_task(op("extend", held[0].extend(60_000))),
            asyncio.create_task(op("ack", held[1].ack("r1"))),
            asyncio.create_task(op("fetch", ws[2].fetch(time_to_recover_ms=60_000))),  # a resend
            asyncio.create_task(op("long_poll", lp.fetch(wait_ms=3000))),
        ]
        await asyncio.sleep(6)  # the fault itself: a 6 s stall, past BRIDGE_CASSANDRA_TIMEOUT
        slow_proxy.release()
        await asyncio.gather(*ops)
        added = await bounded(asyncio.gather(*adds), 60, "adds after the stall")
        assert len(set(added)) == 6
        print(outcomes, f"{time.monotonic() - t0:.1f}s")
        # Afterwards, everything works and every task comes out exactly once (those acked aside).
        w2 = await workers(svc, "drain", timeout=10)
        seen: list[str] = []
        for _ in range(40):
            t = await w2.fetch(time_to_recover_ms=60_000)
            if t is None:
                break
            seen.append(t.value)
            assert await t.ack("ok") is True
    await idle(b, 30)
    stored = stored_tasks(cql, servers.keyspace, svc)
    assert len(stored) == len(set(stored)) == 12, f"tasks stored: {len(stored)}"
    during = sorted(v for v in seen if v.startswith("during"))
    assert during == [f"during-{i}" for i in range(6)], seen


def hold_statement(b: Any, proxy: SlowProxy, method: str, id_arg: str, seconds: float) -> list[uuid.UUID]:
    """The bridge's next ``method`` LWT (``complete``, ``claim_new`` ...) is held ``seconds`` on its
    way to Cassandra (found by its random id argument), the bridge's other statements are not."""
    store = b.store
    real = getattr(store, method)
    held: list[uuid.UUID] = []

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        ident = kwargs.get(id_arg)
        if ident is None:
            import inspect

            ident = inspect.signature(real).bind(*args, **kwargs).arguments[id_arg]
        if not held:
            held.append(ident)
            proxy.holds[ident.bytes] = seconds
        return await real(*args, **kwargs)

    setattr(store, method, wrapped)
    return held


def hold_both_copies(b: Any, proxy: SlowProxy, method: str, id_arg: str, seconds: float) -> list[uuid.UUID]:
    """The bridge's next ``method`` LWT is held ``seconds`` on its way, and so is the copy the store
    sends once more when the first one's outcome is unknown: a coordinator (or a link) stalled on
    it for longer than the bridge waits. Later calls are not held."""
    import inspect

    original = getattr(b.store, method)
    held = hold_statement(b, proxy, method, id_arg, seconds)
    first = getattr(b.store, method)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not held:  # the first call: its id's first 12 bytes hold the second frame carrying it
            ident = inspect.signature(original).bind(*args, **kwargs).arguments[id_arg]
            proxy.holds[ident.bytes[:12]] = seconds
        return await first(*args, **kwargs)

    setattr(b.store, method, wrapped)
    return held


def worker_fetch(svc: str, worker: str = "w", *, ttr: int = 120_000, wait_ms: int = 0) -> Any:
    from bridge.domain.models import FetchRequest

    return FetchRequest.model_validate({"serviceId": svc, "workerId": worker, "timeToRecover": ttr, "waitMs": wait_ms})


def lease_of(cql: Any, ks: str, svc: str, task_id: str) -> Any:
    """The task's lease row (state, worker, claim and completion ids), or None."""
    return cql.execute(
        f"SELECT state, worker, claim_id, completion_id FROM {ks}.leases "
        "WHERE owner = %s AND service = %s AND task_id = %s",
        (OWNERS[0], svc, uuid.UUID(task_id)),
    ).one()


def tasks_leased_to(cql: Any, ks: str, svc: str, worker: str) -> list[str]:
    rows = cql.execute(
        f"SELECT task_id, state, worker FROM {ks}.leases WHERE owner = %s AND service = %s ALLOW FILTERING",
        (OWNERS[0], svc),
    )
    return sorted(str(r["task_id"]) for r in rows if r["state"] == "leased" and r["worker"] == worker)


async def test_an_ack_whose_completion_lands_late_is_not_answered_false_nor_its_result_lost(
    slow_bridge, slow_proxy, servers, names, workers, cql
):
    """The completing LWT times out (its coordinator stalls 2.5 s, BRIDGE_CASSANDRA_TIMEOUT 1 s)
    and then applies. The SERIAL read that resolves the unknown outcome runs before it lands, so
    the bridge takes the completion for refused: it answers ``false`` ("not your lease") and voids
    the result it wrote ahead. The task IS completed (by this very ack): the engine must still get
    its result, and the worker must not be told it lost the lease."""
    from bridge.client.results import results_consumer

    b = await slow_bridge(cassandra_timeout=1.0)
    svc = service_id()
    async with (
        Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=60) as eng,
        results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc) as results,
    ):
        task_id = await eng.add(svc, "v", token={"t": 1})
        w = await workers(svc, "w", timeout=15)
        t = await w.fetch(time_to_recover_ms=60_000)
        assert t is not None and t.id == task_id
        held = hold_statement(b, slow_proxy, "complete", "completion_id", 2.5)
        try:
            answer: Any = await bounded(t.ack("the result"), 20, "ack")
        except (UnavailableError, TransportError) as exc:
            answer = exc
        assert held and slow_proxy.held_frames == 1

        def lease() -> Any:
            return lease_of(cql, servers.keyspace, svc, task_id)

        await wait_for(lambda: lease()["state"] == "done", 10, what="the held completion applied")
        assert lease()["completion_id"] == held[0], "completed by this very ack"
        # The worker: told it completed the task (true), or unavailable (then its retry says true).
        if not isinstance(answer, bool):
            answer = await w.ack("the result", task_id=t.id, epoch=t.epoch)
        try:
            got = await asyncio.wait_for(results.get(), 10)
        except TimeoutError:
            got = None
        problems = []
        if answer is not True:
            problems.append(f"the ack that completed the task was answered {answer!r}")
        if got is None or got.get("taskId") != task_id:
            problems.append(f"the engine never got the completed task's result (got {got!r})")
        assert not problems, "; ".join(problems)


async def test_a_claim_that_lands_after_its_fetch_gave_up_is_handed_to_the_worker_retrying(
    slow_bridge, slow_proxy, servers, names, workers, cql
):
    """The claiming LWT times out (its coordinator stalls 2.5 s, BRIDGE_CASSANDRA_TIMEOUT 1 s) and
    lands after the SERIAL read that resolved it as lost. The task is then leased to this worker
    for its whole timeToRecover (60 s): the worker's next fetch must hand it over (it is this
    worker's), not leave it to nobody for a minute."""
    b = await slow_bridge(cassandra_timeout=1.0)
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=60) as eng:
        task_id = await eng.add(svc, "v")
        w = await workers(svc, "w", timeout=15)
        held = hold_statement(b, slow_proxy, "claim_new", "claim_id", 2.5)
        try:
            first: Any = await bounded(w.fetch(time_to_recover_ms=60_000), 20, "fetch")
        except (UnavailableError, TransportError) as exc:
            first = exc
        assert held and slow_proxy.held_frames == 1

        def lease() -> Any:
            return lease_of(cql, servers.keyspace, svc, task_id)

        await wait_for(lambda: lease() is not None, 10, what="the held claim applied")
        row = lease()
        if first is not None and not isinstance(first, Exception):
            assert first.id == task_id
            return  # handed over at once: fine
        assert row["claim_id"] == held[0] and row["worker"] == "w"
        again = await bounded(w.fetch(time_to_recover_ms=60_000), 20, "the retried fetch")
        other = await (await workers(svc, "w2", timeout=15)).fetch()
        assert again is not None and again.id == task_id, (
            f"first fetch answered {first!r}; the task is leased to 'w' for 60 s, yet w's retry got "
            f"{again!r} and another worker got {other!r}"
        )


async def test_a_stalled_store_bridge_stops_taking_requests_so_a_healthy_one_serves(
    slow_bridge, make_bridge, slow_proxy, servers, names, workers
):
    """Two bridges; one's Cassandra stalls 8 s (connection open, no answers), then is fast again.
    Issue 13.10 asks an unready bridge to stop consuming so that the healthy one serves: a fetch
    sent during the stall must not be taken by the stalled bridge and answered `unavailable` 5 s
    later while the healthy bridge sits idle."""
    await make_bridge()
    await slow_bridge()
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=60) as eng:
        for i in range(8):
            await eng.add(svc, i)
        ws = [await workers(svc, f"w{i}", timeout=10) for i in range(8)]
        slow_proxy.stall_requests()
        asyncio.get_running_loop().call_later(8.0, slow_proxy.release)
        t0 = time.monotonic()
        outcomes = []
        for w in ws:
            s = time.monotonic()
            try:
                t = await w.fetch(time_to_recover_ms=60_000)
                outcomes.append(("ok" if t else "none", round(s - t0, 1), round(time.monotonic() - s, 1)))
            except (UnavailableError, TransportError) as exc:
                outcomes.append((type(exc).__name__, round(s - t0, 1), round(time.monotonic() - s, 1)))
            if time.monotonic() - t0 > 7:
                break
        # The stalled bridge may take what arrives before it can tell a stall from a slow
        # statement (half the 5 s timeout); every fetch sent after that is the healthy bridge's.
        after = [o for o in outcomes if o[1] >= 3.0]
        assert after, f"no fetch was sent after the stall was noticed: {outcomes}"
        bad = [o for o in after if o[0] != "ok" or o[2] > 2.0]
        assert not bad, f"fetches during the stall (the healthy bridge beside it): {outcomes}"


@pytest.mark.parametrize("stall_s", [8.0, 12.0])
async def test_an_ack_during_a_stall_is_answered_before_the_clients_deadline(
    stall_s, slow_bridge, slow_proxy, servers, names, workers
):
    """Defaults: client timeout 10 s, BRIDGE_CASSANDRA_TIMEOUT 5 s. Cassandra stalls 8 s, then
    answers again. An ack (or an extend) sent during the stall must get an answer (true, or a
    clear `unavailable`) before its caller's deadline, not be worked on past it."""
    await slow_bridge()
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=60) as eng:
        await eng.add(svc, "a")
        await eng.add(svc, "b")
        w1 = await workers(svc, "w1", timeout=10)
        w2 = await workers(svc, "w2", timeout=10)
        t1 = await w1.fetch(time_to_recover_ms=60_000)
        t2 = await w2.fetch(time_to_recover_ms=60_000)
        slow_proxy.stall_requests()
        asyncio.get_running_loop().call_later(stall_s, slow_proxy.release)
        results: dict[str, Any] = {}

        async def one(name: str, coro: Any) -> None:
            s = time.monotonic()
            try:
                results[name] = (await coro, round(time.monotonic() - s, 1))
            except (UnavailableError, TransportError) as exc:
                results[name] = (type(exc).__name__, round(time.monotonic() - s, 1))

        await asyncio.gather(one("ack", t1.ack("done")), one("extend", t2.extend(60_000)))
        timed_out = {k: v for k, v in results.items() if v[0] == "RequestTimeout"}
        print(results)
        assert not timed_out, f"no answer within the client's 10 s: {results}"


async def test_background_loops_during_a_stall_do_not_spin_or_pile_up_and_recover(
    slow_bridge, slow_proxy, servers, names, workers
):
    """An idle bridge holding the duty (scheduler, relay, counts, clock): statements sent during a
    6 s stall stay within what 6 s of normal running sends (no retry storm, no pile-up of
    concurrent statements), and the bridge serves at once when the stall ends."""
    b = await slow_bridge()
    await wait_for(lambda: b.duty.held, 15, what="the duty")
    svc = service_id()
    w = await workers(svc, "w", timeout=10)
    waiter = asyncio.create_task(w.fetch(wait_ms=15_000))  # a long-poll waiting across the stall

    def total() -> int:
        return sum(b.db.statements.values())

    n0 = total()
    await asyncio.sleep(6)  # a measured window: the statements of 6 s of normal running
    normal = total() - n0
    cpu0 = time.process_time()
    slow_proxy.stall_requests()
    n1 = total()
    await asyncio.sleep(6)  # the fault itself: a 6 s stall, measured like the window above
    stalled = total() - n1
    cpu = time.process_time() - cpu0
    slow_proxy.release()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=30) as eng:
        s = time.monotonic()
        task_id = await eng.add(svc, "after")
        got = await bounded(waiter, 20, "the long-poll across the stall")
        took = time.monotonic() - s
    print(f"statements: normal {normal}, stalled {stalled}; cpu {cpu:.2f}s; after: {took:.1f}s")
    assert stalled <= 2 * normal + 20
    assert cpu < 3.0
    assert got is not None and got.id == task_id and took < 5


HELD_PAST_THE_SWEEP_S = 12.0


@pytest.mark.timeout(100)
async def test_a_completion_landing_after_the_relay_swept_its_bucket_still_reaches_the_engine(
    slow_bridge, slow_proxy, servers, names, workers, cql
):
    """The completing LWT is held on its way to Cassandra (a coordinator stalled, a link down and
    its TCP retransmitting) past the bridge's timeout, its re-send too, and past the moment the
    result relay sweeps the bucket of the result written ahead. The relay read the task still
    leased to the worker and voided the result as one whose completion never applied; then the
    held completion applied. The worker's retried ack is answered true (this worker completed it),
    and the engine never heard of the task. While the lease can still take the completion (leased
    at the epoch it was claimed before the result was written), the result stays owed."""
    from bridge.client.results import results_consumer
    from bridge.domain.timeline import OUTBOX_BUCKET_MS, ms_of, outbox_bucket

    b = await slow_bridge(cassandra_timeout=1.0, result_republish_after=0.5)
    svc = service_id()
    async with (
        Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=60) as eng,
        results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc) as results,
    ):
        await wait_for(lambda: b.duty.held, 15, what="the slow bridge holds the relay's duty")
        task_id = await eng.add(svc, "v", token={"t": 1})
        w = await workers(svc, "w", timeout=15)
        t = await w.fetch(time_to_recover_ms=120_000)
        assert t is not None and t.id == task_id
        held = hold_both_copies(b, slow_proxy, "complete", "completion_id", HELD_PAST_THE_SWEEP_S)
        # Written early in the second half of its 10 s outbox bucket: the relay sweeps it 4-7 s later.
        # Up to two windows (a 1 s window every 10 s): one stall of the event loop across the first
        # one (a loaded CI) pushed a 12 s wait past its timeout.
        await wait_for(lambda: 5_000 <= time.time() * 1000 % OUTBOX_BUCKET_MS <= 6_000, 25, what="the bucket's half")
        try:
            answer: Any = await bounded(t.ack("the result"), 20, "ack")
        except (UnavailableError, TransportError) as exc:
            answer = exc
        assert held, "the completion was sent"
        assert answer is not True, f"the held completion could not have applied yet: answered {answer!r}"
        bucket = outbox_bucket(ms_of(held[0]))

        def lease() -> Any:
            return lease_of(cql, servers.keyspace, svc, task_id)

        sched = b.scheduler
        await wait_for(
            lambda: sched._outbox_next is not None and sched._outbox_next > bucket,
            HELD_PAST_THE_SWEEP_S,
            what="the relay swept the result's bucket",
        )
        assert lease()["state"] == "leased", "the relay must sweep before the held completion lands (test timing)"
        await wait_for(lambda: lease()["state"] == "done", 30, what="the held completion applied")
        assert lease()["completion_id"] == held[0], "completed by the held ack"
        again = await w.ack("the result", task_id=t.id, epoch=t.epoch)
        assert again is True, "the worker completed the task"
        try:
            got = await asyncio.wait_for(results.get(), 30)
        except TimeoutError:
            got = None
        assert got is not None and got.get("taskId") == task_id, (
            f"the engine never got the completed task's result (got {got!r})"
        )


async def test_a_fetch_retried_on_another_bridge_while_its_claim_is_on_its_way_gets_that_task(
    slow_bridge, slow_proxy, make_bridge, engine, servers, cql
):
    """A fetch's claim is held on its way to Cassandra past its bridge's timeout (its re-send too):
    the fetch is answered ``unavailable`` and the worker retries on another bridge, while the held
    claim may still land. Had the retry claimed another task, the held claim would then lease the
    worker a second task that none of its fetches returns (it would wait out its timeToRecover, up
    to 12 h). The failed claim's hint goes back to the head of the hint queue, so the retry claims
    that same task: whichever claim lands, the worker holds one lease, the one it was handed.
    (Two fetches of one worker running at the same moment on two bridges are a known limit:
    test_same_worker_races.py.)"""
    from bridge.domain.errors import Unavailable as DomainUnavailable

    slow = await slow_bridge(cassandra_timeout=1.0)
    other = await make_bridge()
    svc = service_id()
    added = [await engine.add(svc, f"v{i}") for i in range(3)]
    held = hold_both_copies(slow, slow_proxy, "claim_new", "claim_id", 4.0)
    try:
        first: Any = await bounded(slow.queue.fetch(OWNERS[0], worker_fetch(svc)), 20, "the first fetch")
    except DomainUnavailable as exc:  # its claim's outcome is unknown
        first = exc
    assert held, "a claim was sent"
    assert not hasattr(first, "task_id"), f"the held claim could not have applied yet: {first!r}"
    retry = await bounded(other.queue.fetch(OWNERS[0], worker_fetch(svc)), 20, "the retry on another bridge")
    assert retry is not None
    await wait_for(lambda: not slow_proxy._late, 15, what="the held claims reached Cassandra")

    leased = tasks_leased_to(cql, servers.keyspace, svc, "w")
    assert leased == [retry.task_id], (
        f"the worker was handed {retry.task_id} (of {added}) by its retry, and holds the leases of {leased}: "
        "a task leased to it that no fetch of it returns waits out its lease"
    )


async def test_a_fetch_retried_on_another_bridge_while_its_slow_claim_still_lands_gets_that_task(
    slow_bridge, slow_proxy, make_bridge, engine, servers, cql
):
    """The same retry, but the first claim is slow rather than lost: held 2.5 s on its way, within
    its bridge's timeout, it lands. Its worker's client gave up on the reply meanwhile and retried
    on another bridge. The retry read the worker's pointer, which names the task written ahead for
    the slow claim, found that task not (yet) the worker's and claimed another one; then the slow
    claim landed, and its reply went to nobody. The worker held two leases, was handed one, and the
    other waited out its whole timeToRecover (up to 12 h) with no fetch of the worker returning it.
    The retry now claims the task the pointer announces, for the worker; the slow claim, refused,
    finds it leased to its worker at the epoch it announced and answers with it too."""
    slow = await slow_bridge(cassandra_timeout=5.0)
    other = await make_bridge()
    svc = service_id()
    added = [await engine.add(svc, f"v{i}") for i in range(3)]
    held = hold_statement(slow, slow_proxy, "claim_new", "claim_id", 2.5)
    first = asyncio.ensure_future(slow.queue.fetch(OWNERS[0], worker_fetch(svc)))
    await wait_for(lambda: bool(held) and slow_proxy.held_frames == 1, 10, what="the slow claim on its way")
    retry = await bounded(other.queue.fetch(OWNERS[0], worker_fetch(svc)), 20, "the retry on another bridge")
    late = await bounded(first, 20, "the slow fetch")  # its reply would go to a client that gave up
    assert retry is not None

    leased = tasks_leased_to(cql, servers.keyspace, svc, "w")
    assert leased == [retry.task_id], (
        f"the worker was handed {retry.task_id} (of {added}) by its retry, and holds the leases of {leased} "
        f"(the slow fetch answered {late!r}, to nobody): a task leased to it that no fetch of it returns "
        "waits out its lease"
    )
    assert late is None or late.task_id == retry.task_id


async def _a_slow_re_claim_on_its_way(slow_bridge: Any, slow_proxy: Any, make_bridge: Any, engine: Any) -> Any:
    """A task whose lease (w0's) ran out, and worker w's fetch on the slow bridge, whose re-claim
    of it (epoch 2) is held 2.5 s on its way: (the other bridge, service, task id, w's fetch)."""
    slow = await slow_bridge(cassandra_timeout=5.0)
    other = await make_bridge()
    svc = service_id()
    task_id = await engine.add(svc, "abandoned by w0")
    gone = await bounded(other.queue.fetch(OWNERS[0], worker_fetch(svc, "w0", ttr=300)), 20, "w0's fetch")
    assert gone is not None and gone.task_id == task_id
    held = hold_statement(slow, slow_proxy, "claim_expired", "claim_id", 2.5)
    # A long-poll, woken by the task's hint once w0's lease is taken back: its re-claim is held.
    first = asyncio.ensure_future(slow.queue.fetch(OWNERS[0], worker_fetch(svc, wait_ms=10_000)))
    await wait_for(lambda: bool(held) and slow_proxy.held_frames == 1, 15, what="the slow re-claim on its way")
    return other, svc, task_id, first


async def test_a_fetch_retried_on_another_bridge_while_its_slow_re_claim_is_on_its_way_gets_that_task(
    slow_bridge, slow_proxy, make_bridge, engine, servers, cql
):
    """The same for a task whose lease ran out: the first copy's re-claim (epoch 2) is held 2.5 s.
    The retry reads the pointer the first copy wrote ahead, finds the lease still at epoch 1 (run
    out, not yet re-claimed) and re-claims that task for the worker (``claims{source="pointer"}``).
    The code before passed this too, by another way: finding no hint (the first copy held the
    task's), its fetch scanned the ready index and re-claimed the task from there. This test keeps
    the re-claim branch of the pointer's claim, which nothing else runs."""
    other, svc, task_id, first = await _a_slow_re_claim_on_its_way(slow_bridge, slow_proxy, make_bridge, engine)
    retry = await bounded(other.queue.fetch(OWNERS[0], worker_fetch(svc)), 20, "the retry on another bridge")
    late = await bounded(first, 20, "the slow fetch")  # its reply would go to a client that gave up
    leased = tasks_leased_to(cql, servers.keyspace, svc, "w")
    assert retry is not None and (retry.task_id, retry.epoch) == (task_id, 2), (
        f"the retry answered {retry!r} while the slow re-claim was on its way; the slow fetch answered "
        f"{late!r}, to nobody; the worker holds the leases of {leased}"
    )
    assert leased == [task_id]
    assert late is None or late.task_id == task_id
    claims = other.metrics.registry.get_sample_value
    assert claims("queue_bridge_claims_total", {"source": "pointer", "outcome": "won"}) == 1


async def test_a_retried_fetch_whose_re_claim_loses_to_its_slow_first_copy_gets_that_task_not_another(
    slow_bridge, slow_proxy, make_bridge, engine, servers, cql
):
    """The first copy's re-claim (epoch 2) lands between the retry's refused resend and the
    retry's own re-claim: the retry's is refused by a lease leased to its worker at the epoch it
    announced. A refused UPDATE reports only the columns of its condition (no worker), so the
    refusal read as a lost race: the retry claimed the next task, and the first one stayed leased
    to the worker for its whole lease, handed to nobody. Found by review, 2026-12-06."""
    other, svc, task_id, first = await _a_slow_re_claim_on_its_way(slow_bridge, slow_proxy, make_bridge, engine)
    next_id = await engine.add(svc, "the next task")

    def epoch_of_the_lease() -> int:
        rows = cql.execute(
            f"SELECT epoch FROM {servers.keyspace}.leases WHERE owner = %s AND service = %s AND task_id = %s",
            (OWNERS[0], svc, uuid.UUID(task_id)),
        )
        return int(rows.one()["epoch"])

    real = other.store.claim_expired

    async def after_the_slow_one(*args: Any, **kwargs: Any) -> Any:
        # The retry's own re-claim goes once the slow one landed (its resend was refused before).
        await wait_for(lambda: epoch_of_the_lease() == 2, 15, what="the slow re-claim landed")
        return await real(*args, **kwargs)

    other.store.claim_expired = after_the_slow_one
    retry = await bounded(other.queue.fetch(OWNERS[0], worker_fetch(svc)), 30, "the retry on another bridge")
    late = await bounded(first, 20, "the slow fetch")
    leased = tasks_leased_to(cql, servers.keyspace, svc, "w")
    assert retry is not None and (retry.task_id, retry.epoch) == (task_id, 2), (
        f"the retry answered {retry!r} (the next task is {next_id}); the slow fetch answered {late!r}, "
        f"to nobody; the worker holds the leases of {leased}"
    )
    assert leased == [task_id]
