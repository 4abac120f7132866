"""The results table (stdout) and the JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.context import Bench
from benchmarks.procs import ROOT
from benchmarks.stats import Figure, Target, finite


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "loadavg_at_start": os.getloadavg(),
    }


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "bridge"], cwd=ROOT, capture_output=True, text=True)
        return head.stdout.strip() + ("+dirty(bridge/)" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def code_fingerprint() -> str:
    """A hash of bridge/**/*.py: the code under test (it may change while a run goes, if edited)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((ROOT / "bridge").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _num(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def figures_table(figures: list[Figure]) -> str:
    rows = []
    for f in figures:
        thr = "-" if math.isnan(f.throughput) else f"{_num(f.throughput, 0)} {f.unit}"
        ratio = "-" if math.isnan(f.ratio) else f"{f.ratio:.2f}x {f.ratio_of}"
        rows.append([f.name, f"{f.count:,}", _num(f.p50_ms, 2), _num(f.p99_ms, 2), thr, ratio, f.baseline or "-"])
    headers = ["figure", "n", "p50 ms", "p99 ms", "throughput", "ratio", "baseline (same run)"]
    notes = [f"  {f.name}: {f.note}" for f in figures if f.note]
    out = _table(headers, rows, {1, 2, 3, 4})
    if notes:
        out += "\nnotes:\n" + "\n".join(notes)
    return out


def targets_table(targets: list[Target]) -> str:
    rows = []
    for t in targets:
        rows.append(
            [
                t.name,
                t.rule,
                f"{_num(t.measured, 2)} {t.unit}",
                f"{_num(t.limit, 2)} {t.unit}",
                "-" if math.isnan(t.ratio) else f"{t.ratio:.2f}",
                t.verdict,
            ]
        )
    return _table(["target", "rule", "measured", "limit", "ratio", "result"], rows, {2, 3, 4})


def cpu_table(cpu: dict[str, dict[str, float]]) -> str:
    cols = ["bridges", "cassandra", "rabbitmq", "generator", "echo"]
    rows = []
    for phase, v in cpu.items():
        rate = v.get("ops_per_s", math.nan)
        per_op = []
        for c in ("bridges", "cassandra"):
            pct = v.get(c, math.nan)
            per_op.append(_num(pct * 10.0 / rate, 2) if rate and not math.isnan(rate) and pct else "-")
        rows.append([phase, *[_num(v.get(c, math.nan), 0) for c in cols], _num(rate, 0), *per_op])
    headers = ["phase: CPU % of one core", *cols, "ops/s", "bridge ms/op", "cassandra ms/op"]
    return _table(headers, rows, set(range(1, len(headers))))


def _fixed_rate_lines(fixed: list[dict[str, Any]] | None) -> list[str]:
    """W-scale's fixed-rate step (``--scale-rate``): the rate offered and the rate reached (a fleet
    that fell behind its offered load measured its latency at a lower one), fetch latency, failed
    claim LWTs (every refused or unknown claim, ``workloads.claim_counts``) and conflicts among them,
    per bridge count."""
    if not fixed:
        return []
    rows = [
        [
            str(pt["bridges"]),
            _num(pt["offered_per_s"], 0),
            _num(pt.get("throughput", math.nan), 1),
            _num(pt["fetch_p50_ms"], 2),
            _num(pt.get("fetch_p50_vs_one_bridge", math.nan), 2),
            _num(pt["ack_p50_ms"], 2),
            _num(pt.get("failed_claim_lwts_per_task", math.nan), 3),
            _num(pt.get("claim_conflicts_per_task", math.nan), 3),
        ]
        for pt in fixed
    ]
    headers = [
        "W-scale fixed rate, bridges",
        "offered/s",
        "achieved/s",
        "fetch p50",
        "vs 1 bridge",
        "ack p50",
        "failed LWTs/task",
        "conflicts/task",
    ]
    return ["", _table(headers, rows, set(range(len(headers))))]


def render(bench: Bench, meta: dict[str, Any]) -> str:
    out = []
    mode = "QUICK (counts scaled down; not comparable with a default run)" if bench.plan.quick else "default"
    m = meta["machine"]
    out.append(
        f"queue-bridge benchmarks, {meta['date']}, {mode}, {meta['bridges']} bridge process(es), "
        f"commit {meta['commit']}\nmachine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_gib']} GiB RAM, "
        f"load at start {m['loadavg_at_start'][0]:.2f}; Cassandra, RabbitMQ, bridges and load generator share it"
    )
    if meta.get("bridge_code_at_start") != meta.get("bridge_code_at_end"):
        out.append("WARNING: bridge/ changed during the run; bridges started later ran different code")
    if meta.get("disturbed"):
        out.append(
            "WARNING, DISTURBED RUN: other bridges/test runs shared the machine and the servers during "
            + ", ".join(meta["disturbed"])
            + "; those figures are not clean"
        )
    lost = _connection_trouble(bench)
    if lost:
        out.append(
            f"WARNING: the bridges logged {lost} connection errors (a server restarted?); see 'bridge log lines'"
        )
    if bench.plan.quick:
        p = bench.plan
        out.append(
            f"--quick: {p.adds:,} adds/tasks instead of 20,000, W-recover {p.recover_tasks} tasks, "
            f"W-scale {', '.join(map(str, p.scale_bridges))} bridges, memory with {p.memory_tasks:,} tasks"
        )
    out.append("")
    out.append(figures_table(bench.figures))
    if bench.targets:
        out.append("")
        out.append(targets_table(bench.targets))
        passed = sum(1 for t in bench.targets if t.passed)
        out.append(f"{passed} of {len(bench.targets)} targets met")
    scale = bench.sections.get("scale")
    if scale:
        out.append("")
        rows = [
            [
                str(pt["bridges"]),
                _num(pt["throughput"], 0),
                _num(pt.get("speedup", math.nan), 2),
                _num(pt["fetch_p50_ms"], 2),
                _num(pt["ack_p50_ms"], 2),
                _num(pt["cpu_percent"].get("bridges", math.nan), 0),
                _num(pt["cpu_percent"].get("cassandra", math.nan), 0),
                _num(pt["failed_claim_lwts"] / max(pt["tasks"], 1), 2) if "failed_claim_lwts" in pt else "-",
                _num(pt["claim_conflicts"] / max(pt["tasks"], 1), 2) if "claim_conflicts" in pt else "-",
            ]
            for pt in scale
        ]
        headers = ["W-scale bridges", "tasks/s", "speedup", "fetch p50", "ack p50", "cpu% bridges", "cpu% cassandra"]
        out.append(_table([*headers, "failed LWTs/task", "conflicts/task"], rows, set(range(9))))
    out.extend(_fixed_rate_lines(bench.sections.get("scale_fixed_rate")))
    mem = bench.sections.get("memory")
    if mem:
        out.append("")
        out.append(
            "memory (VmRSS, MiB): "
            + ", ".join(f"{k.removesuffix('_mib')} {_fmt_mem(v)}" for k, v in mem.items() if k.endswith("_mib"))
        )
    blog = bench.sections.get("bridge_log")
    if blog:
        out.append("")
        levels = ", ".join(f"{n} {lvl}" for lvl, n in sorted(blog["levels"].items()))
        out.append(f"bridge log lines: {levels or 'none'}")
        for message, n in blog["top"]:
            out.append(f"  {n:>7,}  {message}")
    if bench.skipped:
        out.append("")
        out.append(f"SKIPPED (over the time budget): {', '.join(bench.skipped)}")
    if bench.sections.get("cpu"):
        out.append("")
        out.append(cpu_table(bench.sections["cpu"]))
    out.append("")
    out.append(f"total time {meta['elapsed_s']:.0f}s")
    return "\n".join(out)


def _connection_trouble(bench: Bench) -> int:
    blog = bench.sections.get("bridge_log") or {}
    return sum(
        n
        for message, n in blog.get("top", [])
        if "Connection" in message or "CONNECTION" in message or "connect" in message
    )


def _fmt_mem(v: Any) -> str:
    if isinstance(v, list):
        return "/".join(_num(x, 1) for x in v)
    return _num(v, 1)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(bench: Bench, meta: dict[str, Any]) -> dict[str, Any]:
    figures = []
    for f in bench.figures:
        d = dataclasses.asdict(f)
        figures.append(d)
    targets = [
        {
            "name": t.name,
            "rule": t.rule,
            "measured": t.measured,
            "limit": t.limit,
            "unit": t.unit,
            "ratio": t.ratio,
            "result": t.verdict,
            "note": t.note,
        }
        for t in bench.targets
    ]
    return _clean(
        {
            "meta": meta,
            "figures": figures,
            "targets": targets,
            "scale": bench.sections.get("scale", []),
            "scale_fixed_rate": bench.sections.get("scale_fixed_rate", []),
            "memory": bench.sections.get("memory", {}),
            "cpu_percent": bench.sections.get("cpu", {}),
            "bridge_log": bench.sections.get("bridge_log", {}),
        }
    )


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
