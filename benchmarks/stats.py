"""Latency samples, percentiles, figures and targets: the numbers the report is made of."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (``q`` in 0..100) of an already sorted list."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    if pos == lo or sorted_values[hi] == sorted_values[lo]:
        return sorted_values[lo]  # (an infinite value, a task that never came: inf - inf is NaN)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Sample:
    """Latencies of one kind of operation (seconds) plus the wall time the batch took."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0  # seconds of wall time over which `count` operations completed
    errors: int = 0

    def add(self, seconds: float) -> None:
        self.latencies.append(seconds)

    @property
    def count(self) -> int:
        return len(self.latencies)

    def p(self, q: float) -> float:
        """Percentile ``q`` in milliseconds."""
        return percentile(sorted(self.latencies), q) * 1000.0

    @property
    def throughput(self) -> float:
        return self.count / self.elapsed if self.elapsed > 0 else math.nan


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class Figure:
    """One row of the results table."""

    name: str  # e.g. "W-cycle fetch (c=16)"
    group: str  # e.g. "W-cycle"
    count: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    throughput: float = math.nan  # operations (tasks) per second, NaN when not meaningful
    unit: str = "ops/s"
    baseline: str = ""  # what the ratio is taken against (a description)
    ratio: float = math.nan  # measured / baseline: p50 / baseline p50, or throughput / baseline throughput
    ratio_of: str = ""  # "p50" or "throughput"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, group: str, sample: Sample, *, throughput: bool = True, **kw: Any) -> Figure:
        return cls(
            name=name,
            group=group,
            count=sample.count,
            p50_ms=sample.p(50),
            p99_ms=sample.p(99),
            throughput=sample.throughput if throughput else math.nan,
            **kw,
        )


@dataclass
class Target:
    """A requirement of the issue, checked against numbers measured in the same run."""

    name: str
    rule: str  # human readable, e.g. "fetch p50 <= 1.5 x (B-rpc p50 + B-lwt p50)"
    measured: float
    limit: float
    unit: str
    higher_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float:
        """measured / limit: <= 1 passes for "at most" targets, >= 1 for "at least" targets."""
        if self.limit == 0 or math.isnan(self.limit) or math.isnan(self.measured):
            return math.nan
        return self.measured / self.limit

    @property
    def passed(self) -> bool | None:
        if math.isnan(self.measured) or math.isnan(self.limit):
            return None
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


def finite(value: float) -> float | None:
    """JSON has no NaN: None instead."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value
