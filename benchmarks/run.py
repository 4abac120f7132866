"""The benchmark runner: ``python -m benchmarks.run [--quick] [--only W-cycle,...] [--bridges N] [--out PATH]``.

It starts bridge processes (``python -m bridge run``) against the local stack on 127.0.0.1, measures
the baselines and the workloads in one run, prints a table and writes a JSON file. A run uses its
own exchange and queue prefix (``qb-bench-<id>``) and the keyspace ``qb_bench``, which it drops and
re-creates first, so it never touches the tests' names or an earlier run's state.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fcntl
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import IO, Any

from benchmarks import baselines, frame_decode, json_passthrough, logs, workloads
from benchmarks.context import Bench, Plan, StackDown
from benchmarks.procs import ROOT, ProcessFailed, other_activity
from benchmarks.progress import say
from benchmarks.report import code_fingerprint, git_commit, machine, now_iso, render, to_json, write_json

WORKLOADS = ["W-add", "W-cycle", "W-e2e", "W-recover", "W-scale", "Memory", "B-json", "B-decode"]
BASELINES = ["B-rpc", "B-lwt", "B-write"]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "latest.json"


def needed_baselines(selected: list[str], plan: Plan) -> dict[str, list[int]]:
    """Which baselines (and at which concurrencies) the selected workloads are compared with."""
    c, win = plan.workers, plan.add_window
    need: dict[str, set[int]] = {name: set() for name in BASELINES}
    for name in selected:
        if name == "B-rpc":
            need["B-rpc"] |= {1, c}
        elif name == "B-lwt":
            need["B-lwt"] |= {1, c}
        elif name == "B-write":
            need["B-write"] |= {1, win}
        elif name == "W-add":
            need["B-rpc"].add(1)
            need["B-write"] |= {1, win}
        elif name == "W-cycle":
            need["B-rpc"] |= {1, c}
            need["B-lwt"] |= {1, c}
        elif name == "W-e2e":
            need["B-rpc"].add(1)
            need["B-write"].add(1)
            need["B-lwt"].add(1)
        elif name == "W-scale":
            need["B-lwt"].add(c)
    return {k: sorted(v) for k, v in need.items() if v}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="queue-bridge benchmarks against the local stack: baselines and workloads measured in one run, "
        "a table on stdout and a JSON file (see docs/performance.md).",
    )
    ap.add_argument("--quick", action="store_true", help="scaled-down counts (< 60 s); says so in the output")
    ap.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of {', '.join(BASELINES + WORKLOADS)} "
        "(the baselines a workload is compared with always run)",
    )
    ap.add_argument("--bridges", type=int, default=1, help="bridge processes for the workloads (default 1)")
    ap.add_argument(
        "--e2e-rates",
        default="",
        metavar="R1,R2",
        help="W-e2e add rates per second, one step each (default 200,100; --quick 200)",
    )
    ap.add_argument(
        "--scale-bridges",
        default="",
        metavar="N1,N2",
        help="W-scale bridge counts, one step each (default 1,2,4; --quick 1,2)",
    )
    ap.add_argument(
        "--scale-rate",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="W-scale also runs each bridge count at a fixed offered load: this fraction (e.g. 0.5) "
        "of one bridge's saturation throughput in the same run; reports the rate reached, fetch p50 and failed "
        "claim LWTs",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results file (default {DEFAULT_OUT})")
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the bridges under cProfile and write DIR/bridge-N.prof (slows them down: not for figures)",
    )
    ap.add_argument(
        "--metrics",
        action="store_true",
        help="give each bridge an HTTP port on 127.0.0.1 (default BRIDGE_HTTP_PORT=0) and report its failed claim "
        "LWTs (and the conflicts among them) in W-scale",
    )
    ap.add_argument(
        "--profile-clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: python -m cProfile (default); cpu: time.thread_time of the event-loop thread",
    )
    args = ap.parse_args(argv)
    known = {n.lower(): n for n in BASELINES + WORKLOADS}
    selected = []
    for raw in filter(None, (p.strip() for p in args.only.split(","))):
        if raw.lower() not in known:
            ap.error(f"unknown name {raw!r} in --only; use {', '.join(BASELINES + WORKLOADS)}")
        selected.append(known[raw.lower()])
    args.selected = selected or WORKLOADS
    if args.bridges < 1 or args.bridges > 8:
        ap.error("--bridges must be between 1 and 8")
    return args


def _plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick_plan() if args.quick else Plan.default()
    if args.e2e_rates:
        plan.e2e_rates = tuple(int(r) for r in args.e2e_rates.split(",") if r.strip())
    if args.scale_rate:
        plan.scale_rate_fraction = args.scale_rate
    if args.scale_bridges:
        plan.scale_bridges = tuple(int(n) for n in args.scale_bridges.split(",") if n.strip())
    return plan


def _warn_if_noisy(meta_machine: dict[str, Any]) -> None:
    """Record (in the machine metadata) and report other activity and a high load at start."""
    others = other_activity()
    meta_machine["other_activity_at_start"] = others
    if others:
        say("warning: other bridges or test runs are using this machine; figures will be noisy:")
        for line in others[:5]:
            say(f"  {line}")
    if meta_machine["loadavg_at_start"][0] > 1.0:
        say(f"warning: load average {meta_machine['loadavg_at_start'][0]:.2f} at start; figures will be noisy")


def _steps(bench: Bench, selected: list[str], plan: Plan) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """The baselines the selection needs, then the selected workloads, in the canonical order."""
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    for name, concurrencies in needed_baselines(selected, plan).items():
        if name == "B-rpc":
            steps.append((name, lambda cs=concurrencies: baselines.b_rpc(bench, cs)))
        else:
            steps.append((name, lambda n=name, cs=concurrencies: baselines.b_cassandra(bench, n, cs)))
    table: dict[str, Callable[[Bench], Awaitable[None]]] = {
        "W-add": workloads.w_add,
        "W-cycle": workloads.w_cycle,
        "W-e2e": workloads.w_e2e,
        "W-recover": workloads.w_recover,
        "W-scale": workloads.w_scale,
        "Memory": workloads.memory,
        "B-json": json_passthrough.figures,
        "B-decode": frame_decode.figures,
    }
    for name in WORKLOADS:
        if name in selected:
            steps.append((name, lambda fn=table[name]: fn(bench)))
    return steps


async def _run_steps(
    bench: Bench,
    steps: list[tuple[str, Callable[[], Awaitable[None]]]],
    started: float,
    needs_bridge: bool,
) -> None:
    """Set up, run each step (a workload past the budget is skipped), tear down whatever happens."""
    plan = bench.plan
    watcher = asyncio.create_task(bench.watch_others())
    try:
        await bench.setup()
        for name, step in steps:
            spent = time.monotonic() - started
            if spent > plan.budget_s and name in WORKLOADS:
                say(f"== {name}: SKIPPED, {spent:.0f}s spent of the {plan.budget_s:.0f}s budget")
                bench.skipped.append(name)
                continue
            say(f"== {name}")
            bench.phase = name
            await step()
        bench.phase = "end"
        if needs_bridge:
            workloads.final_memory(bench)
            bench.sections["bridge_log"] = logs.summarize(bench.bridge_logs)
    except BaseException:
        bench.failed = True
        raise
    finally:
        watcher.cancel()
        await bench.teardown()


def _report(args: argparse.Namespace, bench: Bench, meta: dict[str, Any]) -> None:
    print(render(bench, meta), flush=True)
    write_json(args.out, to_json(bench, meta))
    say(f"results written to {args.out}")
    if args.profile:
        print(profile_summary(bench.profiles), flush=True)
        say(f"profiles in {args.profile} (python -m pstats {args.profile}/bridge-0.prof)")


async def run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    selected: list[str] = args.selected
    started = time.monotonic()
    date = now_iso()
    code_at_start = code_fingerprint()
    meta_machine = machine()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    needs_bridge = any(name in WORKLOADS for name in selected)
    bench = Bench(
        plan,
        bridges=args.bridges if needs_bridge else 0,
        profile_dir=args.profile,
        profile_clock=args.profile_clock,
        metrics=args.metrics,
    )
    say(
        f"queue-bridge benchmarks ({'--quick' if plan.quick else 'default'}): "
        + ", ".join(n for n in BASELINES + WORKLOADS if n in selected)
        + f"; budget {'60 s' if plan.quick else '5 min'}"
    )
    _warn_if_noisy(meta_machine)
    await _run_steps(bench, _steps(bench, selected, plan), started, needs_bridge)
    meta = {
        "date": date,
        "run_id": bench.run_id,
        "quick": plan.quick,
        "selected": selected,
        "bridges": args.bridges,
        "commit": git_commit(),
        "bridge_code_at_start": code_at_start,
        "bridge_code_at_end": code_fingerprint(),
        "machine": meta_machine,
        "plan": dataclasses.asdict(plan),
        "elapsed_s": time.monotonic() - started,
        "skipped": bench.skipped,
        "disturbed": {phase: sorted(procs) for phase, procs in bench.disturbances.items()},
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
    }
    _report(args, bench, meta)
    return 0


def profile_summary(paths: list[Path], top: int = 20) -> str:
    """The top entries of each bridge profile, by own time and by cumulative time."""
    import io
    import pstats

    out = io.StringIO()
    for path in paths:
        if not path.exists():
            out.write(f"\n{path}: not written (did the bridge stop cleanly?)\n")
            continue
        for order in ("tottime", "cumulative"):
            out.write(f"\n== {path.name}, top {top} by {order}\n")
            stats = pstats.Stats(str(path), stream=out)
            stats.strip_dirs().sort_stats(order).print_stats(top)
    return out.getvalue()


class _Dedup(logging.Filter):
    """Library warnings (aiormq reconnecting...) once per message per 10 s, not once per connection."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.getMessage()[:80]}"
        now = time.monotonic()
        if now - self._seen.get(key, -1e9) < 10.0:
            return False
        self._seen[key] = now
        return True


LOCK = ROOT / "benchmarks" / "results" / ".run.lock"
LOCK_WAIT_S = 360.0  # a default run takes less than 5 minutes


def take_run_lock() -> IO[str] | None:
    """One run at a time: every run drops and re-creates the keyspace qb_bench, so two runs at once
    would destroy each other's tables. Wait (bounded) for a run in progress to finish."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    fh = LOCK.open("a+")
    deadline = time.monotonic() + LOCK_WAIT_S
    told = False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            return fh
        except BlockingIOError:
            if time.monotonic() > deadline:
                fh.close()
                return None
            if not told:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                say(f"another benchmark run (pid {holder}) is using keyspace qb_bench; waiting for it to finish")
                told = True
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] load generator: %(name)s %(levelname)s: %(message)s"))
    handler.addFilter(_Dedup())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    return run_locked(run(args))


def run_locked(benchmark: Coroutine[Any, Any, int]) -> int:
    """Run one benchmark under the shared run lock (every run drops and re-creates the keyspace
    qb_bench: one at a time), on uvloop when installed; exit code 3 if another run holds the lock,
    2 if the stack is down, 1 if a process of the run failed."""
    lock = take_run_lock()
    if lock is None:
        benchmark.close()
        say(f"error: another benchmark run still holds {LOCK} after {LOCK_WAIT_S:.0f}s")
        return 3
    try:
        import uvloop

        runner: Callable[[Awaitable[int]], int] = uvloop.run  # type: ignore[assignment]
    except ImportError:
        runner = asyncio.run  # type: ignore[assignment]
    try:
        return runner(benchmark)
    except StackDown as exc:
        say(f"error: {exc}")
        return 2
    except ProcessFailed as exc:
        say(f"error: {exc}")
        return 1
    finally:
        lock.close()  # releases the flock


if __name__ == "__main__":
    sys.exit(main())
