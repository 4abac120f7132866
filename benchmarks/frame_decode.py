"""B-decode: what decoding a request's frames costs, pamqp's way and the bridge's
(``bridge.transport.frame_decoding``), both measured in the same run.

Every request reaches the bridge as three frames: Basic.Deliver, a content header with the
properties the Python client sets (content type, correlation id, reply-to, user id, a timestamp,
the persistent delivery mode, and a headers table with the owner and the deadline), and the body.
This runs both decoders on those frames and reports the CPU time per request and the ratio
after / before (lower is better). Pure CPU, no servers; both with pamqp made tolerant, as the
bridge runs it.

    python -m benchmarks.frame_decode      (or: make bench-decode)
"""

from __future__ import annotations

import datetime

import pamqp.frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from benchmarks.context import Bench
from benchmarks.json_passthrough import cpu_us
from benchmarks.stats import Figure
from bridge.transport import frame_decoding, tolerant_decoding

BODY = (
    b'{"serviceId":"billing","workerId":"worker-7f3a","taskId":"6f1c2b8e-8a3b-11f1-8000-3c2b9e4d1a77",'
    b'"epoch":3,"timeToRecover":60000}'
)


def request_frames() -> list[bytes]:
    props = Basic.Properties(
        content_type="application/json",
        correlation_id="0123456789abcdef0123456789abcdef",
        reply_to="amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxMjM0NTY3OC5yYWJiaXQAAAAAAAAAAGcm",
        user_id="worker-a",
        headers={"x-owner": "tenant-a", "x-deadline": 1_796_000_000_000},
        timestamp=datetime.datetime(2026, 12, 7, 5, 0, 0, tzinfo=datetime.UTC),
        delivery_mode=2,
    )
    parts = [
        Basic.Deliver("amq.ctag-Xf3l0w6xk3J9zV2u8ZkQ1A", 123_456, False, "qb.requests", "extend"),
        ContentHeader(body_size=len(BODY), properties=props),
        ContentBody(BODY),
    ]
    return [pamqp.frame.marshal(part, 1) for part in parts]


def measure() -> tuple[float, float]:
    """CPU microseconds per request (its three frames): pamqp's decoder, the bridge's."""
    tolerant_decoding.install()
    frames = request_frames()
    pamqp_unmarshal = frame_decoding._pamqp_unmarshal
    bridge_unmarshal = frame_decoding.unmarshal

    def before() -> None:
        for frame in frames:
            pamqp_unmarshal(frame)

    def after() -> None:
        for frame in frames:
            bridge_unmarshal(frame)

    return cpu_us(before), cpu_us(after)


async def figures(bench: Bench) -> None:
    """The row in ``make bench``'s table: after / before as the ratio (lower is better)."""
    before, after = measure()
    bench.figure(
        Figure(
            "B-decode a request's three frames",
            "B-decode",
            p50_ms=after / 1000,
            baseline=f"pamqp's decoder: {before:.1f} us",
            ratio=after / before,
            ratio_of="p50",
            note=f"CPU per request {after:.1f} us (pamqp {before:.1f} us)",
        )
    )


def main() -> None:
    before, after = measure()
    print(f"{'decoder':10s} {'us per request':>15s}")
    print(f"{'pamqp':10s} {before:15.1f}")
    print(f"{'bridge':10s} {after:15.1f}")
    print(f"after / before: {after / before:.2f}")


if __name__ == "__main__":
    main()
