"""The CQL session the storage adapter talks through, and the choice of driver behind it.

Two drivers implement it (``BRIDGE_CASSANDRA_DRIVER``): ``acsylla`` (the C++ driver, asyncio-native;
the default: less CPU and latency per statement, see ``bridge/storage/acsylla_session.py``) and
``datastax`` (cassandra-driver, pure Python on an I/O thread of its own). Both map the drivers'
errors to the storage errors of ``bridge.storage.errors`` and hand out rows alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from bridge.config import Settings

Row = dict[str, Any]


class CqlSession(Protocol):
    statements: Counter[str]  # requests sent, by statement name (metrics, tests, benchmarks)
    executed: Counter[str]  # statements executed, by name: each member of a batch counted under its own
    keyspace: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    def any_host_up(self) -> bool: ...

    def stalled(self) -> bool:
        """Statements wait on a node that answers none of them (``bridge.storage.stall``)."""
        ...

    def answered_within(self, seconds: float) -> bool:
        """A statement was answered less than ``seconds`` ago (``bridge.storage.stall``)."""
        ...

    async def prepare(self, name: str, cql: str, *, idempotent: bool) -> None: ...

    async def execute(
        self, name: str, params: Sequence[Any] = (), *, serial_read: bool = False, fetch_size: int | None = None
    ) -> list[Row]: ...

    async def execute_batch(self, name: str, items: Sequence[tuple[str, Sequence[Any]]]) -> None: ...

    async def execute_raw(self, cql: str) -> list[Row]: ...


def open_session(settings: Settings, now_ms: Callable[[], int] | None = None) -> CqlSession:
    """The session of the configured driver (not connected yet)."""
    if settings.cassandra_driver == "acsylla":
        from bridge.storage.acsylla_session import AcsyllaSession

        return AcsyllaSession(settings, now_ms)
    from bridge.storage.cassandra import CassandraSession

    return CassandraSession(settings, now_ms)
