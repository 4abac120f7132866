"""Cassandra session setup and the bridge from the driver's callback futures to asyncio.

cassandra-driver has no native asyncio API: ``execute_async`` returns a ResponseFuture whose
callbacks run on the driver's I/O thread, so results are handed to the event loop with
``call_soon_threadsafe``. Nothing here blocks the event loop except connect/close, which run in a
worker thread.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import anyio.to_thread
from cassandra import (
    ConsistencyLevel,
    DriverException,
    OperationTimedOut,
    RequestExecutionException,
    RequestValidationException,
    Unauthorized,
    Unavailable,
    WriteTimeout,
)
from cassandra import protocol as proto
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.connection import ConnectionException
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    RetryPolicy,
    TokenAwarePolicy,
)
from cassandra.query import UNSET_VALUE, BatchStatement, BatchType, PreparedStatement, dict_factory

from bridge.config import CASSANDRA_RECONNECT_BASE_DELAY_S, Settings
from bridge.storage.errors import (
    InvalidQuery,
    StorageNotSent,
    StorageUnavailable,
    UnknownOutcome,
    kind_of,
    names_missing_schema,
    not_authorized,
    refused_as_not_authorized,
    schema_missing,
)
from bridge.storage.stall import StallWatch, stall_after_s
from bridge.storage.statements import NULLS_UNSET

_CL = {
    "LOCAL_QUORUM": ConsistencyLevel.LOCAL_QUORUM,
    "QUORUM": ConsistencyLevel.QUORUM,
    "SERIAL": ConsistencyLevel.SERIAL,
    "LOCAL_SERIAL": ConsistencyLevel.LOCAL_SERIAL,
}

Row = dict[str, Any]


class NoBlindRetries(RetryPolicy):  # type: ignore[misc]  # the driver ships no types
    """The driver's default policy, except that a statement that is not idempotent (an LWT, a
    counter increment) is never sent again after its connection failed under it: the first copy
    may have been applied, and a second would apply the increment twice. The error reaches
    :meth:`CassandraSession.execute`, which reports it as an unknown outcome."""

    def on_request_error(self, query: Any, consistency: Any, error: Any, retry_num: int) -> tuple[int, Any]:
        if query is not None and not query.is_idempotent:
            return self.RETHROW, None
        return super().on_request_error(query, consistency, error, retry_num)  # type: ignore[no-any-return]

    def on_unavailable(
        self, query: Any, consistency: Any, required_replicas: int, alive_replicas: int, retry_num: int
    ) -> tuple[int, Any]:
        # The default sends it to the next host once: an LWT whose commit answered Unavailable may
        # be decided already, and sent again it is a second proposal. Rethrown: settled as unknown.
        if query is not None and not query.is_idempotent:
            return self.RETHROW, None
        return super().on_unavailable(  # type: ignore[no-any-return]
            query, consistency, required_replicas, alive_replicas, retry_num
        )


class ClockTimestamps:
    """Client-side write timestamps (microseconds) from the bridge's clock, strictly increasing.

    The driver's default generator reads ``time.time()``; reading the bridge's one injectable
    clock instead means a fault drill that shifts the clock shifts the write timestamps too,
    exactly as a host with a skewed clock would.
    """

    def __init__(self, now_ms: Callable[[], int]) -> None:
        self._now_ms = now_ms
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            now = self._now_ms() * 1000
            self._last = now if now > self._last else self._last + 1
            return self._last

    def rebase(self) -> None:
        """The clock changed source (its first reading of Cassandra's time replaced the host's):
        stamps follow it from now on. Kept strictly above the host's, every write of a bridge
        started on a host minutes ahead was stamped minutes ahead for as long (a retried write,
        a delete by compare-and-set, then lost to it)."""
        with self._lock:
            self._last = 0


def _to_asyncio(rf: ResponseFuture, loop: asyncio.AbstractEventLoop) -> asyncio.Future[list[Row]]:
    fut: asyncio.Future[list[Row]] = loop.create_future()
    rows: list[Row] = []

    def _set(setter: Any, value: Any) -> None:
        if not fut.done():
            setter(value)

    def on_ok(page: Sequence[Row] | None) -> None:
        try:
            if page:  # None for schema changes and other results without rows
                rows.extend(page)
            more = rf.has_more_pages
        except BaseException as exc:  # never leave the asyncio future pending
            loop.call_soon_threadsafe(_set, fut.set_exception, exc)
            return
        if more:
            rf.start_fetching_next_page()
        else:
            loop.call_soon_threadsafe(_set, fut.set_result, rows)

    def on_err(exc: BaseException) -> None:
        loop.call_soon_threadsafe(_set, fut.set_exception, exc)

    rf.add_callbacks(on_ok, on_err)
    return fut


def tls_context(s: Settings) -> ssl.SSLContext | None:
    """TLS to Cassandra, verifying each node's certificate and its address (IP or name)."""
    files = (s.cassandra_tls_ca_file, s.cassandra_tls_cert_file, s.cassandra_tls_key_file)
    if not s.cassandra_tls and not any(files):
        return None
    ca = str(s.cassandra_tls_ca_file) if s.cassandra_tls_ca_file else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if s.cassandra_tls_cert_file:
        key = str(s.cassandra_tls_key_file) if s.cassandra_tls_key_file else None
        context.load_cert_chain(str(s.cassandra_tls_cert_file), key)
    return context


class CassandraSession:
    """One driver Cluster/Session per process, with prepared statements and async execution."""

    def __init__(self, settings: Settings, now_ms: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self.timestamps = ClockTimestamps(now_ms) if now_ms is not None else None
        self.statements: Counter[str] = Counter()  # requests sent, by statement name (tests, benchmarks)
        # Statements Cassandra executes, by name: a batch's members each under their own name (one
        # request, several statements); a single statement as in ``statements``.
        self.executed: Counter[str] = Counter()
        self.keyspace = settings.cassandra_keyspace
        self._cluster: Cluster | None = None
        self._session: Session | None = None
        self._prepared: dict[str, PreparedStatement] = {}
        self._conditional: set[str] = set()
        self.consistency = _CL[settings.cassandra_consistency]
        self.serial_consistency = _CL[settings.cassandra_serial_consistency]
        self.stall = StallWatch(stall_after_s(settings.cassandra_timeout))

    # -- lifecycle -------------------------------------------------------------------------
    async def connect(self) -> None:
        await anyio.to_thread.run_sync(self._connect_blocking)

    def _connect_blocking(self) -> None:
        s = self.settings
        # No local DC set: "" lets the policy take the DC of the contact points, as the driver's
        # default does. Never round robin over every DC: LOCAL_QUORUM counts the coordinator's
        # DC, so a write coordinated in one DC and a read in another would not overlap.
        lb = TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=s.cassandra_local_dc or ""))
        profile = ExecutionProfile(
            load_balancing_policy=lb,
            consistency_level=self.consistency,
            serial_consistency_level=self.serial_consistency,
            request_timeout=s.cassandra_timeout,
            row_factory=dict_factory,
            retry_policy=NoBlindRetries(),
        )
        auth = None
        if s.cassandra_username:
            password = s.cassandra_password.get_secret_value() if s.cassandra_password else ""
            auth = PlainTextAuthProvider(username=s.cassandra_username, password=password)
        cluster = Cluster(
            ssl_context=tls_context(s),
            contact_points=s.cassandra_hosts,
            port=s.cassandra_port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            auth_provider=auth,
            protocol_version=5,
            connect_timeout=s.cassandra_timeout,
            # The driver leaves Nagle's algorithm on: a request written while the previous one on the
            # connection is unacknowledged (the two writes a fetch sends side by side, concurrent
            # requests of a quiet bridge) waits for the server's delayed ACK, up to 40 ms on Linux.
            sockopts=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            # Every interval, a heartbeat on each connection that read nothing since the last
            # round; one unanswered within the rest of the idle timeout closes its connection.
            idle_heartbeat_interval=s.cassandra_heartbeat_interval,
            idle_heartbeat_timeout=s.cassandra_idle_timeout - s.cassandra_heartbeat_interval,
            # The driver's default backs off from 1 s to 600 s: after a 10 s cut a bridge came back
            # only 16 s later. Cassandra outages are short; a few cheap retries per second are fine.
            reconnection_policy=ExponentialReconnectionPolicy(
                base_delay=CASSANDRA_RECONNECT_BASE_DELAY_S,
                max_delay=s.cassandra_reconnect_max_delay,
                max_attempts=None,
            ),
        )
        if self.timestamps is not None:
            cluster.timestamp_generator = self.timestamps
        self._cluster = cluster
        self._session = cluster.connect()

    async def close(self) -> None:
        cluster = self._cluster
        self._cluster = None
        self._session = None
        self._prepared.clear()
        if cluster is not None:
            await anyio.to_thread.run_sync(cluster.shutdown)

    def any_host_up(self) -> bool:
        """Whether the driver has a live connection to some Cassandra node (no network I/O)."""
        cluster = self._cluster
        if cluster is None or self._session is None:
            return False
        return any(host.is_up for host in cluster.metadata.all_hosts())

    def stalled(self) -> bool:
        return self.stall.stalled()

    def answered_within(self, seconds: float) -> bool:
        return self.stall.answered_within(seconds)

    @property
    def session(self) -> Session:
        if self._session is None:
            raise StorageUnavailable("not connected to Cassandra")
        return self._session

    # -- statements ------------------------------------------------------------------------
    async def prepare(self, name: str, cql: str, *, idempotent: bool) -> None:
        try:
            stmt = await anyio.to_thread.run_sync(self.session.prepare, cql.replace("{ks}", self.keyspace))
        except (RequestValidationException, proto.RequestValidationException) as exc:
            raise InvalidQuery(str(exc)) from exc
        except NoHostAvailable as exc:
            raise StorageNotSent("cassandra unavailable: no host available") from exc
        except (DriverException, proto.ErrorMessage, ConnectionException, OSError) as exc:
            # A timeout, a connection lost: an outage the start tries again (BRIDGE_START_TIMEOUT).
            raise StorageUnavailable(f"cassandra error: {kind_of(exc)}") from exc
        # LWTs must not be retried blindly or speculatively: their outcome is resolved by reading.
        stmt.is_idempotent = idempotent
        self._prepared[name] = stmt
        if " IF " in cql:
            self._conditional.add(name)  # a compare-and-set, decided by Paxos (else sent once: a counter)

    async def execute(
        self,
        name: str,
        params: Sequence[Any] = (),
        *,
        serial_read: bool = False,
        fetch_size: int | None = None,
    ) -> list[Row]:
        stmt = self._prepared[name]
        self.statements[name] += 1
        self.executed[name] += 1
        bound = stmt.bind(_values(name, params))
        if serial_read:
            bound.consistency_level = self.serial_consistency
        if fetch_size is not None:
            bound.fetch_size = fetch_size
        return await self._run(bound, lwt=not stmt.is_idempotent, conditional=name in self._conditional)

    async def execute_batch(self, name: str, items: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Send plain writes (no LWT) to several partitions as one UNLOGGED batch: one request
        and one reply instead of one each. Not atomic, like the same writes sent side by side:
        the reply says all were applied at the consistency level, an error says nothing either
        way (they are idempotent and the caller treats it as a failed write). Counted as one
        request, under ``name``."""
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for part, params in items:
            stmt = self._prepared[part]
            if not stmt.is_idempotent:
                raise ValueError(f"{part} is conditional: an LWT never goes in a batch here")
            batch.add(stmt, _values(part, params))
        batch.is_idempotent = True
        self.statements[name] += 1
        self.executed.update(part for part, _ in items)
        await self._run(batch, lwt=False, batch=True)

    async def _run(
        self, bound: Any, *, lwt: bool, timeout: float | None = None, batch: bool = False, conditional: bool = False
    ) -> list[Row]:
        rf = None
        try:
            with self.stall.track():
                if timeout is None:  # the profile's: BRIDGE_CASSANDRA_TIMEOUT
                    rf = self.session.execute_async(bound)
                else:
                    rf = self.session.execute_async(bound, timeout=timeout)
                return await _to_asyncio(rf, asyncio.get_running_loop())
        except Exception as exc:
            # Sent more than once, and an earlier copy failed in a way that may have applied (a
            # connection lost under it, a timeout; the retry policy then tried the next host): it
            # may have landed, whatever the last one was answered. (Copies answered Unavailable
            # were applied nowhere: the coordinator checks live replicas before it sends.)
            earlier = getattr(rf, "_errors", None) or {}
            # Only hosts the request was written to (``attempted_hosts``): the driver also records
            # hosts it never sent it to (no connection free, a pool shut down, a host marked down),
            # taken for copies that may have landed (found by the re-review, 2026-12-07).
            sent_to = set(getattr(rf, "attempted_hosts", None) or ())
            resent = any(not isinstance(e, Unavailable) for h, e in earlier.items() if h in sent_to)
            mapped = storage_error(exc, lwt=lwt, batch=batch, resent=resent, conditional=conditional)
            if mapped is None:
                raise
            raise mapped from exc

    async def execute_raw(self, cql: str) -> list[Row]:
        """Run unprepared CQL (schema changes, admin); not for the hot path. Its errors map as a
        statement's do: a timeout or an unavailable replica of a schema statement is an outage the
        start tries again (BRIDGE_START_TIMEOUT), not a crash."""
        try:
            conditional = " IF " in cql
            return await self._run(
                cql.replace("{ks}", self.keyspace), lwt=conditional, timeout=60, conditional=conditional
            )
        except (RequestValidationException, proto.RequestValidationException) as exc:
            raise InvalidQuery(str(exc)) from exc
        except StorageNotSent as exc:
            if refused_as_not_authorized(exc):
                # A schema change the bridge's role may not make: the operator's to grant, not an
                # outage to wait out at start (retried for BRIDGE_START_TIMEOUT as "cannot be reached").
                raise InvalidQuery(exc.message) from exc
            raise


def storage_error(
    exc: BaseException, *, lwt: bool, batch: bool = False, resent: bool = False, conditional: bool | None = None
) -> Exception | None:
    """The domain's storage error for a cassandra-driver error (None: raised as it is, a bug), as
    the acsylla adapter maps its own (``acsylla_session._storage_error``): both keep one contract.
    ``lwt``: a statement that must not be sent twice (a compare-and-set, a counter update);
    ``conditional`` (default: ``lwt``): a compare-and-set, decided by Paxos."""
    conditional = lwt if conditional is None else conditional
    if isinstance(exc, Unauthorized | proto.UnauthorizedErrorMessage):
        return not_authorized(exc)
    if isinstance(exc, RequestValidationException | proto.RequestValidationException):
        if names_missing_schema(str(exc)):
            return schema_missing(exc)
        return None  # a bug in our CQL or bind values (or the schema), not an outage
    if isinstance(exc, NoHostAvailable):
        if resent:
            # The driver sent the (idempotent) statement before a connection lost under it, then
            # ran out of hosts: it may have landed (taken for "not sent", a stale add was prepared
            # again under a new id: two tasks; found by review, 2026-12-07).
            return StorageUnavailable("cassandra unavailable: no host available after a copy was sent")
        # Never sent anywhere: not applied, whatever the statement.
        return StorageNotSent("cassandra unavailable: no host available")
    if isinstance(exc, WriteTimeout | OperationTimedOut | Unavailable):
        if lwt and conditional:
            # A conditional write that timed out may still be applied later (CASSANDRA-9328);
            # one answered Unavailable may have been decided already (Paxos v1 commits an
            # accepted proposal, and that commit can answer Unavailable).
            return UnknownOutcome(f"{kind_of(exc)}: the write may or may not have applied")
        if isinstance(exc, Unavailable) and not batch and not resent:
            # A coordinator checks a mutation's live replicas before it sends it: nothing was
            # written (a batch's mutations are checked one after the other: some may have been;
            # a statement the driver sent again, its first copy may have been).
            # A counter update too: its coordinator checks before it forwards it to the leader
            # replica, which checks again before it applies it. Taken for unknown, as before, a
            # flush dropped every delta of a queue whose counter replicas were down (found by review).
            return StorageNotSent(f"cassandra unavailable: {kind_of(exc)}")
        if lwt:
            return UnknownOutcome(f"{kind_of(exc)}: the write may or may not have applied")
        return StorageUnavailable(f"cassandra unavailable: {kind_of(exc)}")
    if isinstance(
        exc, RequestExecutionException | DriverException | proto.ErrorMessage | ConnectionException | OSError
    ):
        # ConnectionException (not a DriverException): the connection died under the request,
        # which may have reached the server: for a statement that is not idempotent, unknown.
        # ErrorMessage covers server-side failures the driver passes through as they are
        # (ServerError, Overloaded, IsBootstrapping, ...): all "try again later".
        if lwt:
            return UnknownOutcome(f"{kind_of(exc)}: the write may or may not have applied")
        return StorageUnavailable(f"cassandra error: {kind_of(exc)}")
    return None


def _values(name: str, params: Sequence[Any]) -> Sequence[Any]:
    """The values to bind: absent ones unset, not null, for the inserts of ``NULLS_UNSET``."""
    if name not in NULLS_UNSET:
        return params
    return [UNSET_VALUE if v is None else v for v in params]
