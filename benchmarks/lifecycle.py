"""W-lifecycle: the worker lifecycle of contract 1.4 (extend, delivery limits and parking, delayed tasks).

    python -m benchmarks.lifecycle [--phases extend,poison,delayed] [--out benchmarks/results/lifecycle.json]

Every figure is a ratio to, or an absolute measured in, the same run; bridges are separate OS
processes on one keyspace with per-run names (``benchmarks.context.Bench``, as ``benchmarks.fleet``).

1. extend (1 bridge): a worker holding a task extends it at concurrency 1, naming it (taskId + epoch:
   no read before the LWT). Its p50 against B-rpc p50 + B-lwt p50 measured just before, in
   alternating rounds (baselines, extends; 3 by default): the median of the rounds' ratios
   (goal <= 1.2 x), each round's figures beside it; ack p50 of the same worker for context.
2. poison: a queue of N healthy tasks plus one poison task (maxDeliveries M, added first), drained
   by W workers that ack healthy tasks at once. Whoever fetches the poison task "crashes": it
   abandons the task (every fetch asks for a short timeToRecover) and comes back as a new worker
   id (a worker's fetch would re-send the task it holds). The poison task must be parked after
   exactly M deliveries (checked with the ``parked`` RPC) and never handed out again; healthy
   throughput with the poison task / without it (same run, same queue size; goal >= 0.9).
3. delayed (1 and 2 bridges): T tasks with notBefore spread evenly over a window (added in due
   order, ahead of the window), fetched by workers long-polling and acked at once. For each:
   (reply received - notBefore) on this host's clock, p50/p99/max (goal p99 <= 1 s), and early
   deliveries (goal 0), also by the bridge's claim time (leaseExpiresAt - timeToRecover, the
   bridges run on this host).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import logging
import math
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import logs
from benchmarks.baselines import b_cassandra, b_rpc, key
from benchmarks.clients import closed_loop, task_value
from benchmarks.context import ENGINE_USER, OWNER, Bench, Plan, StackDown
from benchmarks.procs import ROOT, ProcessFailed
from benchmarks.progress import Progress, say
from benchmarks.report import git_commit, machine, now_iso, write_json
from benchmarks.run import run_locked
from benchmarks.stats import Sample, finite, percentile
from benchmarks.workloads import close_all, open_workers
from bridge.client import Engine, Task, Worker
from bridge.client.errors import TransportError, UnavailableError
from bridge.config import Settings
from bridge.domain.records import QueueKey
from bridge.domain.timeline import ms_of
from bridge.transport.hints import hint_queue_name

T = TypeVar("T")

PHASES = ("extend", "poison", "delayed")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
RETRYABLE = (TransportError, UnavailableError)  # no answer, or the bridge asks to try again
ADD_CONCURRENCY = 16
EXTEND_GOAL = 1.2  # extend p50 <= 1.2 x (B-rpc p50 + B-lwt p50)
POISON_GOAL = 0.9  # healthy throughput with the poison task >= 0.9 x without
DELAYED_GOAL_MS = 1000.0  # p99 of (handed out - notBefore)
EXTEND_TTR_MS = 60_000
DELAYED_TTR_MS = 60_000
WARMUP_TASKS = 5
ASSUMED_ADD_RATE = 400.0  # adds/s the automatic lead of the delayed phase plans for
# a lease is taken back this long after it ends (the default BRIDGE_CLOCK_SKEW_MARGIN)
SKEW_MARGIN_S = float(Settings.model_fields["clock_skew_margin"].default)


# -- pure helpers (tests/unit/test_benchmark_lifecycle.py) --------------------------------------
def iso_ms(ms: int) -> str:
    """ISO 8601 in UTC at millisecond precision, by integer arithmetic (through a float the
    instant could come out a millisecond early, and the task would be due before we think)."""
    return (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ms_of_iso(text: str) -> int:
    """Epoch milliseconds of an ISO 8601 instant of the bridge's (UTC when it has no offset)."""
    at = datetime.fromisoformat(text)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - EPOCH) // timedelta(milliseconds=1)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def due_times(start_ms: int, window_ms: int, n: int) -> list[int]:
    """``n`` due times spread evenly over ``[start_ms, start_ms + window_ms)``, in order."""
    return [start_ms + window_ms * i // n for i in range(n)]


def auto_lead_s(tasks: int) -> float:
    """How far ahead of the first due time the delayed adds start: time for all of them at
    :data:`ASSUMED_ADD_RATE` (they go in due order, so a slower add rate only eats into it)."""
    return 5.0 + tasks / ASSUMED_ADD_RATE


def by_second(pairs: list[tuple[int, int]], start_ms: int) -> list[float | None]:
    """p50 of ``late`` per second of due time from ``start_ms``, for ``(due, late)`` pairs: whether
    lateness grows over the window (a backlog) or stays flat."""
    slots: dict[int, list[float]] = {}
    for due, late in pairs:
        slots.setdefault(max(due - start_ms, 0) // 1000, []).append(float(late))
    top = max(slots, default=-1)
    return [finite(round(percentile(sorted(slots.get(i, [])), 50), 1)) for i in range(top + 1)]


def ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def summary_ms(values: list[int] | list[float]) -> dict[str, float | int | None]:
    """Count, p50, p99, max (and min) of millisecond values; None for what an empty list lacks."""
    s = sorted(float(v) for v in values)
    return {
        "count": len(s),
        "p50_ms": finite(round(percentile(s, 50), 1)),
        "p99_ms": finite(round(percentile(s, 99), 1)),
        "max_ms": s[-1] if s else None,
        "min_ms": s[0] if s else None,
    }


@dataclass
class Row:
    """One line of the printed table: a figure, with its goal and verdict when it has one."""

    phase: str
    name: str
    value: str
    goal: str = ""
    passed: bool | None = None

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: ""}[self.passed]


def render(rows: list[Row]) -> str:
    head = Row("phase", "figure", "measured", "goal")
    w = [max(len(getattr(r, a)) for r in [head, *rows]) for a in ("phase", "name", "value", "goal")]
    lines = []
    for r in [head, *rows]:
        verdict = "verdict" if r is head else r.verdict
        lines.append(f"{r.phase:<{w[0]}}  {r.name:<{w[1]}}  {r.value:>{w[2]}}  {r.goal:<{w[3]}}  {verdict}".rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def fmt(value: float | int | None, unit: str = "", digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return text + unit


# -- shared pieces ------------------------------------------------------------------------------
async def retrying(call: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    """A request that got no answer (or ``unavailable``) is sent again: every RPC is safe to repeat."""
    for attempt in range(attempts):
        try:
            return await call()
        except RETRYABLE:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


async def add_one(engine: Engine, svc: str, value: Any, **kw: Any) -> str:
    """``Engine.add`` retried with one message id (a retry can never add a second task)."""
    mid = uuid.uuid4().hex
    task_id = await retrying(partial(engine.add, svc, value, message_id=mid, **kw))
    assert task_id is not None
    return task_id


async def fill(engine: Engine, svc: str, n: int, label: str) -> None:
    """``n`` healthy tasks in ``svc`` (not measured), ``ADD_CONCURRENCY`` adds in flight."""
    async with Progress(label, total=n, unit="adds") as p:
        sample = await closed_loop(
            lambda _s, i: add_one(engine, svc, task_value(i)), concurrency=ADD_CONCURRENCY, count=n, progress=p
        )
    if sample.errors:
        raise RuntimeError(f"{label}: {sample.errors} adds failed")


def engine_of(bench: Bench) -> Engine:
    return Engine(bench.amqp_url(ENGINE_USER), owner=OWNER, exchange=bench.exchange)


class Services:
    """The queues this run used (their hint queues are removed at the end)."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.names: list[str] = []

    def new(self, what: str) -> str:
        name = self.bench.service(what)
        self.names.append(name)
        return name


# -- 1. extend ----------------------------------------------------------------------------------
@dataclass
class ExtendRound:
    b_rpc_p50_ms: float
    b_lwt_p50_ms: float
    extend: Sample
    fetch: Sample
    ack: Sample
    refused: int

    @property
    def ratio(self) -> float:
        return ratio(self.extend.p(50), self.b_rpc_p50_ms + self.b_lwt_p50_ms)


async def extend_round(bench: Bench, args: argparse.Namespace, svcs: Services, label: str) -> ExtendRound:
    """One round: the baselines at concurrency 1, then the extends, back to back, so that the
    ratio compares figures of the same minute (the baselines alone moved 1.8 -> 3.6 ms between
    runs on this machine)."""
    say(f"extend {label}: baselines B-rpc and B-lwt at concurrency 1")
    await b_rpc(bench, [1])
    await b_cassandra(bench, "B-lwt", [1])
    brpc = bench.baselines[key("B-rpc", 1)].p(50)
    blwt = bench.baselines[key("B-lwt", 1)].p(50)
    per = args.extends_per_task
    tasks = math.ceil(args.extend_samples / per) + WARMUP_TASKS
    svc = svcs.new("extend")
    async with engine_of(bench) as engine:
        await fill(engine, svc, tasks, f"extend {label}: adds")
    [worker] = await open_workers(bench, svc, 1, "ext")
    worker.time_to_recover_ms = EXTEND_TTR_MS
    fetch, extend, ack = Sample(), Sample(), Sample()
    refused = 0
    try:
        async with Progress(f"extend {label} c=1", total=(tasks - WARMUP_TASKS) * per, unit="extends") as p:
            for i in range(tasks):
                warm = i < WARMUP_TASKS
                t0 = time.perf_counter()
                task = await worker.fetch()
                t1 = time.perf_counter()
                if task is None:
                    raise RuntimeError("extend: the queue ran dry")
                for _ in range(per):
                    s = time.perf_counter()
                    ok = await task.extend(EXTEND_TTR_MS)  # names taskId and epoch
                    e = time.perf_counter()
                    refused += not ok
                    if not warm:
                        extend.add(e - s)
                        p.advance()
                s = time.perf_counter()
                acked = await task.ack("ok")
                e = time.perf_counter()
                if not acked:
                    raise RuntimeError(f"extend: the ack of task {task.id} was refused")
                if not warm:
                    fetch.add(t1 - t0)
                    ack.add(e - s)
    finally:
        await close_all([worker])
    return ExtendRound(brpc, blwt, extend, fetch, ack, refused)


async def phase_extend(bench: Bench, args: argparse.Namespace, svcs: Services, rows: list[Row]) -> dict[str, Any]:
    await bench.ensure_bridges(1)
    rounds = [
        await extend_round(bench, args, svcs, f"round {i + 1}/{args.extend_rounds}") for i in range(args.extend_rounds)
    ]
    ratios = [rnd.ratio for rnd in rounds]
    r = statistics.median(ratios)
    refused = sum(rnd.refused for rnd in rounds)
    out = {
        "rounds": [
            {
                "b_rpc_p50_ms": round(rnd.b_rpc_p50_ms, 3),
                "b_lwt_p50_ms": round(rnd.b_lwt_p50_ms, 3),
                "extend_p50_ms": round(rnd.extend.p(50), 3),
                "extend_p99_ms": round(rnd.extend.p(99), 3),
                "fetch_p50_ms": round(rnd.fetch.p(50), 3),
                "ack_p50_ms": round(rnd.ack.p(50), 3),
                "extends": rnd.extend.count,
                "ratio": finite(round(rnd.ratio, 3)),
                "ack_ratio": finite(round(ratio(rnd.ack.p(50), rnd.b_rpc_p50_ms + rnd.b_lwt_p50_ms), 3)),
            }
            for rnd in rounds
        ],
        "extends_refused": refused,
        "ratio_median": finite(round(r, 3)),
        "ratio_min": finite(round(min(ratios), 3)),
        "ratio_max": finite(round(max(ratios), 3)),
    }
    rows += [
        Row(
            "extend",
            f"extend p50 / (B-rpc p50 + B-lwt p50), median of {len(rounds)} rounds",
            fmt(r, "x"),
            f"<= {EXTEND_GOAL}x",
            r <= EXTEND_GOAL if math.isfinite(r) else None,
        ),
        Row("extend", "the rounds' ratios", ", ".join(fmt(x, "x") for x in ratios)),
        *(
            Row(
                "extend",
                f"round {i + 1}: extend p50 vs B-rpc + B-lwt",
                f"{rnd.extend.p(50):.2f} vs {rnd.b_rpc_p50_ms:.2f} + {rnd.b_lwt_p50_ms:.2f} ms",
            )
            for i, rnd in enumerate(rounds)
        ),
        Row("extend", "extends refused (false)", str(refused), "0", refused == 0),
        Row("extend", "ack p50 (context, round 1)", fmt(rounds[0].ack.p(50), " ms")),
    ]
    say(f"extend: {out}")
    return out


# -- 2. poison ----------------------------------------------------------------------------------
@dataclass
class Drain:
    """One drain of a queue by W workers; with a poison task, every delivery of it."""

    healthy: int
    poison_id: str | None
    max_deliveries: int
    progress: Progress | None = None
    acked: set[str] = field(default_factory=set)
    ack_times: list[float] = field(default_factory=list)  # seconds from the start, in order
    ack_false: int = 0
    duplicates: int = 0
    errors: int = 0
    started: float = 0.0
    last_ack: float = 0.0
    drained_at: float | None = None
    poison: list[dict[str, Any]] = field(default_factory=list)
    parked_at: float | None = None
    parked_entry: dict[str, Any] | None = None
    timed_out: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def healthy_done(self) -> bool:
        return len(self.acked) >= self.healthy

    @property
    def throughput(self) -> float:
        return ratio(len(self.acked), self.last_ack - self.started)

    def progress_s(self) -> dict[str, float | None]:
        """Seconds until half, 90 % and all of the healthy tasks were acked."""
        t = self.ack_times
        at = {"50%": 0.5, "90%": 0.9, "100%": 1.0}
        return {k: round(t[max(math.ceil(f * len(t)) - 1, 0)], 3) if t else None for k, f in at.items()}

    def on_poison(self, task: Task, worker_id: str) -> None:
        now = time.perf_counter()
        self.poison.append(
            {
                "at_s": round(now - self.started, 3),
                "deliveries": task.deliveries,
                "epoch": task.epoch,
                "worker": worker_id,
                "after_park": self.parked_at is not None,
                "during_drain": not self.healthy_done,
            }
        )

    def on_ack(self, task_id: str, ok: bool) -> None:
        if not ok:
            self.ack_false += 1
            return
        if task_id in self.acked:
            self.duplicates += 1
            return
        self.acked.add(task_id)
        self.last_ack = time.perf_counter()
        self.ack_times.append(self.last_ack - self.started)
        if self.progress is not None:
            self.progress.advance()
        if self.healthy_done and self.drained_at is None:
            self.drained_at = self.last_ack
            if self.poison_id is None:
                self.stop.set()


async def _long_poll(w: Worker, wait_ms: int) -> tuple[Task | None, bool]:
    """One long-poll fetch: (the task or None, whether it failed with a retryable error)."""
    try:
        return await w.fetch(wait_ms=wait_ms), False
    except RETRYABLE:
        return None, True


async def _drain_worker(d: Drain, w: Worker, wait_ms: int) -> None:
    base = w.worker_id
    crashes = 0
    while not d.stop.is_set():
        task, failed = await _long_poll(w, wait_ms)
        d.errors += failed
        if task is None:
            continue
        if task.id == d.poison_id:
            d.on_poison(task, w.worker_id)
            # The worker "crashes" holding it: no ack, no fail; its lease runs out. What takes its
            # place is a new worker (the same id's next fetch would re-send the held task).
            crashes += 1
            w.worker_id = f"{base}-crash{crashes}"
            w.current = None
            continue
        try:
            ok = await retrying(partial(task.ack, "ok"))
        except RETRYABLE:
            d.errors += 1
            continue
        d.on_ack(task.id, ok)


async def _watch_poison(d: Drain, engine: Engine, svc: str, linger_s: float, deadline: float) -> None:
    """Ask ``parked`` once the poison task has had its deliveries; end the drain ``linger_s`` after
    its park (workers keep fetching meanwhile: it must not come back), or at ``deadline``."""
    while not d.stop.is_set():
        await asyncio.sleep(0.25)
        now = time.perf_counter()
        if now > deadline:
            d.timed_out = True
            d.stop.set()
            return
        if d.poison_id is None:
            continue
        if d.parked_at is None and len(d.poison) >= d.max_deliveries:
            try:
                parked = await engine.parked(svc)
            except RETRYABLE:
                continue
            for t in parked:
                if t.id == d.poison_id:
                    d.parked_at = now
                    d.parked_entry = dataclasses.asdict(t)
        if d.parked_at is not None and d.healthy_done and now - d.parked_at >= linger_s:
            d.stop.set()


async def _poison_run(bench: Bench, args: argparse.Namespace, svcs: Services, with_poison: bool) -> Drain:
    label = "with poison" if with_poison else "without poison"
    svc = svcs.new("poison" if with_poison else "healthy")
    async with engine_of(bench) as engine:
        poison_id = None
        if with_poison:  # first in the queue: its first deliveries fall in the healthy drain
            poison_id = await add_one(engine, svc, {"poison": True}, max_deliveries=args.max_deliveries)
        await fill(engine, svc, args.poison_tasks, f"poison ({label}): adds")
        workers = await open_workers(bench, svc, args.poison_workers, "pw" if with_poison else "hw")
        for w in workers:
            # Every fetch asks for the crash's short lease: a worker cannot know what it will get.
            w.time_to_recover_ms = args.poison_ttr_ms
        d = Drain(args.poison_tasks, poison_id, args.max_deliveries)
        linger_s = 2 * (args.poison_ttr_ms / 1000 + SKEW_MARGIN_S) + 1
        try:
            async with Progress(f"poison ({label}): drain", total=args.poison_tasks, unit="acks") as p:
                d.progress = p
                d.started = time.perf_counter()
                deadline = d.started + args.poison_timeout
                await asyncio.gather(
                    *(_drain_worker(d, w, args.wait_ms) for w in workers),
                    _watch_poison(d, engine, svc, linger_s, deadline),
                )
        finally:
            await close_all(workers)
        if with_poison and d.parked_entry is not None:  # once more, after the linger
            final = [dataclasses.asdict(t) for t in await retrying(partial(engine.parked, svc))]
            d.parked_entry = next((t for t in final if t["id"] == poison_id), None)
    return d


def _poison_report(healthy: Drain, poisoned: Drain, max_deliveries: int, rows: list[Row]) -> dict[str, Any]:
    r = ratio(poisoned.throughput, healthy.throughput)
    entry = poisoned.parked_entry or {}
    seen = len(poisoned.poison)
    after_park = sum(1 for p in poisoned.poison if p["after_park"])
    parked_deliveries = entry.get("deliveries")
    parked_ok = parked_deliveries == max_deliveries and seen == max_deliveries and after_park == 0
    out = {
        "healthy_tasks": healthy.healthy,
        "max_deliveries": max_deliveries,
        "throughput_without_poison": round(healthy.throughput, 1),
        "throughput_with_poison": round(poisoned.throughput, 1),
        "ratio": finite(round(r, 3)),
        "poison_deliveries_seen": seen,
        "poison_deliveries_during_drain": sum(1 for p in poisoned.poison if p["during_drain"]),
        "poison_handed_out_after_park": after_park,
        "parked": entry or None,
        "parked_after_s": None if poisoned.parked_at is None else round(poisoned.parked_at - poisoned.started, 2),
        "deliveries": poisoned.poison,
        "ack_false": {"without": healthy.ack_false, "with": poisoned.ack_false},
        "duplicates": {"without": healthy.duplicates, "with": poisoned.duplicates},
        "errors": {"without": healthy.errors, "with": poisoned.errors},
        "timed_out": {"without": healthy.timed_out, "with": poisoned.timed_out},
        "acked": {"without": len(healthy.acked), "with": len(poisoned.acked)},
        "drain_s": {"without": healthy.progress_s(), "with": poisoned.progress_s()},
    }
    rows += [
        Row(
            "poison",
            "healthy throughput with / without poison",
            fmt(r, "x", 3),
            f">= {POISON_GOAL}",
            None if not math.isfinite(r) else r >= POISON_GOAL,
        ),
        Row("poison", "without / with (tasks/s)", f"{healthy.throughput:.0f} / {poisoned.throughput:.0f}"),
        Row(
            "poison",
            "poison deliveries when parked",
            f"{parked_deliveries} ({seen} seen)",
            f"== {max_deliveries}",
            parked_ok,
        ),
        Row(
            "poison",
            "parked reason",
            str(entry.get("reason")),
            "delivery_limit",
            entry.get("reason") == "delivery_limit",
        ),
        Row("poison", "handed out after its park", str(after_park), "0", after_park == 0),
        Row(
            "poison",
            "healthy tasks acked (without / with)",
            f"{len(healthy.acked)} / {len(poisoned.acked)}",
            f"{healthy.healthy} each",
            healthy.healthy_done and poisoned.healthy_done,
        ),
    ]
    return out


async def phase_poison(bench: Bench, args: argparse.Namespace, svcs: Services, rows: list[Row]) -> dict[str, Any]:
    await bench.ensure_bridges(args.poison_bridges)
    say(
        f"poison: {args.poison_tasks} healthy tasks, {args.poison_workers} workers, {args.poison_bridges} bridge(s); "
        f"without, then with one poison task (maxDeliveries {args.max_deliveries}, leases {args.poison_ttr_ms} ms)"
    )
    # Pairs in alternating order (without/with, with/without, ...): one drain of 1,000 tasks lasts
    # seconds, so a single pair mostly measures the machine's noise; the median pair ratio does not.
    pairs: list[tuple[Drain, Drain]] = []
    for i in range(args.poison_repeats):
        if i % 2 == 0:
            healthy = await _poison_run(bench, args, svcs, with_poison=False)
            poisoned = await _poison_run(bench, args, svcs, with_poison=True)
        else:
            poisoned = await _poison_run(bench, args, svcs, with_poison=True)
            healthy = await _poison_run(bench, args, svcs, with_poison=False)
        pairs.append((healthy, poisoned))
    ratios = sorted(ratio(p.throughput, h.throughput) for h, p in pairs)
    finite_ratios = [r for r in ratios if not math.isnan(r)]
    # The median (of an even count, the mean of the middle two: the upper one was reported).
    median = statistics.median(finite_ratios) if finite_ratios else math.nan
    detail: list[Row] = []
    reports = [_poison_report(h, p, args.max_deliveries, detail) for h, p in pairs]
    out = reports[-1]
    out["pair_ratios"] = [finite(round(r, 3)) for r in ratios]
    out["ratio"] = finite(round(median, 3))
    # Every poisoned run must have parked its task right; the throughput row is the median pair's.
    per_run = len(detail) // len(pairs)
    for i, row in enumerate(detail[:per_run]):
        verdicts = [detail[k * per_run + i].passed for k in range(len(pairs))]
        if i == 0:
            rows.append(
                Row(
                    "poison",
                    f"healthy throughput with / without poison (median of {len(pairs)} pairs)",
                    fmt(median, "x", 3),
                    f">= {POISON_GOAL}",
                    None if not math.isfinite(median) else median >= POISON_GOAL,
                )
            )
            rows.append(Row("poison", "pair ratios", " ".join(fmt(r, "x", 2) for r in ratios)))
            continue
        ok = None if any(v is None for v in verdicts) else all(verdicts)
        rows.append(Row(row.phase, row.name, row.value, row.goal, ok))
    out["bridges"] = args.poison_bridges
    out["workers"] = args.poison_workers
    brief = {k: v for k, v in out.items() if k != "deliveries"}
    say(f"poison: {brief}")
    return out


# -- 3. delayed ---------------------------------------------------------------------------------
@dataclass
class Delayed:
    total: int
    added: dict[str, int] = field(default_factory=dict)  # task id -> when its add was answered (ms)
    due_mismatch: int = 0  # the id's time (the bridge's due time) is not the notBefore asked for
    seen: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # id -> (due, received, claimed) ms
    duplicates: int = 0
    ack_false: int = 0
    errors: int = 0
    progress: Progress | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, task: Task, received_ms: int) -> None:
        value = task.value if isinstance(task.value, dict) else {}
        due = int(value.get("due", ms_of(uuid.UUID(task.id))))
        # The bridge's clock at the claim (it runs on this host): lease end minus the lease asked for.
        claimed = ms_of_iso(task.lease_expires_at) - DELAYED_TTR_MS
        if task.id in self.seen:
            self.duplicates += 1
            return
        self.seen[task.id] = (due, received_ms, claimed)
        if self.progress is not None:
            self.progress.advance()
        if len(self.seen) >= self.total:
            self.stop.set()


async def _delayed_worker(st: Delayed, w: Worker, wait_ms: int, ack_next: bool = False) -> None:
    """Long-polls, acks each task; with ``ack_next`` (contract 1.6) the ack fetches the next task,
    and the worker long-polls again only when there was none."""
    task = None
    while not st.stop.is_set():
        if task is None:
            task, failed = await _long_poll(w, wait_ms)
            st.errors += failed
            if task is None:
                continue
        st.record(task, now_ms())
        try:
            if ack_next:
                ok, task = await retrying(partial(w.ack_and_fetch, "ok"))
            else:
                ok, task = await retrying(partial(task.ack, "ok")), None
        except RETRYABLE:
            st.errors += 1
            task = None
            continue
        st.ack_false += not ok


DUE_COUNTER = "queue_bridge_tasks_due"  # delayed tasks the bridges' schedulers announced


async def _follow(bench: Bench, st: Delayed, dues: list[int], start_ms: int) -> dict[str, Any]:
    """Every second until the run ends: how many tasks were due, announced (the schedulers'
    ``tasks_due``) and handed out; which stage a backlog builds up in."""
    base = (await bench.counters()).get(DUE_COUNTER, 0.0)
    series: list[list[float]] = []
    while not st.stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(st.stop.wait(), 1.0)
        now = now_ms()
        announced = (await bench.counters()).get(DUE_COUNTER, 0.0) - base
        series.append([round((now - start_ms) / 1000, 1), bisect.bisect_right(dues, now), announced, len(st.seen)])
    return {
        "max_due_not_announced": max((d - a for _, d, a, _ in series), default=None),
        "max_announced_not_handed_out": max((a - h for _, _, a, h in series), default=None),
        "series_s_due_announced_handed": series,
    }


async def _add_delayed(engine: Engine, svc: str, due: int, st: Delayed) -> None:
    task_id = await add_one(engine, svc, {"due": due}, not_before=iso_ms(due))
    st.added[task_id] = now_ms()
    if ms_of(uuid.UUID(task_id)) != due:
        st.due_mismatch += 1


def _delayed_report(st: Delayed, bridges: int, window_s: float, lead_s: float, rows: list[Row]) -> dict[str, Any]:
    on_time = {tid: v for tid, v in st.seen.items() if st.added.get(tid, 0) <= v[0]}
    late_received = [got - due for due, got, _ in on_time.values()]
    late_claimed = [claimed - due for due, _, claimed in on_time.values()]
    early = sum(1 for due, got, claimed in st.seen.values() if got < due or claimed < due)
    added_late = sum(1 for tid, at in st.added.items() if tid in st.seen and at > st.seen[tid][0])
    received = summary_ms(late_received)
    missing = st.total - len(st.seen)
    out = {
        "bridges": bridges,
        "tasks": st.total,
        "window_s": window_s,
        "lead_s": round(lead_s, 1),
        "handed_out_minus_not_before": received,
        "claimed_minus_not_before": summary_ms(late_claimed),
        "early": early,
        "missing": missing,
        "duplicates": st.duplicates,
        "ack_false": st.ack_false,
        "errors": st.errors,
        "added_after_due": added_late,  # left out of the latencies (handed out at once, late by the add)
        "due_mismatch": st.due_mismatch,
        "p50_by_second_ms": by_second(
            [(due, got - due) for due, got, _ in on_time.values()], min((v[0] for v in st.seen.values()), default=0)
        ),
    }
    p99 = received["p99_ms"]
    tag = f"delayed ({bridges}b)"
    rows += [
        Row(
            tag,
            # Over every task: one never handed out is infinitely late (the percentile of those
            # handed out alone read 46 s as the p99 with 2,707 of 10,000 never handed out).
            "handed out - notBefore p99" + (f" ({missing} never handed out: infinite)" if missing else ""),
            fmt(p99, " ms", 1),
            f"<= {DELAYED_GOAL_MS:.0f} ms",
            None if p99 is None and not missing else (not missing and p99 is not None and p99 <= DELAYED_GOAL_MS),
        ),
        Row(tag, "p50 / max", f"{fmt(received['p50_ms'], '', 1)} / {fmt(received['max_ms'], ' ms', 0)}"),
        Row(tag, "early deliveries", str(early), "0", early == 0),
        Row(tag, "never handed out", str(missing), "0", missing == 0),
        Row(tag, "handed out twice", str(st.duplicates), "0", st.duplicates == 0),
        Row(tag, "added after their due time (left out)", str(added_late)),
    ]
    return out


async def _delayed_run(
    bench: Bench, args: argparse.Namespace, svcs: Services, bridges: int, rows: list[Row]
) -> dict[str, Any]:
    await bench.ensure_bridges(bridges)
    svc = svcs.new(f"delayed-{bridges}b")
    n = args.delayed_tasks
    workers = await open_workers(bench, svc, args.delayed_workers, f"dw{bridges}")
    for w in workers:
        w.time_to_recover_ms = DELAYED_TTR_MS
    lead_s = args.delayed_lead if args.delayed_lead is not None else auto_lead_s(n)
    dues = due_times(now_ms() + int(lead_s * 1000), int(args.delayed_window * 1000), n)
    say(
        f"delayed ({bridges} bridge(s)): {n} tasks due over {args.delayed_window:.0f} s from {lead_s:.0f} s on, "
        f"{args.delayed_workers} workers long-polling ({args.wait_ms} ms), "
        + ("acking with next" if args.ack_next else "a fetch and an ack a task")
    )
    st = Delayed(n)
    statements_before = await bench.statements()
    executed_before = await bench.executed_statements()
    counters_before = await bench.counters()
    meter = bench.cpu_meter()
    consumers = [asyncio.create_task(_delayed_worker(st, w, args.wait_ms, args.ack_next)) for w in workers]
    follow = asyncio.create_task(_follow(bench, st, dues, dues[0]))
    try:
        async with engine_of(bench) as engine, Progress(f"delayed ({bridges}b): adds", total=n, unit="adds") as p:
            adds = await closed_loop(
                lambda _s, i: _add_delayed(engine, svc, dues[i], st),
                concurrency=ADD_CONCURRENCY,
                count=n,
                progress=p,
            )
        if adds.errors:
            raise RuntimeError(f"delayed: {adds.errors} adds failed")
        wait_s = (dues[-1] - now_ms()) / 1000 + args.delayed_tail
        async with Progress(f"delayed ({bridges}b): handed out", total=n, unit="tasks") as p:
            st.progress = p
            p.advance(len(st.seen))
            try:
                await asyncio.wait_for(st.stop.wait(), max(wait_s, 1.0))
            except TimeoutError:
                left = n - len(st.seen)
                say(f"delayed: {left} tasks not handed out {args.delayed_tail:.0f} s after the last due time")
    finally:
        st.stop.set()
        _, pending = await asyncio.wait(consumers, timeout=args.wait_ms / 1000 + 2)
        for c in pending:
            c.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        await close_all(workers)
        followed = await asyncio.gather(follow, return_exceptions=True)
        stages: dict[str, Any] | BaseException = followed[0]
    out = _delayed_report(st, bridges, args.delayed_window, lead_s, rows)
    out["stages"] = stages if isinstance(stages, dict) else {"error": repr(stages)}
    if isinstance(stages, dict):
        backlog = (
            f"{fmt(stages['max_due_not_announced'], '', 0)} / {fmt(stages['max_announced_not_handed_out'], '', 0)}"
        )
        rows.append(Row(f"delayed ({bridges}b)", "max backlog: due not announced / announced not out", backlog))
    out["cpu_percent"] = meter.stop()  # of one core, adds to the last delivery, by process group
    # Per task handed out: the add, the scheduler's work on its due time, the claim and the ack.
    # Requests (a batch once) and statements (each member of a batch counted).
    spent = {k: v - statements_before.get(k, 0.0) for k, v in (await bench.statements()).items()}
    per = {k: round(v / max(len(st.seen), 1), 3) for k, v in sorted(spent.items()) if v > 0}
    done = {k: v - executed_before.get(k, 0.0) for k, v in (await bench.executed_statements()).items()}
    per_statement = {k: round(v / max(len(st.seen), 1), 3) for k, v in sorted(done.items()) if v > 0}
    out["ack_next"] = args.ack_next
    counters = await bench.counters()  # what the bridges did meanwhile (fetch outcomes, scans, hints, ...)
    out["counters"] = {
        k: round(v - counters_before.get(k, 0.0), 3) for k, v in sorted(counters.items()) if v != counters_before.get(k)
    }
    out["requests_per_task"] = round(sum(per.values()), 2)
    out["statements_per_task"] = round(sum(per_statement.values()), 2) if per_statement else math.nan
    out["by_request"] = per
    out["by_statement"] = per_statement
    rows.append(Row(f"delayed ({bridges}b)", "Cassandra requests per task", fmt(out["requests_per_task"], "", 2)))
    rows.append(
        Row(
            f"delayed ({bridges}b)",
            "Cassandra statements per task (batch members counted)",
            fmt(out["statements_per_task"], "", 2),
        )
    )
    say(f"delayed ({bridges} bridge(s)): {out}")
    return out


async def phase_delayed(bench: Bench, args: argparse.Namespace, svcs: Services, rows: list[Row]) -> dict[str, Any]:
    return {
        f"{b}_bridges": await _delayed_run(bench, args, svcs, b, rows)
        for b in (int(x) for x in args.delayed_bridges.split(","))
    }


# -- the run ------------------------------------------------------------------------------------
async def _delete_leftovers(bench: Bench, services: list[str]) -> None:
    """What ``Bench.teardown`` does not remove: the 1.4 lifecycle queue, the duty queue, hint queues."""
    import aio_pika

    names = [f"{bench.queue_prefix}.lifecycle", f"{bench.queue_prefix}.duty"]
    names += [hint_queue_name(bench.queue_prefix, QueueKey(OWNER, s)) for s in services]
    conn = await aio_pika.connect(bench.amqp_url("guest"))
    try:
        for name in names:
            ch = await conn.channel()
            try:
                await ch.queue_delete(name)
            except Exception:  # never declared: the channel is closed by the broker
                continue
    finally:
        await conn.close()


Phase = Callable[[Bench, argparse.Namespace, Services, list[Row]], Awaitable[dict[str, Any]]]
PHASE_FUNCS: dict[str, Phase] = {"extend": phase_extend, "poison": phase_poison, "delayed": phase_delayed}


async def _phases(bench: Bench, args: argparse.Namespace, svcs: Services, rows: list[Row]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    wanted = [p.strip() for p in args.phases.split(",")]
    for name in PHASES:
        if name not in wanted:
            continue
        say(f"== {name}")
        bench.phase = name
        try:
            report[name] = await PHASE_FUNCS[name](bench, args, svcs, rows)
        except (StackDown, ProcessFailed):
            raise
        except Exception as exc:
            bench.failed = True
            logging.getLogger("benchmarks.lifecycle").exception("phase %s failed", name)
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            rows.append(Row(name, "phase failed", type(exc).__name__, "", False))
        bench.check_processes()
    return report


async def run(args: argparse.Namespace) -> int:
    plan = dataclasses.replace(Plan.default(), base_seq=args.baseline_samples)
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    # metrics: the delayed phase follows the schedulers
    bench = Bench(plan, bridges=1, metrics=True, profile_dir=profile_dir, profile_clock="cpu")
    svcs = Services(bench)
    rows: list[Row] = []
    started = time.monotonic()
    date = now_iso()
    await bench.setup()
    watcher = asyncio.create_task(bench.watch_others())
    bridge_log: dict[str, Any] = {}
    try:
        report = await _phases(bench, args, svcs, rows)
        bridge_log = logs.summarize(bench.bridge_logs)
    except BaseException:
        bench.failed = True
        raise
    finally:
        watcher.cancel()
        await bench.teardown()
        try:
            await asyncio.wait_for(_delete_leftovers(bench, svcs.names), 20)
        except Exception as exc:
            say(f"could not remove this run's lifecycle/duty/hint queues: {type(exc).__name__}")
    doc = {
        "benchmark": "W-lifecycle",
        "date": date,
        "run_id": bench.run_id,
        "commit": git_commit(),
        "machine": machine(),
        "elapsed_s": round(time.monotonic() - started, 1),
        "command": " ".join(["python -m benchmarks.lifecycle", *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "phases": report,
        "table": [{**dataclasses.asdict(r), "verdict": r.verdict} for r in rows],
        "bridge_log": bridge_log,
        "disturbed": {phase: sorted(procs) for phase, procs in bench.disturbances.items()},
    }
    write_json(args.out, doc)
    print(f"W-lifecycle (run {bench.run_id}, {doc['commit']}, {date})", flush=True)
    print(render(rows), flush=True)
    if bench.disturbances:
        print("other processes seen meanwhile (shared CPUs and servers):", flush=True)
        for phase, procs in sorted(bench.disturbances.items()):
            print(f"  {phase}: {len(procs)} ({', '.join(sorted(procs)[:3])}...)", flush=True)
    say(f"results written to {args.out}")
    return 1 if any("error" in v for v in report.values() if isinstance(v, dict)) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.lifecycle",
        description=doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 2)[-1],
    )
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated, of: " + ", ".join(PHASES))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lifecycle.json")
    ap.add_argument("--baseline-samples", type=int, default=400, help="extend: B-rpc and B-lwt requests each")
    ap.add_argument("--extend-samples", type=int, default=400, help="extend: extends measured per round")
    ap.add_argument(
        "--extend-rounds", type=int, default=3, help="extend: rounds of (baselines, extends); the median ratio counts"
    )
    ap.add_argument("--extends-per-task", type=int, default=4, help="extend: extends of each held task")
    ap.add_argument("--poison-tasks", type=int, default=1000, help="poison: healthy tasks in the queue")
    ap.add_argument("--poison-workers", type=int, default=8)
    ap.add_argument("--poison-bridges", type=int, default=1)
    ap.add_argument("--max-deliveries", type=int, default=5, help="poison: the poison task's maxDeliveries")
    ap.add_argument("--poison-ttr-ms", type=int, default=1000, help="poison: timeToRecover of every fetch")
    ap.add_argument("--poison-timeout", type=float, default=180.0, help="poison: seconds a drain may take at most")
    ap.add_argument("--poison-repeats", type=int, default=3, help="poison: pairs of drains (without, with), alternated")
    ap.add_argument("--delayed-tasks", type=int, default=10_000)
    ap.add_argument("--delayed-window", type=float, default=60.0, help="delayed: seconds the due times span")
    ap.add_argument(
        "--delayed-lead",
        type=float,
        default=None,
        help=f"delayed: seconds from the first add to the first due time (default 5 + tasks / {ASSUMED_ADD_RATE:.0f})",
    )
    ap.add_argument("--delayed-workers", type=int, default=16)
    ap.add_argument(
        "--ack-next",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="delayed: workers ack with next (contract 1.6), one request a task, as the client's Worker.run "
        "does (the default); --no-ack-next: a fetch and an ack a task",
    )
    ap.add_argument("--delayed-bridges", default="1,2", help="delayed: bridge counts, one run each")
    ap.add_argument("--delayed-tail", type=float, default=30.0, help="delayed: seconds to wait past the last due time")
    ap.add_argument("--wait-ms", type=int, default=5000, help="long-poll waitMs of the poison and delayed workers")
    ap.add_argument("--profile", metavar="DIR", help="bridges under cProfile timed by CPU (benchmarks.cpuprofile)")
    args = ap.parse_args(argv)
    counts = (args.max_deliveries, args.extend_rounds, args.poison_tasks, args.delayed_tasks, args.extends_per_task)
    if min(counts) < 1:
        ap.error("counts must be positive")
    unknown = [p for p in args.phases.split(",") if p.strip() not in PHASES]
    if unknown:
        ap.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    try:
        if any(int(b) < 1 for b in args.delayed_bridges.split(",")):
            raise ValueError
    except ValueError:
        ap.error("--delayed-bridges: positive bridge counts, comma-separated (e.g. 1,2)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fmt_ = "[%(asctime)s] load generator: %(name)s %(levelname)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt_)
    return run_locked(run(args))


if __name__ == "__main__":
    sys.exit(main())
