"""Soak (issue 13): a steady load (``QB_SOAK_SECONDS``) with the bridge process's memory sampled
from /proc: it must stay flat once warm, and nothing is lost.

``make test`` runs a 20 s soak, within the suite's per-test timeout; ``make soak`` runs 30 minutes
(and raises the timeout on its command line).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path

import pytest

from bridge.client import Engine
from bridge.client.rpc import results_consumer
from tests.conftest import ENGINE_USER, OWNERS, service_id, wait_bridges, wait_for
from tests.history import History, lease_rows, run_workers

# ``exclusive`` (run after the parallel pass, alone): beside the suite's other processes its 40
# tasks/s were not served. Three runs of it in the parallel pass (a clean clone's CI among them)
# fell short of its deadline, 549 to 701 of 800 tasks done: acks per second fell from 24-42 to
# 4-10 for twenty seconds (the tasks left were the newest: a backlog, none stuck). Alone it passes,
# and beside three processes spinning on both cores too: what slowed it is what the other tests do
# to the servers it shares (one Cassandra node, one broker), not CPU alone. A soak
# measures leaks and losses, not what a busy machine leaves of a bridge; ``make soak`` runs it
# alone too (``-m soak``).
pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.slow, pytest.mark.soak, pytest.mark.exclusive]

SOAK_S = float(os.environ.get("QB_SOAK_SECONDS", "20"))
RATE = 40  # tasks per second, well below saturation: the soak is about leaks, not speed
WARM_UP_S = min(60.0, SOAK_S / 4)
SAMPLE_EVERY_S = min(5.0, SOAK_S / 10)
# The check is on the slope of RSS after warm-up (least squares over the samples), in KiB per task
# served: a flat 16 MiB allowance let a 20 s soak (about 600 tasks after warm-up) pass with a leak of
# 25 KiB per task. Allowed: LEAK_KIB_PER_TASK, plus what a one-off step of NOISE_MIB (an allocator
# arena, a cache filling) adds to the slope over the window (about 1.5 x its size / the window), which
# shrinks as the soak lengthens: a leak of 4 KiB a task fails the 20 s soak, of 1.1 KiB the 30 minutes.
LEAK_KIB_PER_TASK = 1.0
NOISE_MIB = 0.5


def slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per second."""
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    return sum((t - mt) * (r - mr) for t, r in samples) / sum((t - mt) ** 2 for t, _ in samples)


def allowed_slope(window_s: float) -> float:
    """The RSS slope (MiB/s) a soak of this window after warm-up may show at ``RATE`` tasks/s."""
    return 1.5 * NOISE_MIB / window_s + LEAK_KIB_PER_TASK * RATE / 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_steady_load_with_flat_memory(bridge_processes, servers, names, cql):
    proc = bridge_processes()
    await wait_bridges(servers, names, 1)
    pid = proc.proc.pid
    svc = service_id()
    total = int(SOAK_S * RATE)
    history = History()
    samples: list[tuple[float, float]] = []
    results: list[dict] = []
    start = time.monotonic()

    async def produce(engine: Engine) -> None:
        for i in range(total):
            due = start + i / RATE
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)  # pacing the load, not waiting for a result
            token = {"i": i} if i % 2 == 0 else None
            task_id = await engine.add(svc, i, token=token, message_id=f"{svc}-{i}")
            history.values[task_id] = i

    async def sample() -> None:
        while time.monotonic() - start < SOAK_S + SAMPLE_EVERY_S:
            samples.append((time.monotonic() - start, rss_mib(pid)))
            await asyncio.sleep(SAMPLE_EVERY_S)  # the sampling period, not a wait for a result

    async with (
        results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"]) as incoming,
        Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"]) as engine,
    ):
        sampler = asyncio.create_task(sample())
        load = asyncio.create_task(
            run_workers(servers.amqp_url(OWNERS[0]), names["exchange"], svc, history, 4, total, deadline_s=SOAK_S + 15)
        )
        await produce(engine)
        completed = await load
        await sampler
        if completed < total:
            # Said with what the tasks left over are: a bridge that stalled and one starved of CPU
            # (the suite's other processes beside it) look alike from the workers' side alone.
            acked = {a.task for a in history.acks if a.answer}
            left = [task_id for task_id in history.values if task_id not in acked]
            per_second = collections.Counter(int(a.at - start) for a in history.acks if a.answer)
            pytest.fail(
                f"the workers completed {completed} of {total} tasks by their deadline ({SOAK_S + 15:.0f} s); "
                f"{len(left)} not acked (added as {sorted(history.values[t] for t in left)[:40]}), some of their "
                f"leases: {lease_rows(cql, servers.keyspace, OWNERS[0], svc, left[:10])}; tasks acked per second "
                f"of the soak: {[per_second[i] for i in range(int(SOAK_S) + 16)]}"
            )
        # The results of this soak's tokened tasks only: as duty holder, its bridge also relays
        # results earlier tests left owed to the same exchange, and counting those let results of
        # its own go missing (or come twice) unnoticed.
        tokened = {task_id for task_id, i in history.values.items() if i % 2 == 0}

        def all_results() -> bool:
            while not incoming.empty():
                if (msg := incoming.get_nowait())["taskId"] in history.values:
                    results.append(msg)
            return {m["taskId"] for m in results} >= tokened

        await wait_for(all_results, 15, interval=0.2, what="every result")
    assert len(history.values) == total and len(tokened) == total // 2 + total % 2
    rows = lease_rows(cql, servers.keyspace, OWNERS[0], svc, list(history.values))
    history.check(rows, None)
    assert {m["taskId"] for m in results} == tokened, "a result for a task without a token"
    per_task = collections.Counter(m["taskId"] for m in results)
    assert max(per_task.values()) == 1, f"results sent twice: {[t for t, n in per_task.items() if n > 1][:3]}"
    wrong = [m for m in results if (m.get("result") or {}).get("task") != history.values[m["taskId"]]]
    assert not wrong, f"results carrying another task's value: {wrong[:3]}"
    warm = [(t, rss) for t, rss in samples if t >= WARM_UP_S]
    assert len(warm) >= 5, f"too few samples after warm-up to fit a slope: {samples}"
    window = warm[-1][0] - warm[0][0]
    fitted, allowed = slope(warm), allowed_slope(window)
    per_task_kib = fitted * 1024 / RATE
    print(
        f"soak {SOAK_S:.0f} s at {RATE}/s: RSS after warm-up {warm[0][1]:.1f} MiB, at the end {warm[-1][1]:.1f} MiB, "
        f"slope {per_task_kib:.2f} KiB/task (allowed {allowed * 1024 / RATE:.2f}); samples {samples}"
    )
    assert fitted <= allowed, (
        f"RSS grows {per_task_kib:.2f} KiB per task after warm-up (allowed {allowed * 1024 / RATE:.2f}): {samples}"
    )
