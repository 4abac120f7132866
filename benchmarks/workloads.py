"""The workloads: W-add, W-cycle, W-e2e, W-recover, W-scale and Memory (see docs/performance.md)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from benchmarks import logs
from benchmarks.baselines import key
from benchmarks.clients import AddPublisher, closed_loop, pipelined_adds, task_value
from benchmarks.context import CASSANDRA_REQUESTS, ENGINE_USER, OWNER, Bench, Scrape
from benchmarks.fill import DirectFiller
from benchmarks.progress import Progress, say
from benchmarks.stats import Figure, Sample, Target
from bridge.client import Engine, Worker

POLL_S = 0.05  # a worker's pause after an empty fetch (W-e2e, W-recover)


# -- helpers ----------------------------------------------------------------------------------
def p50(bench: Bench, name: str, c: int) -> float:
    s = bench.baselines.get(key(name, c))
    return s.p(50) if s else math.nan


def thr(bench: Bench, name: str, c: int) -> float:
    s = bench.baselines.get(key(name, c))
    return s.throughput if s else math.nan


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else math.nan


def deadline(bench: Bench, cap: str) -> float:
    return time.monotonic() + bench.plan.caps[cap]


async def open_publisher(bench: Bench) -> AddPublisher:
    return await AddPublisher(bench.amqp_url(ENGINE_USER), exchange=bench.exchange, owner=OWNER).open()


async def open_workers(bench: Bench, service: str, n: int, prefix: str) -> list[Worker]:
    workers = [
        Worker(bench.amqp_url(OWNER), service=service, worker_id=f"{prefix}-{i}", exchange=bench.exchange)
        for i in range(n)
    ]
    await asyncio.gather(*(w.open() for w in workers))
    return workers


async def close_all(clients: list[Worker] | list[Engine]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def prefill(bench: Bench, service: str, count: int, label: str, cap: str) -> int:
    """Fill a queue (not measured): rows written with the bridge's own WorkQueue.add, see benchmarks.fill."""
    if bench.filler is None:
        bench.filler = DirectFiller(bench)
    return int(await bench.filler.fill(service, count, label, bench.plan.caps[cap]))


@dataclass
class Cycles:
    fetch: Sample = field(default_factory=Sample)
    ack: Sample = field(default_factory=Sample)
    task: Sample = field(default_factory=Sample)  # fetch + ack of one task, as one worker saw it
    acked: int = 0
    ack_false: int = 0
    empty: int = 0
    errors: int = 0
    elapsed: float = 0.0

    @property
    def throughput(self) -> float:
        return self.acked / self.elapsed if self.elapsed > 0 else math.nan


async def _paced(slot: float, every: float) -> float:
    """Wait for this worker's next slot (a fixed offered load; ``every`` 0: no pacing)."""
    if not every:
        return slot
    slot += every
    if (ahead := slot - time.perf_counter()) > 0:
        await asyncio.sleep(ahead)
    return slot


async def drive_cycles(
    workers: list[Worker],
    expected: int,
    *,
    until: float,
    progress: Progress | None = None,
    idle_timeout: float = 3.0,
    poll: float = 0.01,
    rate: float | None = None,
) -> Cycles:
    """Every worker loops fetch -> ack until ``expected`` tasks are acked, the queue stays empty for
    ``idle_timeout`` seconds, or ``until`` (time.monotonic()) passes. With ``rate`` (tasks/s for
    all workers together) each worker starts a cycle only at its next slot: a fixed offered load."""
    st = Cycles()
    started = time.perf_counter()
    last = started
    every = len(workers) / rate if rate else 0.0

    async def loop(w: Worker, offset: float) -> None:
        nonlocal last
        slot = started + offset
        while st.acked < expected and time.monotonic() < until:
            slot = await _paced(slot, every)
            t0 = time.perf_counter()
            try:
                task = await w.fetch()
            except Exception:
                st.errors += 1
                if progress:
                    progress.error()
                continue
            t1 = time.perf_counter()
            if task is None:
                st.empty += 1
                if t1 - last > idle_timeout:
                    return
                await asyncio.sleep(poll)
                continue
            st.fetch.add(t1 - t0)
            try:
                ok = await w.ack(result={"ok": task.value.get("i") if isinstance(task.value, dict) else None})
            except Exception:
                st.errors += 1
                if progress:
                    progress.error()
                continue
            t2 = time.perf_counter()
            st.ack.add(t2 - t1)
            st.task.add(t2 - t0)
            if ok:
                st.acked += 1
                if progress:
                    progress.advance()
            else:
                st.ack_false += 1
            last = t2

    await asyncio.gather(*(loop(w, every * i / len(workers)) for i, w in enumerate(workers)))
    st.elapsed = last - started
    st.fetch.elapsed = st.ack.elapsed = st.task.elapsed = st.elapsed
    return st


def _latency_targets(bench: Bench, label: str, fetch: Sample, ack: Sample, c: int) -> None:
    floor = 1.5 * (p50(bench, "B-rpc", c) + p50(bench, "B-lwt", c))
    where = "single request" if c == 1 else f"c={c}"
    for op, s in (("fetch", fetch), ("ack", ack)):
        bench.target(
            Target(
                f"{op} p50 ({where})",
                f"<= 1.5 x (B-rpc p50 + B-lwt p50), both c={c}",
                s.p(50),
                floor,
                "ms",
                note=label,
            )
        )


# -- W-add ------------------------------------------------------------------------------------
async def w_add(bench: Bench) -> None:
    plan = bench.plan
    svc = bench.service("cycle")
    say(f"W-add: {plan.add_seq} sequential adds (Engine.add), then {plan.adds:,} pipelined (window {plan.add_window})")
    engine = Engine(bench.amqp_url(ENGINE_USER), owner=OWNER, exchange=bench.exchange)
    await engine.open()
    try:
        warm = await closed_loop(lambda _s, i: engine.add(svc, task_value(i)), concurrency=1, count=20)
        meter = bench.cpu_meter()
        async with Progress("W-add sequential", total=plan.add_seq, unit="adds") as p:
            seq = await closed_loop(
                lambda _s, i: engine.add(svc, task_value(100 + i)), concurrency=1, count=plan.add_seq, progress=p
            )
        bench.record_cpu("W-add sequential", meter, seq.throughput)
    finally:
        await engine.close()
    pub = await open_publisher(bench)
    try:
        meter = bench.cpu_meter()
        async with Progress("W-add pipelined", total=plan.adds, unit="adds") as p:
            pipe = await pipelined_adds(
                pub, svc, plan.adds, window=plan.add_window, progress=p, deadline=deadline(bench, "adds"), first=10_000
            )
        bench.record_cpu("W-add pipelined", meter, pipe.throughput)
    finally:
        await pub.close()
    bench.check_processes()
    stored = warm.count + seq.count + pipe.count
    bench.cycle_queue = (svc, stored)
    capped = f"time-capped: {pipe.count:,} of {plan.adds:,}" if pipe.count < plan.adds else ""

    floor = p50(bench, "B-rpc", 1) + p50(bench, "B-write", 1)
    bench.figure(
        Figure.of(
            "W-add add (single request)",
            "W-add",
            seq,
            baseline="B-rpc + B-write p50 (c=1)",
            ratio=_div(seq.p(50), floor),
            ratio_of="p50",
        )
    )
    bw = thr(bench, "B-write", plan.add_window)
    bench.figure(
        Figure.of(
            f"W-add pipelined (window {plan.add_window})",
            "W-add",
            pipe,
            baseline=f"B-write throughput (c={plan.add_window})",
            ratio=_div(pipe.throughput, bw),
            ratio_of="throughput",
            note=capped or f"errors {pipe.errors}" if pipe.errors else capped,
            unit="tasks/s",
        )
    )
    bench.target(Target("add p50 (single request)", "<= B-rpc p50 + B-write p50 (c=1)", seq.p(50), floor, "ms"))
    bench.target(
        Target(
            "W-add throughput",
            f">= 50% of B-write throughput (c={plan.add_window})",
            pipe.throughput,
            0.5 * bw,
            "tasks/s",
            higher_is_better=True,
            note=capped,
        )
    )


# -- W-cycle ----------------------------------------------------------------------------------
async def w_cycle(bench: Bench) -> None:
    plan = bench.plan
    if bench.cycle_queue is None:
        svc = bench.service("cycle")
        stored = await prefill(bench, svc, plan.adds, "W-cycle", "adds")
    else:
        svc, stored = bench.cycle_queue
        bench.cycle_queue = None
    say(f"W-cycle: {stored:,} tasks queued; {plan.cycle_seq} cycles by 1 worker, then {plan.workers} workers drain")
    solo = await open_workers(bench, svc, 1, "solo")
    try:
        await drive_cycles(solo, 20, until=time.monotonic() + 30)  # warm-up
        meter = bench.cpu_meter()
        async with Progress("W-cycle 1 worker", total=plan.cycle_seq, unit="tasks") as p:
            one = await drive_cycles(solo, plan.cycle_seq, until=deadline(bench, "cycle"), progress=p)
        bench.record_cpu("W-cycle 1 worker", meter, one.throughput)
    finally:
        await close_all(solo)
    remaining = stored - 20 - one.acked
    workers = await open_workers(bench, svc, plan.workers, "w")
    try:
        meter = bench.cpu_meter()
        async with Progress(f"W-cycle {plan.workers} workers", total=remaining, unit="tasks") as p:
            many = await drive_cycles(workers, remaining, until=deadline(bench, "cycle"), progress=p)
        bench.record_cpu(f"W-cycle {plan.workers} workers", meter, many.throughput)
    finally:
        await close_all(workers)
    bench.check_processes()
    capped = f"time-capped: {many.acked:,} of {remaining:,}" if many.acked < remaining else ""

    c = plan.workers
    floor1 = p50(bench, "B-rpc", 1) + p50(bench, "B-lwt", 1)
    floorc = p50(bench, "B-rpc", c) + p50(bench, "B-lwt", c)
    for op, s1, sc in (("fetch", one.fetch, many.fetch), ("ack", one.ack, many.ack)):
        bench.figure(
            Figure.of(
                f"W-cycle {op} (single request)",
                "W-cycle",
                s1,
                throughput=False,
                baseline="B-rpc + B-lwt p50 (c=1)",
                ratio=_div(s1.p(50), floor1),
                ratio_of="p50",
            )
        )
        bench.figure(
            Figure.of(
                f"W-cycle {op} ({c} workers)",
                "W-cycle",
                sc,
                throughput=False,
                baseline=f"B-rpc + B-lwt p50 (c={c})",
                ratio=_div(sc.p(50), floorc),
                ratio_of="p50",
            )
        )
    bl = thr(bench, "B-lwt", c)
    bench.figure(
        Figure(
            f"W-cycle fetch+ack ({c} workers)",
            "W-cycle",
            count=many.acked,
            p50_ms=many.task.p(50),
            p99_ms=many.task.p(99),
            throughput=many.throughput,
            unit="tasks/s",
            baseline=f"B-lwt throughput (c={c})",
            ratio=_div(many.throughput, bl),
            ratio_of="throughput",
            note=capped or (f"errors {many.errors}" if many.errors else ""),
            extra={"empty_fetches": many.empty, "ack_false": many.ack_false, "errors": many.errors},
        )
    )
    _latency_targets(bench, "W-cycle, 1 worker", one.fetch, one.ack, 1)
    _latency_targets(bench, f"W-cycle, {c} workers", many.fetch, many.ack, c)
    bench.target(
        Target(
            "W-cycle throughput",
            f">= 33% of B-lwt throughput (c={c})",
            many.throughput,
            0.33 * bl,
            "tasks/s",
            higher_is_better=True,
            note=capped,
        )
    )


# -- W-e2e ------------------------------------------------------------------------------------
async def w_e2e(bench: Bench) -> None:
    plan = bench.plan
    for rate in plan.e2e_rates:
        await _e2e_at(bench, rate, plan.e2e_seconds)


@dataclass
class _E2eState:
    """What one W-e2e step's adders and consumers share."""

    published: dict[int, float] = field(default_factory=dict)
    latency: Sample = field(default_factory=Sample)
    acked: set[int] = field(default_factory=set)
    dup: int = 0
    add_errors: int = 0
    adding: bool = True
    stop_at: float = math.inf

    async def consume(self, w: Worker, progress: Progress) -> None:
        while time.monotonic() < self.stop_at:
            if not self.adding and len(self.acked) >= len(self.published) - self.add_errors:
                return
            try:
                task = await w.fetch()
            except Exception:
                continue
            t = time.perf_counter()
            if task is None:
                await asyncio.sleep(POLL_S)
                continue
            i = task.value["i"] if isinstance(task.value, dict) else -1
            if i in self.acked:
                self.dup += 1
            elif i in self.published:
                self.latency.add(t - self.published[i])
            try:
                if await task.ack({"i": i}):
                    self.acked.add(i)
                    progress.advance()
            except Exception:
                continue

    async def add_one(self, pub: AddPublisher, svc: str, i: int) -> None:
        self.published[i] = time.perf_counter()
        try:
            await pub.add(svc, task_value(i))
        except Exception:
            self.add_errors += 1


@dataclass
class _E2eTimes:
    t0: float
    add_secs: float
    consumed_secs: float
    backlog: int


async def _e2e_drive(
    state: _E2eState,
    pub: AddPublisher,
    svc: str,
    workers: list[Worker],
    progress: Progress,
    rate: int,
    total: int,
    drain_s: float,
) -> _E2eTimes:
    """Add ``total`` tasks at ``rate``/s while the workers consume, then let them drain (``drain_s`` cap)."""
    async with progress:
        consumers = [asyncio.create_task(state.consume(w, progress)) for w in workers]
        adds: list[asyncio.Task[None]] = []
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            adds.append(asyncio.create_task(state.add_one(pub, svc, i)))
        add_secs = time.perf_counter() - t0
        await asyncio.gather(*adds)
        backlog = total - state.add_errors - len(state.acked)
        state.adding = False
        state.stop_at = time.monotonic() + drain_s
        await asyncio.gather(*consumers)
        consumed_secs = time.perf_counter() - t0
    return _E2eTimes(t0=t0, add_secs=add_secs, consumed_secs=consumed_secs, backlog=backlog)


async def _e2e_take_late(bench: Bench, svc: str, rate: int, total: int) -> int:
    """Whatever the workers did not get within the drain cap must still be in the queue: take it out."""
    late = 0
    probe = await open_workers(bench, svc, 4, f"e2e{rate}-probe")
    try:
        late = (await drive_cycles(probe, total, until=time.monotonic() + 30, idle_timeout=2.0)).acked
    finally:
        await close_all(probe)
    return late


def _e2e_record(
    bench: Bench, rate: int, total: int, drain_s: float, state: _E2eState, times: _E2eTimes, late: int
) -> None:
    acked, dup, add_errors, latency, backlog = state.acked, state.dup, state.add_errors, state.latency, times.backlog
    stored = total - add_errors
    lost = stored - len(acked) - late
    achieved = total / times.add_secs if times.add_secs > 0 else math.nan
    latency.elapsed = times.consumed_secs
    floor = 2 * p50(bench, "B-rpc", 1) + p50(bench, "B-write", 1) + p50(bench, "B-lwt", 1)
    note = f"adds at {achieved:.0f}/s; backlog when adds stopped {backlog}; "
    if late:
        note += f"{late} not consumed within the {drain_s:.0f}s drain (taken out afterwards); "
    note += f"left behind {lost}; duplicates {dup}; add errors {add_errors}"
    bench.figure(
        Figure.of(
            f"W-e2e add->fetch @{rate}/s",
            "W-e2e",
            latency,
            unit="tasks/s",
            baseline="2 x B-rpc + B-write + B-lwt p50 (c=1)",
            ratio=_div(latency.p(50), floor),
            ratio_of="p50",
            note=note,
            extra={
                "rate": rate,
                "achieved_rate": achieved,
                "backlog_when_adds_stopped": backlog,
                "late": late,
                "left_behind": lost,
                "duplicates": dup,
            },
        )
    )
    bench.target(
        Target(
            f"W-e2e @{rate}/s: nothing left behind",
            "tasks added but never delivered == 0",
            float(lost),
            0.0,
            "tasks",
        )
    )


async def _e2e_at(bench: Bench, rate: int, seconds: float) -> None:
    plan = bench.plan
    svc = bench.service(f"e2e{rate}")
    total = int(rate * seconds)
    drain_s = plan.caps["e2e_drain"]
    say(
        f"W-e2e: the engine adds {rate}/s for {seconds:.0f}s ({total:,} tasks) while {plan.workers} workers consume "
        f"(a worker pauses {POLL_S * 1000:.0f} ms after an empty fetch)"
    )
    state = _E2eState()
    pub = await open_publisher(bench)
    workers = await open_workers(bench, svc, plan.workers, f"e2e{rate}")
    progress = Progress(f"W-e2e {rate}/s consumed", total=total, unit="tasks")
    meter = bench.cpu_meter()
    times = await _e2e_drive(state, pub, svc, workers, progress, rate, total, drain_s)
    bench.record_cpu(f"W-e2e {rate}/s", meter, len(state.acked) / (time.perf_counter() - times.t0))
    await close_all(workers)
    await pub.close()
    late = await _e2e_take_late(bench, svc, rate, total)
    bench.check_processes()
    _e2e_record(bench, rate, total, drain_s, state, times, late)


# -- W-recover --------------------------------------------------------------------------------
async def w_recover(bench: Bench) -> None:
    plan = bench.plan
    n, ttr = plan.recover_tasks, plan.recover_ttr_ms
    svc = bench.service("recover")
    stored = await prefill(bench, svc, n, "W-recover", "recover")
    say(
        f"W-recover: {plan.workers} loops fetch {stored:,} tasks with timeToRecover {ttr} ms and abandon them; "
        "the same loops take every redelivery and ack it"
    )
    # Every fetch uses a new worker id: a first delivery is abandoned (that worker never comes back),
    # a redelivery (deliveries >= 2) is measured against the abandoned lease's expiry and acked.
    expiry: dict[str, float] = {}
    redelivered_at: dict[str, float] = {}
    early = 0
    clients = await open_workers(bench, svc, plan.workers, "rec")
    until = deadline(bench, "recover")
    progress = Progress("W-recover abandoned+redelivered", total=2 * stored, unit="deliveries")

    async def loop(w: Worker) -> None:
        while len(redelivered_at) < stored and time.monotonic() < until:
            w.worker_id = f"rec-{uuid.uuid4().hex[:12]}"
            try:
                task = await w.fetch(time_to_recover_ms=ttr)
            except Exception:
                continue
            now = time.time()
            if task is None:
                await asyncio.sleep(POLL_S)
                continue
            if task.deliveries <= 1:
                expiry[task.id] = datetime.fromisoformat(task.lease_expires_at.replace("Z", "+00:00")).timestamp()
                progress.advance()
                continue
            redelivered_at.setdefault(task.id, now)
            try:
                await task.ack({"recovered": True})
            except Exception:
                continue
            progress.advance()

    meter = bench.cpu_meter()
    t0 = time.perf_counter()
    async with progress:
        await asyncio.gather(*(loop(w) for w in clients))
    elapsed = time.perf_counter() - t0
    bench.record_cpu("W-recover", meter, 2 * len(redelivered_at) / elapsed if elapsed > 0 else math.nan)
    await close_all(clients)
    bench.check_processes()
    delay, sched, dispatch = Sample(), Sample(), Sample()
    reexposed = logs.reexposed_at(bench.bridge_logs)
    for tid, at in redelivered_at.items():
        if tid not in expiry:
            continue
        d = at - expiry[tid]
        early += d < 0
        delay.add(max(d, 0.0))
        if tid in reexposed:
            sched.add(max(reexposed[tid] - expiry[tid], 0.0))
            dispatch.add(max(at - reexposed[tid], 0.0))
    for s in (delay, sched, dispatch):
        s.elapsed = elapsed
    missing = stored - len(redelivered_at)
    bench.figure(
        Figure.of(
            f"W-recover expiry->redelivery (ttr {ttr} ms)",
            "W-recover",
            delay,
            throughput=False,
            note=f"{len(redelivered_at):,} of {stored:,} redelivered"
            + (f"; {missing} not within the cap" if missing else "")
            + (f"; {early} before expiry (clock)" if early else "")
            + ("" if sched.count else "; no 're-exposed' lines in the bridge logs: no scheduler/dispatch split"),
            extra={"stored": stored, "redelivered": len(redelivered_at), "early": early},
        )
    )
    if sched.count:
        # Split by the bridge log line "lease of task ... expired: re-exposed" (scheduler side).
        bench.figure(Figure.of("  of which expiry->re-exposed (scheduler)", "W-recover", sched, throughput=False))
        bench.figure(Figure.of("  of which re-exposed->fetched (dispatch)", "W-recover", dispatch, throughput=False))
    bench.target(Target("W-recover redelivery p99", "<= 1000 ms after lease expiry", delay.p(99), 1000.0, "ms"))
    bench.target(
        Target("W-recover: every task redelivered", "tasks not redelivered == 0", float(missing), 0.0, "tasks")
    )


# -- W-scale ----------------------------------------------------------------------------------
CLAIM_LWTS = ("lease.claim_new", "lease.claim_expired")  # a fetch's claim: the only statements that claim


def claim_counts(before: Scrape, after: Scrape) -> dict[str, float]:
    """Claim LWTs between two scrapes (issue 9, figure 1: failed claim LWTs per task).

    Failed = claim LWTs sent (``lease.claim_new`` and ``lease.claim_expired`` requests: each one a
    Paxos round, a claim's second try included) - claims won (``queue_bridge_claims_total{outcome=
    "won"}``: the claim applied and the task was handed out). That counts every refusal, whether
    the lease was another claim's (``claim_conflicts``) or already finished (``claims_stale``: a
    stale hint or index entry), and every claim whose outcome stayed unknown (counted nowhere
    else). Off by the rare claim that applied but handed nothing out (its task's key missing, its
    row expired: counted failed) or that was refused but handed out the worker's own lease (a
    second fetch of the same worker: counted won)."""

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    sent = sum(delta(CASSANDRA_REQUESTS, statement=s) for s in CLAIM_LWTS)
    won = delta("queue_bridge_claims", outcome="won")
    return {
        "claim_lwts": sent,
        "claims_won": won,
        "failed_claim_lwts": sent - won,
        "claim_conflicts": delta("queue_bridge_claim_conflicts"),
        "claims_stale": delta("queue_bridge_claims_stale"),
    }


async def w_scale(bench: Bench) -> None:
    plan = bench.plan
    curve: list[dict[str, object]] = []
    bl = thr(bench, "B-lwt", plan.workers)
    for n in plan.scale_bridges:
        await bench.ensure_bridges(n)
        svc = bench.service(f"scale{n}")
        stored = await prefill(bench, svc, plan.scale_tasks, f"W-scale {n} bridge(s)", "scale")
        workers = await open_workers(bench, svc, plan.workers, f"s{n}")
        try:
            warm = await drive_cycles(workers, min(50, stored // 10), until=time.monotonic() + 20)
            # The warm-up took its tasks (often more than asked: 16 workers overshoot) from this
            # queue: asked for all ``stored``, the measured drain could never reach them, and its
            # workers polled the empty queue for the idle timeout inside the CPU window, charging
            # seconds of empty fetches to the tasks (CPU and statements per task).
            left = stored - warm.acked
            before = await bench.scrape()
            meter = bench.cpu_meter()
            async with Progress(f"W-scale {n} bridge(s)", total=left, unit="tasks") as p:
                res = await drive_cycles(workers, left, until=deadline(bench, "scale"), progress=p)
            cpu = bench.record_cpu(f"W-scale {n} bridge(s)", meter, res.throughput)
            after = await bench.scrape()
        finally:
            await close_all(workers)
        bench.check_processes()
        point = {
            "bridges": n,
            "tasks": res.acked,
            "throughput": res.throughput,
            "fetch_p50_ms": res.fetch.p(50),
            "ack_p50_ms": res.ack.p(50),
            "cpu_percent": cpu,
        }
        claims = None
        if after:  # --metrics: the bridges' own counters
            claims = claim_counts(before, after)
            point.update(claims)
            requests = after.total(CASSANDRA_REQUESTS) - before.total(CASSANDRA_REQUESTS)
            point["cassandra_requests_per_task"] = requests / max(res.acked, 1)
            point["bridge_cpu_ms_per_task"] = 10.0 * cpu.get("bridges", 0.0) / max(res.throughput, 1e-9)
        curve.append(point)
        bench.figure(
            Figure(
                f"W-scale {n} bridge(s), {plan.workers} workers",
                "W-scale",
                count=res.acked,
                p50_ms=res.task.p(50),
                p99_ms=res.task.p(99),
                throughput=res.throughput,
                unit="tasks/s",
                baseline=f"B-lwt throughput (c={plan.workers})",
                ratio=_div(res.throughput, bl),
                ratio_of="throughput",
                note=f"cpu% bridges {cpu.get('bridges', 0):.0f} cassandra {cpu.get('cassandra', 0):.0f} "
                f"rabbitmq {cpu.get('rabbitmq', 0):.0f} generator {cpu.get('generator', 0):.0f}"
                + (
                    f"; failed claim LWTs {claims['failed_claim_lwts']:.0f} "
                    f"({claims['failed_claim_lwts'] / max(res.acked, 1):.2f} per task; of which conflicts "
                    f"{claims['claim_conflicts']:.0f}, stale {claims['claims_stale']:.0f})"
                    if claims is not None
                    else ""
                ),
            )
        )
    base = curve[0]["throughput"] if curve else math.nan
    for point in curve:
        point["speedup"] = _div(point["throughput"], base)  # type: ignore[arg-type]
    bench.sections["scale"] = curve
    if plan.scale_rate_fraction and curve:
        bench.sections["scale_fixed_rate"] = await _w_scale_fixed_rate(bench, plan.scale_rate_fraction * base)
    await bench.ensure_bridges(bench.bridges_wanted)


async def _w_scale_fixed_rate(bench: Bench, rate: float) -> list[dict[str, object]]:
    """The same bridge counts at one fixed offered load below saturation (a fraction of what one
    bridge reached above): fetch latency and conflicts when the fleet is not the bottleneck."""
    plan = bench.plan
    seconds = 10.0
    points: list[dict[str, object]] = []
    for n in plan.scale_bridges:
        await bench.ensure_bridges(n)
        svc = bench.service(f"rate{n}")
        want = int(rate * seconds) + plan.workers * 10
        await prefill(bench, svc, want, f"W-scale fixed rate, {n} bridge(s)", "scale")
        workers = await open_workers(bench, svc, plan.workers, f"r{n}")
        try:
            await drive_cycles(workers, plan.workers * 5, until=time.monotonic() + 10)  # warm-up
            before = await bench.scrape()
            meter = bench.cpu_meter()
            res = await drive_cycles(workers, want, until=time.monotonic() + seconds, rate=rate)
            cpu = bench.record_cpu(f"W-scale fixed rate, {n} bridge(s)", meter, res.throughput)
            after = await bench.scrape()
        finally:
            await close_all(workers)
        point: dict[str, object] = {
            "bridges": n,
            "offered_per_s": round(rate, 1),
            "throughput": round(res.throughput, 1),
            "fetch_p50_ms": round(res.fetch.p(50), 2),
            "ack_p50_ms": round(res.ack.p(50), 2),
            # The fleet's bridge CPU per task at this load: a sidecar fleet runs far below saturation,
            # each bridge with a share of the load.
            "bridge_cpu_ms_per_task": round(10.0 * cpu.get("bridges", 0.0) / max(res.throughput, 1e-9), 2),
        }
        if after:
            claims = claim_counts(before, after)
            for k in ("failed_claim_lwts", "claim_conflicts", "claims_stale"):
                point[f"{k}_per_task"] = round(claims[k] / max(res.acked, 1), 3)
        points.append(point)
        say(f"W-scale fixed rate {rate:.0f}/s, {n} bridge(s): {point}")
    base = points[0]["fetch_p50_ms"] if points else math.nan
    for point in points:
        point["fetch_p50_vs_one_bridge"] = _div(point["fetch_p50_ms"], base)  # type: ignore[arg-type]
    await bench.ensure_bridges(bench.bridges_wanted)
    return points


# -- Memory -----------------------------------------------------------------------------------
def _rss(bench: Bench) -> float:
    values = [b.rss_mib() or math.nan for b in bench.bridges]
    return max(values) if values else math.nan


async def memory(bench: Bench) -> None:
    plan = bench.plan
    await bench.ensure_bridges(bench.bridges_wanted)
    mem: dict[str, object] = {"bridges": [b.name for b in bench.bridges]}
    mem["rss_at_start_mib"] = max((b.started_rss_mib or math.nan) for b in bench.bridges)
    mem["rss_before_mib"] = _rss(bench)
    svc = bench.service("memory")
    say(f"Memory: {plan.memory_tasks:,} tasks queued, then the bridge's VmRSS while it serves that queue")
    stored = await prefill(bench, svc, plan.memory_tasks, "Memory", "memory")
    # Let the bridge touch the deep queue: a few cycles from its head.
    workers = await open_workers(bench, svc, 4, "mem")
    try:
        touched = await drive_cycles(workers, 200, until=time.monotonic() + 20)
    finally:
        await close_all(workers)
    queued = stored - touched.acked
    mem["queued_tasks"] = queued
    mem["rss_holding_mib"] = _rss(bench)
    say(f"Memory: RSS {mem['rss_holding_mib']:.1f} MiB holding {queued:,} queued tasks")
    # The same small run twice (adds through the bridge, then fetch+ack by 16 workers): the second
    # must not leave the bridge bigger than the first did.
    reps: list[float] = []
    pub = await open_publisher(bench)
    try:
        for rep in (1, 2):
            rsvc = bench.service(f"rep{rep}")
            async with Progress(f"Memory repeat {rep} adds", total=plan.memory_repeat_tasks, unit="adds") as p:
                added = await pipelined_adds(pub, rsvc, plan.memory_repeat_tasks, window=plan.add_window, progress=p)
            workers = await open_workers(bench, rsvc, plan.workers, f"rep{rep}")
            try:
                async with Progress(f"Memory repeat {rep} cycles", total=added.count, unit="tasks") as p:
                    await drive_cycles(workers, added.count, until=deadline(bench, "memory"), progress=p)
            finally:
                await close_all(workers)
            await asyncio.sleep(1.0)
            reps.append(_rss(bench))
            say(f"Memory: RSS {reps[-1]:.1f} MiB after repeat {rep}")
    finally:
        await pub.close()
    bench.check_processes()
    mem["rss_after_repeat_mib"] = reps
    mem["growth_mib"] = reps[1] - reps[0]
    mem["hwm_mib"] = max((b.hwm_mib() or math.nan) for b in bench.bridges)
    bench.sections["memory"] = mem
    bench.target(
        Target(
            f"bridge RSS holding {queued:,} queued tasks",
            "<= 150 MiB",
            float(mem["rss_holding_mib"]),  # type: ignore[arg-type]
            150.0,
            "MiB",
        )
    )
    bench.target(
        Target(
            "bridge RSS growth across a repeated run",
            "<= 2 MiB (RSS after repeat 2 - after repeat 1)",
            float(mem["growth_mib"]),  # type: ignore[arg-type]
            2.0,
            "MiB",
        )
    )


def final_memory(bench: Bench) -> None:
    """RSS after the whole run (called last, before the bridges stop)."""
    if not bench.bridges:
        return
    rss = _rss(bench)
    bench.sections.setdefault("memory", {})["rss_after_run_mib"] = rss
    bench.sections["memory"]["hwm_after_run_mib"] = max((b.hwm_mib() or math.nan) for b in bench.bridges)
    bench.target(Target("bridge RSS after the run", "<= 150 MiB", rss, 150.0, "MiB"))
