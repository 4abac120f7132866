"""Time helpers shared by the Python client's tests: a lease deadline as the bridge writes it, and
waiting on a condition instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


def iso_in(seconds: float) -> str:
    """The ISO 8601 time ``seconds`` from now, as a reply's ``leaseExpiresAt``."""
    at = datetime.now(UTC) + timedelta(seconds=seconds)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def until(predicate: Callable[[], object], timeout: float = 3.0, what: str = "") -> None:
    """Wait for a condition (checked every few ms), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.005)
