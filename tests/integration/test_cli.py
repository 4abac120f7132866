"""The ``queue-bridge`` command line against the servers, run as real subprocesses.

The add/fetch/ack commands talk to the in-process ``bridge`` fixture over RabbitMQ, ``stats``
reads the same Cassandra keyspace. The commands that need no server are in tests/unit/test_cli.py.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import anyio
import pytest

from bridge.client import Engine, Worker
from bridge.domain import lifecycle
from tests.cli import cli, cli_many, no_traceback, ok
from tests.conftest import ENGINE_USER, OWNERS, Servers, service_id, wait_for
from tests.integration.test_fault_drills import HAVE_FAKETIME, faketime

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]


async def stats(service: str, env: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ok(await cli("stats", service, "--owner", OWNER, "--json", env=env)))
    assert doc["owner"] == OWNER and doc["service"] == service
    assert doc["truncated"] is False
    return doc


async def fail_as_poison(servers: Servers, names: dict[str, str], svc: str, n: int) -> list[str]:
    """Fetch ``n`` tasks of the queue and fail each once: with maxDeliveries 1 (counted again from
    a redrive), each is parked. Their ids."""
    ids: list[str] = []
    async with Worker(servers.amqp_url(OWNER), service=svc, worker_id="w-park", exchange=names["exchange"]) as w:
        for _ in range(n):
            deadline = time.monotonic() + 20
            task = await w.fetch(60_000)
            while task is None and time.monotonic() < deadline:
                task = await w.fetch(60_000, wait_ms=1000)
            assert task is not None
            outcome = await task.fail({"why": "poison"})
            assert outcome is not None and outcome.parked, outcome
            ids.append(task.id)
    return ids


async def park(servers: Servers, names: dict[str, str], svc: str, n: int) -> list[str]:
    """Add ``n`` tasks with maxDeliveries 1 and fail each once: ``n`` parked tasks, their ids."""
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=names["exchange"]) as engine:
        for i in range(n):
            assert await engine.add(svc, {"n": i}, max_deliveries=1) is not None
    return await fail_as_poison(servers, names, svc, n)


async def test_add_stats_fetch_ack_round_trip(bridge: Any, bridge_env: dict[str, str], servers: Servers) -> None:
    svc = service_id()
    engine_url = servers.amqp_url(ENGINE_USER)
    worker_url = servers.amqp_url(OWNER)  # a worker's owner is its AMQP user

    before_add = time.time()
    out = ok(
        await cli(
            "add", svc, '{"invoice": 42}', "--token", '{"p": 1}', "--owner", OWNER, "--amqp-url", engine_url,
            env=bridge_env,
        )
    )  # fmt: skip
    task_id = out.strip()
    assert uuid.UUID(task_id).version == 1, out

    # The table form once; JSON below.
    table = ok(await cli("stats", svc, "--owner", OWNER, env=bridge_env))
    lines = dict(line.split(None, 1) for line in table.splitlines() if line and not line.startswith("note"))
    assert lines["ready"].strip() == "1", table
    assert f"{OWNER} / {svc}" in table
    s = await stats(svc, bridge_env)
    assert (s["ready"], s["in_flight"], s["done"], s["dead"]) == (1, 0, 0, 0), s
    assert s["scanned"] == 1
    # Measured from the task's creation: after the add began, before now (the age is clamped at 0,
    # and the CLI processes in between take seconds, so 0 would mean a wrong timestamp).
    assert 0 < s["oldest_ready_age_s"] <= time.time() - before_add + 0.5, s

    fetched = json.loads(
        ok(await cli("fetch", svc, "--worker", "w1", "--ttr", "60000", "--amqp-url", worker_url, env=bridge_env))
    )
    assert fetched["id"] == task_id
    assert fetched["value"] == {"invoice": 42}
    assert fetched["deliveries"] == 1
    assert fetched["leaseExpiresAt"]

    s = await stats(svc, bridge_env)
    assert (s["ready"], s["in_flight"], s["done"], s["dead"]) == (0, 1, 0, 0), s
    assert s["oldest_ready_age_s"] is None

    lease = ("--task-id", fetched["id"], "--epoch", str(fetched["epoch"]))  # an ack names its task
    acked = ok(
        await cli(
            "ack", svc, "--worker", "w1", *lease, "--result", '{"paid": true}', "--amqp-url", worker_url,
            env=bridge_env,
        )
    )  # fmt: skip
    assert acked.strip() == "true"

    # In flight is also read from the queue's counters, which the bridge writes about once a
    # second: the ack's -1 lands within that.
    async def settled() -> dict[str, Any] | None:
        got = await stats(svc, bridge_env)
        return got if got["in_flight"] == 0 else None

    s = await wait_for(settled, 15, interval=0.2, what="in flight 0 once the counts are written")
    assert (s["ready"], s["in_flight"], s["dead"]) == (0, 0, 0), s
    assert s["done"] == 1, s  # no fetch since the task's: the scan cursor has not moved past it yet

    # Sequential on purpose: this fetch lets the dispatcher move (and persist) its cursor past the task.
    again = await cli("fetch", svc, "--worker", "w1", "--amqp-url", worker_url, env=bridge_env)
    assert ok(again).strip() == "null"


async def test_stats_judges_tasks_on_the_bridges_clock_not_this_hosts(
    bridge: Any, bridge_env: dict[str, str], engine: Engine, servers: Servers, names: dict[str, str]
) -> None:
    """``stats`` reads Cassandra directly; task ids, due times and lease deadlines are on the
    bridges' clock: Cassandra's by default (BRIDGE_CLOCK_SOURCE=cassandra), the hosts' with ``host``.

    Defect: it judged every task against its own host's wall clock (``time.time_ns()``): on an
    operator host 30 s behind, 3 tasks ready for a worker right now were counted delayed, and the
    table (which had no delayed or parked row) said ready 0. Now it reads Cassandra's time once
    (honouring BRIDGE_CLOCK_SOURCE=host), and the table has the delayed and parked rows."""
    assert HAVE_FAKETIME, "libfaketime is installed by deploy/local/stack.sh (Debian package faketime)"
    svc = service_id()
    await park(servers, names, svc, 1)
    for i in range(3):
        await engine.add(svc, i)
    await engine.add(svc, "later", delay_ms=600_000)
    args = ("stats", svc, "--owner", OWNER)
    behind = faketime("-30s")
    right, skewed, table, host_time = await cli_many(
        ((*args, "--json"), {}),
        ((*args, "--json"), behind),
        (args, behind),
        # A host-time fleet on this host would have stamped the tasks 30 s earlier: none is due yet by it.
        ((*args, "--json"), {**behind, "BRIDGE_CLOCK_SOURCE": "host"}),
        env=bridge_env,
    )
    for doc in (json.loads(ok(right)), json.loads(ok(skewed))):
        assert (doc["ready"], doc["delayed"], doc["parked"], doc["in_flight"]) == (3, 1, 1, 0), doc
        assert 0 < doc["oldest_ready_age_s"] < 25, doc
    rows = dict(line.rsplit("  ", 1) for line in ok(table).splitlines() if not line.startswith("note"))
    rows = {name.strip(): value.strip() for name, value in rows.items()}
    assert (rows["ready"], rows["delayed"], rows["parked"]) == ("3", "1", "1"), rows
    by_host = json.loads(ok(host_time))
    assert (by_host["ready"], by_host["delayed"]) == (0, 4), by_host


async def test_stats_on_a_missing_keyspace_says_how_to_create_it(bridge_env: dict[str, str]) -> None:
    """``stats`` answers a keyspace that does not exist with "cannot use keyspace ...; does it
    exist? `queue-bridge schema` creates it" (exit code 1).

    Defect: the driver's error arrives as bridge.storage.errors.InvalidQuery, which the errors
    ``stats`` catches did not include: a traceback instead of the hint."""
    keyspace = f"qb_missing_{uuid.uuid4().hex[:8]}"
    extra = {"BRIDGE_CASSANDRA_KEYSPACE": keyspace}
    proc = await cli("stats", service_id(), "--owner", OWNER, env=bridge_env, extra=extra)
    assert proc.returncode == 1, proc
    no_traceback(proc)
    assert f"cannot use keyspace {keyspace!r}" in proc.stderr and "`queue-bridge schema` creates it" in proc.stderr
    assert proc.stdout == ""


async def test_redrive_waits_as_long_as_the_bridges_redrive_rate_needs(
    make_bridge: Any, bridge_env: dict[str, str], servers: Servers, names: dict[str, str]
) -> None:
    """The bridge puts parked tasks back at BRIDGE_REDRIVE_RATE a second and answers when done;
    the client awaits the reply that much longer only if told the rate (``redrive_rate``).

    Defect: ``redrive`` read the settings but never passed the rate, so it waited as if at the
    default 50/s: at 1/s, redriving 12 named tasks exited 1 "no reply from the bridge within
    10.0s" although the bridge put all 12 back (a success reported as a failure). And the message
    named --timeout, not the wait it had really allowed."""
    await make_bridge(redrive_rate=1.0)
    svc = service_id()
    ids = await park(servers, names, svc, 12)
    engine_url = servers.amqp_url(ENGINE_USER)
    proc = await cli(
        "redrive", svc, *ids, "--owner", OWNER, "--amqp-url", engine_url,
        env=bridge_env, extra={"BRIDGE_REDRIVE_RATE": "1"},
    )  # fmt: skip
    assert json.loads(ok(proc)) == {"redriven": 12}

    # An operator's BRIDGE_REDRIVE_RATE left at the default (50/s) while the bridge does 1/s: 3
    # tasks take the bridge 2 s, the CLI waits --timeout 1 + 3/50 s, and says so.
    again = await fail_as_poison(servers, names, svc, 3)
    late = await cli(
        "redrive", svc, *again, "--owner", OWNER, "--amqp-url", engine_url, "--timeout", "1", env=bridge_env
    )
    assert late.returncode == 1, late
    no_traceback(late)
    # The wait it allowed, and that the outcome is unknown (the bridge is still putting them
    # back), not "is a bridge consuming?" (said until 2026-12-06).
    assert "no answer within 1.06s: the outcome is unknown" in late.stderr, late.stderr
    assert "is a bridge consuming" not in late.stderr
    # The bridge still puts them back (and leaves nothing parked behind this test).
    async with Engine(engine_url, owner=OWNER, exchange=names["exchange"]) as engine:

        async def none_parked() -> bool:
            return await engine.parked(svc) == []

        await wait_for(none_parked, 15, interval=0.5, what="the 3 tasks put back at 1/s")


@pytest.mark.timeout(120)  # 101 tasks parked one fail each, then put back in three requests
async def test_redrive_all_puts_back_every_parked_task_not_only_one_requests_worth(
    make_bridge: Any, bridge_env: dict[str, str], servers: Servers, names: dict[str, str], monkeypatch: Any
) -> None:
    """``redrive SERVICE --all``: "Put back every parked task of the queue". One ``all`` request puts
    back up to 1000 (docs/asyncapi.yaml, redrive: "send it again until it answers 0").

    Defect: the CLI (through Engine.redrive(all=True)) sent it once: with 1001 parked tasks it
    printed {"redriven": 1000}, exited 0, and one task stayed parked. The bridge here (in this
    process) puts back 50 a request, so 101 parked tasks take three requests, the last one partly
    full, as 1001 would with 1000 (parking 1001 tasks took 20 s of the suite)."""
    monkeypatch.setattr(lifecycle, "REDRIVE_ALL_MAX", 50)
    await make_bridge(redrive_rate=5000.0)
    svc = service_id()
    n = 101
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=names["exchange"]) as engine:
        for i in range(n):
            await engine.add(svc, {"n": i}, max_deliveries=1, wait=False)

        parked = 0

        async def park_some(k: int) -> None:
            nonlocal parked
            async with Worker(servers.amqp_url(OWNER), service=svc, worker_id=f"w{k}", exchange=names["exchange"]) as w:
                while parked < n:
                    task = await w.fetch(60_000, wait_ms=1000)
                    if task is None:
                        continue
                    outcome = await task.fail({"why": "poison"})
                    assert outcome is not None and outcome.parked
                    parked += 1

        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for k in range(8):
                    tg.start_soon(park_some, k)
        assert parked == n

        # At 5000/s the pace is not what takes the time: Cassandra is (an LWT and a few writes a
        # task, 10 s for 1000 on a loaded machine), hence the long --timeout.
        proc = await cli(
            "redrive", svc, "--all", "--owner", OWNER, "--amqp-url", servers.amqp_url(ENGINE_USER), "--timeout", "60",
            env=bridge_env, extra={"BRIDGE_REDRIVE_RATE": "5000"}, limit=180,
        )  # fmt: skip
        assert json.loads(ok(proc)) == {"redriven": n}
        assert await engine.parked(svc, 1000) == []


async def test_schema_print_gives_the_schema_the_bridge_needs(bridge_env, cql):
    """`queue-bridge schema --print` ("Print the CQL instead of applying it"; docs/storage.md: the
    CQL, printed) leaves out the columns `schema` adds with ALTER TABLE (ready.priority,
    ready.max_deliveries, leases.base_epoch, ...): a keyspace made from the printed CQL (a DBA
    applying it, a bridge role without ALTER) lacks columns every bridge statement uses."""
    from bridge.storage.statements import STATEMENTS

    ks = f"qb_print_{uuid.uuid4().hex[:8]}"
    printed = ok(await cli("schema", "--print", env={**bridge_env, "BRIDGE_CASSANDRA_KEYSPACE": ks}))
    try:
        for part in printed.split(";\n"):
            # As cqlsh reads it: comment lines (the table options, for a DBA to choose) are skipped.
            statement = "\n".join(line for line in part.splitlines() if not line.startswith("--")).strip()
            if statement:
                cql.execute(statement, timeout=60)
        undefined = []
        for name, (text, _) in STATEMENTS.items():
            try:
                cql.prepare(text.replace("{ks}", ks))
            except Exception as exc:  # InvalidRequest: Undefined column name ...
                undefined.append(f"{name}: {exc}")
        assert not undefined, "\n".join(undefined)
    finally:
        cql.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=120)


@pytest.mark.timeout(120)
async def test_purge_says_where_it_acts_and_purges_the_queue_through_the_bridge(
    bridge: Any, bridge_env: dict[str, str], servers: Servers, names: dict[str, str]
) -> None:
    """``purge`` names its target on stderr before acting (broker, vhost, user, owner, service),
    sends its rounds itself (to report what earlier ones did if a later one fails) and waits for
    a round as long as its 20,000 tasks may take, not the bare --timeout."""
    svc = service_id()
    n = 300
    engine_url = servers.amqp_url(ENGINE_USER)
    async with Engine(engine_url, owner=OWNER, exchange=names["exchange"]) as engine:
        for i in range(n):
            assert await engine.add(svc, {"n": i}) is not None  # stored once answered
        proc = await cli(
            "purge", svc, "--yes", "--owner", OWNER, "--amqp-url", engine_url, env=bridge_env, limit=90,
        )  # fmt: skip
        assert json.loads(ok(proc)) == {"purged": n}
        line = proc.stderr.strip()
        assert line.startswith(f"purge: cancelling every ready task of service {svc!r} on RabbitMQ "), line
        assert f"as user {ENGINE_USER!r}, owner {OWNER!r}" in line and f"bridge exchange {names['exchange']!r}" in line
        assert "vhost '/'" in line
    async with Worker(servers.amqp_url(OWNER), service=svc, worker_id="w-after", exchange=names["exchange"]) as w:
        assert await w.fetch() is None, "a task survived the purge"


async def test_purge_that_stops_short_says_ready_tasks_may_remain(
    bridge: Any, bridge_env: dict[str, str], servers: Servers, names: dict[str, str], monkeypatch: Any
) -> None:
    """A purge whose last request read as many entries as one may and cancelled none (a long run
    of tasks in flight ahead of the ready ones) stops, as sending it again would read the same:
    the CLI printed {"purged": 0} alone, and the operator took the queue for purged while tasks
    stayed ready (found by review, 2026-12-06)."""
    import bridge.domain.lifecycle as lifecycle

    monkeypatch.setattr(lifecycle, "PURGE_SCAN_MAX", 3)
    monkeypatch.setattr(lifecycle, "PURGE_PAGE", 3)
    svc = service_id()
    engine_url = servers.amqp_url(ENGINE_USER)
    async with Engine(engine_url, owner=OWNER, exchange=names["exchange"]) as engine:
        for i in range(5):
            await engine.add(svc, {"n": i})
        for i in range(4):  # in flight, ahead of the last one
            async with Worker(servers.amqp_url(OWNER), service=svc, worker_id=f"w{i}", exchange=names["exchange"]) as w:
                assert await w.fetch(time_to_recover_ms=120_000) is not None
        proc = await cli(
            "purge", svc, "--yes", "--owner", OWNER, "--amqp-url", engine_url, env=bridge_env, limit=90,
        )  # fmt: skip
        # Exit code 3: an answer, not all there is (0 let `purge --yes && deploy` go on).
        assert proc.returncode == 3, proc
        assert json.loads(proc.stdout) == {"purged": 0, "more": True}
        assert "ready tasks may remain" in proc.stderr


async def test_stats_counts_an_expired_lease_once(
    bridge: Any, bridge_env: dict[str, str], servers: Servers, names: dict[str, str]
) -> None:
    """The walk counts a lease that ran out as ready; the queue's counters count it in flight
    until it is claimed again, and the CLI printed the walk's ready beside the larger in flight:
    three workers dead holding three tasks read as 3 ready and 3 in flight, a drift of 3 that does
    not exist, which README tells operators to look for (found by review, 2026-12-06)."""
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=names["exchange"]) as engine:
        for i in range(3):
            await engine.add(svc, i)
    for i in range(3):
        async with Worker(servers.amqp_url(OWNER), service=svc, worker_id=f"dies{i}", exchange=names["exchange"]) as w:
            assert await w.fetch(time_to_recover_ms=200) is not None  # and never acked
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=names["exchange"]) as engine:

        async def ran_out() -> bool:
            [row] = (await engine.call("stats", {"serviceId": svc}, owner=OWNER))["result"]["services"]
            return row["oldestReadyAgeMs"] is not None

        await wait_for(ran_out, 20, interval=0.3, what="the leases ran out")
    doc = await stats(svc, bridge_env)
    assert doc["ready"] + doc["in_flight"] == 3, doc
    # An age of the oldest ready task beside 0 ready (the leases taken from ready) read as a task
    # waiting that is not there.
    assert (doc["ready"] == 0) == (doc["oldest_ready_age_s"] is None), doc


async def test_add_takes_a_priority_and_fetch_a_lease_the_bridge_accepts(
    bridge: Any, bridge_env: dict[str, str], servers: Servers
) -> None:
    """`add` had no `--priority` (the contract and the client have it since 1.4); `fetch --ttr`
    took values down to 1 ms that the bridge refuses (bad_request under 100): refused here now."""
    svc = service_id()
    engine_url, worker_url = servers.amqp_url(ENGINE_USER), servers.amqp_url(OWNER)
    added = {}
    for level in ("0", "3"):
        added[level] = ok(
            await cli(
                "add", svc, f'{{"level": {level}}}', "--priority", level, "--owner", OWNER, "--amqp-url", engine_url,
                env=bridge_env,
            )
        ).strip()  # fmt: skip
    fetched = json.loads(
        ok(await cli("fetch", svc, "--worker", "w1", "--ttr", "60000", "--amqp-url", worker_url, env=bridge_env))
    )
    assert fetched["id"] == added["3"], "the higher level first, though added last"
    refused = await cli("fetch", svc, "--worker", "w2", "--ttr", "50", "--amqp-url", worker_url, env=bridge_env)
    assert refused.returncode == 2 and "--ttr" in refused.stderr, refused.stderr


async def test_stats_counts_leases_and_parks_behind_the_scan_cursors(
    bridge: Any, bridge_env: dict[str, str], servers: Servers
) -> None:
    """`queue-bridge stats` walks the ready index from the scan cursors, and the live stats (the
    stats RPC, the gauges) move those cursors past entries already taken: afterwards the walk saw
    none of the tasks leased or parked before, and the command said 0 in flight and 0 parked for
    a queue with 70 leases held. Found by review. It reads them as the stats RPC does as well."""
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=bridge.settings.exchange) as engine:
        for i in range(70):
            await engine.add(svc, i)
        await engine.add(svc, "poison", max_deliveries=1)
        for i in range(70):
            reply = await engine.call(
                "fetch", {"serviceId": svc, "workerId": f"w{i}", "timeToRecover": 600_000}, owner=OWNER
            )
            assert reply["result"] is not None
        got = await engine.call("fetch", {"serviceId": svc, "workerId": "p", "timeToRecover": 600_000}, owner=OWNER)
        assert got["result"] == "poison"
        task = got["task"]
        failed = await engine.call(
            "fail",
            {"serviceId": svc, "workerId": "p", "taskId": task["id"], "epoch": task["epoch"], "error": "x"},
            owner=OWNER,
        )
        assert failed["result"] is True

        async def cursor_moved() -> bool:
            # The live stats move a lane's cursor past a run of 64 taken entries once they are
            # older than the dispatcher's settle window (about a second).
            await engine.call("stats", {"serviceId": svc}, owner=OWNER)
            walked = await stats(svc, bridge_env)
            return bool(walked["scanned"] < 71)

        await wait_for(cursor_moved, 30, interval=0.5, what="the scan cursor moved past the taken entries")
    s = await stats(svc, bridge_env)
    assert (s["in_flight"], s["parked"]) == (70, 1), s


async def test_stats_moves_no_scan_cursor(bridge: Any, bridge_env: dict[str, str], servers: Servers) -> None:
    """`queue-bridge stats` reads the live counts as the stats RPC does, and those move a lane's
    scan cursor past a run of taken entries: a read-only command (a role with SELECT only failed
    it), and in host clock mode judged on the operator's unchecked host clock, moved it. It
    leaves the cursors alone. Found by review."""
    from bridge.domain.records import LANE_FRESH, QueueKey

    svc = service_id()
    q = QueueKey(OWNER, svc)
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=bridge.settings.exchange) as engine:
        for i in range(70):
            await engine.add(svc, i)
        for i in range(70):
            got = await engine.call(
                "fetch", {"serviceId": svc, "workerId": f"w{i}", "timeToRecover": 600_000}, owner=OWNER
            )
            assert got["result"] is not None
    from bridge.app import WRITE_LATE_MS

    before = await bridge.store.cursor(q, LANE_FRESH)
    # The taken entries may be passed once older than the dispatcher's settle window.
    settled_at = bridge.clock.now_ms() + int(bridge.settings.clock_skew_margin * 1000) + WRITE_LATE_MS
    await wait_for(lambda: bridge.clock.now_ms() > settled_at, 10, what="the settle window gone by")
    s = await stats(svc, bridge_env)
    assert s["in_flight"] == 70, s
    assert await bridge.store.cursor(q, LANE_FRESH) == before, "stats moved the scan cursor"


# Review round 16 (the operator's CLI in an incident).


async def test_redrive_all_goes_on_from_a_position_with_the_first_runs_bound(
    make_bridge: Any, bridge_env: dict[str, str], servers: Servers, names: dict[str, str]
) -> None:
    """What the error of a `redrive --all` that failed part way prints (`--parked-before` and
    `--after` of its last answered request): the bridge goes on after that task with that bound, so
    tasks parked since stay parked. Before, a re-run took a new bound and put them back again."""
    await make_bridge(redrive_rate=5000.0)
    svc = service_id()
    first = await park(servers, names, svc, 3)
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=names["exchange"]) as engine:
        listed = {t.id: t for t in await engine.parked(svc, 1000)}
        bound_ms = max(_ms(listed[i].parked_at) for i in first) + 1
        bound = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(bound_ms // 1000)) + f".{bound_ms % 1000:03d}Z"
        later = await park(servers, names, svc, 2)
        listed = {t.id: t for t in await engine.parked(svc, 1000)}
        assert all(_ms(listed[i].parked_at) >= bound_ms for i in later), "parked after the bound"
        in_order = [t.id for t in await engine.parked(svc, 1000)]  # the index's order
        position = next(i for i in in_order if i in first)
        proc = await cli(
            "redrive", svc, "--all", "--parked-before", bound, "--after", position, "--owner", OWNER,
            "--amqp-url", servers.amqp_url(ENGINE_USER), "--timeout", "30",
            env=bridge_env, extra={"BRIDGE_REDRIVE_RATE": "5000"}, limit=60,
        )  # fmt: skip
        assert json.loads(ok(proc)) == {"redriven": 2}
        still = {t.id for t in await engine.parked(svc, 1000)}
        assert still == {position, *later}


def _ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1000)


async def test_cancel_run_again_with_its_request_id_answers_whether_that_one_cancelled(
    bridge: Any, bridge_env: dict[str, str], servers: Servers, names: dict[str, str]
) -> None:
    """What a cancel that got no answer tells the operator to do: the same --request-id answers
    true again when that request cancelled the task; a new request answers false."""
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=names["exchange"]) as engine:
        task = await engine.add(svc, {"n": 1})
    assert task is not None
    base = ("cancel", svc, task, "--owner", OWNER, "--amqp-url", servers.amqp_url(ENGINE_USER))
    rid = f"op-{uuid.uuid4()}"
    first = await cli(*base, "--request-id", rid, env=bridge_env)
    assert ok(first).strip() == "true"
    assert f"cancel: cancelling task {task} of service {svc!r}" in first.stderr
    again, other = await cli_many(((*base, "--request-id", rid), {}), (base, {}), env=bridge_env)
    assert ok(again).strip() == "true"
    assert ok(other).strip() == "false"


async def test_the_cli_moves_past_a_node_that_never_answers(servers: Servers, monkeypatch: Any) -> None:
    """BRIDGE_AMQP_HOSTS with a node that accepts TCP and never answers: each node was given the
    whole --timeout, inside one --timeout around the connect, so the next node was never tried and
    a run whose order started there failed. The order here is forced: hung node first."""
    from bridge.cli.requests import _with_client
    from bridge.client.rpc import Engine as CliEngine
    from tests.integration.test_start_stop_edges import Blackhole

    hole = await Blackhole().start()
    try:
        url = servers.amqp_url(ENGINE_USER)
        engine = CliEngine(url, owner=OWNER, timeout=3.0, connect_timeout=1.0)
        real = engine.urls[0]
        engine.urls = [real.replace(f":{servers.amqp_port}/", f":{hole.port}/"), real]
        assert f":{hole.port}/" in engine.urls[0]

        async def use(client: CliEngine) -> bool:
            return client.channel is not None and not client.channel.is_closed

        began = time.monotonic()
        assert await _with_client(engine, 3.0, use) is True
        assert time.monotonic() - began < 3.0 + 1.0
    finally:
        await hole.stop()


async def test_stats_says_when_the_queue_is_not_one_the_owner_has(
    bridge: Any, bridge_env: dict[str, str], servers: Servers, names: dict[str, str]
) -> None:
    """A mistyped SERVICE or --owner printed all zeros and exit 0, as for a drained queue."""
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=names["exchange"]) as engine:
        assert await engine.add(svc, {"n": 1}) is not None

    async def registered() -> bool:
        proc = await cli("stats", svc, "--owner", OWNER, "--json", env=bridge_env)
        return json.loads(ok(proc))["known"] is True

    await wait_for(registered, 20, what="the queue registered (the add registers it in the background)")
    typo, other_owner = await cli_many(
        (("stats", svc + "x", "--owner", OWNER, "--json"), {}),
        (("stats", svc, "--owner", OWNER + "x"), {}),
        env=bridge_env,
    )
    doc = json.loads(ok(typo))
    assert doc["known"] is False and doc["ready"] == 0
    assert f"owner {OWNER!r} has no queue {svc + 'x'!r} registered" in typo.stderr
    ok(other_owner)
    assert f"owner {OWNER + 'x'!r} has no queue {svc!r} registered" in other_owner.stderr
