"""B-json: what the JSON pass-through saves per request, both ways measured in the same run.

A fetch reply carries the task's value. The value is stored as the exact JSON the engine sent, so
the bridge splices the decrypted bytes into the reply (``orjson.Fragment``) instead of parsing
them and writing them out again (what it did before contract 1.1). An add serializes its value
once (before: once to check the size, once to seal; the body parse is the same in both). This
benchmark runs the bridge's own functions for both paths on values of three sizes and reports the
CPU time per request and the ratio after / before (lower is better). Pure CPU, no servers.

    python -m benchmarks.json_passthrough      (or: make bench-json)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from benchmarks.context import Bench
from benchmarks.stats import Figure
from bridge.domain import jsonvalue
from bridge.domain.sealing import encode
from bridge.transport.envelope import iso, reply_body

TASK = {"id": "04afc000-833b-11ee-b082-639fd82c07cd", "epoch": 1, "deliveries": 1, "leaseExpiresAt": iso(0)}


def sample_value(target_bytes: int) -> Any:
    """A typical task value: an order with line items, until it is about ``target_bytes`` as JSON."""
    items: list[dict[str, Any]] = []
    value: dict[str, Any] = {"orderId": "A-1029", "customer": {"id": 77, "name": "Zoë"}, "items": items}
    i = 0
    while len(jsonvalue.dumps(value)) < target_bytes:
        items.append({"sku": f"SKU-{i:05d}", "qty": i % 7 + 1, "price": 19.99 + i, "tags": ["a", "b"], "gift": False})
        i += 1
    return value


def cpu_us(fn: Callable[[], object], seconds: float = 0.5) -> float:
    """CPU microseconds per call (process time, best of three rounds)."""
    best = float("inf")
    for _ in range(3):
        n = 0
        start = time.process_time_ns()
        deadline = time.perf_counter() + seconds / 3
        while time.perf_counter() < deadline:
            fn()
            n += 1
        best = min(best, (time.process_time_ns() - start) / n / 1000)
    return best


def measure() -> list[tuple[str, int, float, float]]:
    rows = []
    for size in (200, 4_096, 60_000):
        value = sample_value(size)
        value_json = jsonvalue.dumps(value)

        def reply_before(vj: bytes = value_json) -> bytes:
            # orjson's parse, the cheapest there is (the exact parser costs more): a lower bound.
            return reply_body(orjson.loads(vj), extra={"task": TASK})

        def reply_after(vj: bytes = value_json) -> bytes:
            return reply_body(jsonvalue.fragment(vj), extra={"task": TASK})

        assert jsonvalue.loads(reply_before()) == jsonvalue.loads(reply_after())

        def add_before(v: Any = value) -> bytes:
            encode(v, "the value", 1 << 20)  # the size check
            return encode(v, "the value", 1 << 20)  # the bytes sealed

        def add_after(v: Any = value) -> bytes:
            return encode(v, "the value", 1 << 20)

        rows.append(("fetch reply", len(value_json), cpu_us(reply_before), cpu_us(reply_after)))
        rows.append(("add value serialization", len(value_json), cpu_us(add_before), cpu_us(add_after)))
    return rows


async def figures(bench: Bench) -> None:
    """The same rows in ``make bench``'s table: after / before as the ratio (lower is better)."""
    for what, size, before, after in measure():
        bench.figure(
            Figure(
                f"B-json {what}, {size} B value",
                "B-json",
                p50_ms=after / 1000,
                baseline=f"the same without the pass-through: {before:.1f} us",
                ratio=after / before,
                ratio_of="p50",
                note=f"CPU per request {after:.1f} us (before {before:.1f} us)",
            )
        )


def main() -> None:
    print(f"{'what':26s} {'value bytes':>11s} {'before us':>10s} {'after us':>9s} {'after/before':>12s}")
    for what, size, before, after in measure():
        print(f"{what:26s} {size:11d} {before:10.1f} {after:9.1f} {after / before:12.2f}")


if __name__ == "__main__":
    main()
