"""The Cassandra session on acsylla (the C++ driver, asyncio-native), behind the same interface as
:class:`bridge.storage.cassandra.CassandraSession` (``BRIDGE_CASSANDRA_DRIVER=acsylla``).

Why a second driver: the bridge is CPU-bound per statement, and cassandra-driver encodes and decodes
every request in Python and hands each result across from its own I/O thread. The C++ driver does
both in C++: measured side by side here (``benchmarks/drivers.py``), a statement costs the client
2-6x less CPU at 16 in flight and about half at 1, and an LWT answers 30-40% sooner.

What this adapter must keep equal to the other one (the domain and the tests rely on it):
- rows are dicts whose uuid and timeuuid columns are :class:`uuid.UUID` (acsylla gives strings);
- write timestamps come from the bridge's clock (``now_ms``), strictly increasing;
- errors map to the same storage errors: a statement never sent is ``StorageNotSent``; a
  conditional write whose outcome is unknown (a timeout, a connection lost under it) is
  ``UnknownOutcome``; invalid CQL is a bug and raised as :class:`InvalidQuery`;
- a statement that is not idempotent is never retried by the driver (``fallthrough`` policy).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import acsylla
from acsylla import errors as cass

from bridge.config import CASSANDRA_RECONNECT_BASE_DELAY_S, Settings
from bridge.storage.cassandra import ClockTimestamps
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
from bridge.storage.schema import uuid_columns
from bridge.storage.session import Row
from bridge.storage.stall import StallWatch, stall_after_s
from bridge.storage.statements import NULLS_UNSET

log = logging.getLogger("acsylla")

DEFAULT_PAGE_SIZE = 5000  # cassandra-driver's default fetch size: the same pages on both drivers

# Never sent (or refused before any replica acted): nothing was applied, whatever the statement.
_NOT_SENT: tuple[type[BaseException], ...] = (
    cass.CassErrorLibNoHostsAvailable,
    cass.CassErrorLibRequestQueueFull,
    cass.CassErrorLibNoStreams,
    cass.CassErrorLibNoAvailableIoThread,
    cass.CassErrorServerIsBootstrapping,
    cass.CassErrorLibUnableToConnect,
)
# Refused before any replica acted only for a statement of one partition: a coordinator checks a
# mutation's live replicas before it sends it, but a batch's mutations one after the other (those
# before the one refused were sent). Overloaded is not here: Cassandra's hint check runs replica by
# replica as it sends (sendToHintedReplicas), after the live replicas before it got the write. A
# batch taken for not sent was never counted nor hinted (its task row had landed), as
# cassandra-driver's adapter, which calls both "may have landed", never did.
_NOT_SENT_ONE_PARTITION: tuple[type[BaseException], ...] = (cass.CassErrorServerUnavailable,)
# ... except for a compare-and-set: with Paxos v1 a coordinator commits a proposal a quorum has
# accepted, and that commit can answer Unavailable (a replica gone meanwhile) or Overloaded (a hint
# backlog for a node down) for an LWT already decided. Unknown, then: settled by the SERIAL read.
_LWT_UNKNOWN: tuple[type[BaseException], ...] = (cass.CassErrorServerUnavailable, cass.CassErrorServerOverloaded)
# The CQL itself is wrong (or the schema is still changing): a bug, not an outage.
_INVALID: tuple[type[BaseException], ...] = (
    cass.CassErrorServerInvalidQuery,
    cass.CassErrorServerSyntaxError,
    cass.CassErrorServerConfigError,
    cass.CassErrorServerAlreadyExists,
    cass.CassErrorServerUnprepared,
)


class _NotScylla(logging.Filter):
    """The driver is ScyllaDB's build of the C++ driver: on every connection to Apache Cassandra it
    logs, as an error, that the node has no shards to be aware of. That is expected, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "sharding info" not in record.getMessage()


log.addFilter(_NotScylla())


class AcsyllaSession:
    """One C++-driver session per process, with prepared statements; natively async."""

    def __init__(self, settings: Settings, now_ms: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self.timestamps = ClockTimestamps(now_ms) if now_ms is not None else None
        self.statements: Counter[str] = Counter()  # requests sent, by statement name (tests, benchmarks)
        # Statements Cassandra executes, by name: a batch's members each under their own name (one
        # request, several statements); a single statement as in ``statements``.
        self.executed: Counter[str] = Counter()
        self.keyspace = settings.cassandra_keyspace
        self._session: Any = None
        self._prepared: dict[str, Any] = {}
        self._idempotent: dict[str, bool] = {}
        self._conditional: set[str] = set()  # compare-and-sets (``IF``), decided by Paxos
        self._uuid_columns = uuid_columns()
        self._serial = acsylla.Consistency[settings.cassandra_serial_consistency]
        self.stall = StallWatch(stall_after_s(settings.cassandra_timeout))

    # -- lifecycle -------------------------------------------------------------------------
    async def connect(self) -> None:
        s = self.settings
        options: dict[str, Any] = {}
        if s.cassandra_username:
            options["username"] = s.cassandra_username
            options["password"] = s.cassandra_password.get_secret_value() if s.cassandra_password else ""
        if s.cassandra_local_dc:
            options["load_balance_dc_aware"] = s.cassandra_local_dc
        # Unset: the driver's default, DC-aware with the DC of the first contact point it reaches.
        # Never round robin over every DC: LOCAL_QUORUM counts the coordinator's DC, so a write
        # coordinated in one DC and a read in another would not overlap.
        options.update(_tls_options(s))
        cluster = acsylla.create_cluster(
            list(s.cassandra_hosts),
            port=s.cassandra_port,
            connect_timeout=s.cassandra_timeout,
            request_timeout=s.cassandra_timeout,
            consistency=s.cassandra_consistency,
            serial_consistency=s.cassandra_serial_consistency,
            # Never resent by the driver: an LWT or a counter increment resent after its connection
            # failed under it could apply twice. The error reaches the caller (unknown outcome).
            retry_policy="fallthrough",
            token_aware_routing=True,
            tcp_nodelay=True,
            # A heartbeat once the connection wrote nothing for the interval; closed (its requests
            # failed) once it read nothing for the idle timeout, heartbeats' answers included
            # (acsylla's default idle timeout is 60 s: a dead connection held requests twice as long).
            heartbeat_interval_sec=s.cassandra_heartbeat_interval,
            idle_timeout_sec=s.cassandra_idle_timeout,
            # Cassandra outages are short: a few cheap reconnection attempts a second are fine.
            exponential_reconnect_base_delay_ms=int(CASSANDRA_RECONNECT_BASE_DELAY_S * 1000),
            exponential_reconnect_max_delay_ms=int(s.cassandra_reconnect_max_delay * 1000),
            # The C++ driver's own log (connection errors, ...) goes to the "acsylla" logger.
            log_level="warn",
            application_name="queue-bridge",
            **options,
        )
        try:
            self._session = await cluster.create_session()
        except cass.CassException as exc:
            raise StorageUnavailable(f"cassandra unavailable: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        session, self._session = self._session, None
        self._prepared.clear()
        if session is not None:
            await session.close()

    def any_host_up(self) -> bool:
        """Whether the driver has a live connection to some Cassandra node (no network I/O)."""
        session = self._session
        return session is not None and session.metrics().stats_total_connections > 0

    def stalled(self) -> bool:
        return self.stall.stalled()

    def answered_within(self, seconds: float) -> bool:
        return self.stall.answered_within(seconds)

    @property
    def session(self) -> Any:
        if self._session is None:
            raise StorageUnavailable("not connected to Cassandra")
        return self._session

    # -- statements ------------------------------------------------------------------------
    async def prepare(self, name: str, cql: str, *, idempotent: bool) -> None:
        try:
            self._prepared[name] = await self.session.create_prepared(cql.replace("{ks}", self.keyspace))
        except cass.CassException as exc:
            # Mapped as a statement is: a timeout or no host at start is an outage the start
            # tries again (BRIDGE_START_TIMEOUT), not a crash. Nothing to apply: never unknown.
            raise _storage_error(exc, lwt=False) from exc
        self._idempotent[name] = idempotent
        if " IF " in cql:
            self._conditional.add(name)

    def _bound(self, name: str, params: Sequence[Any], page_size: int | None = None) -> Any:
        if name not in NULLS_UNSET:
            return self._prepared[name].bind(list(params), page_size=page_size)
        # Absent values left unbound: the C++ driver sends them unset (protocol v4+), not null.
        stmt = self._prepared[name].bind(page_size=page_size)
        for index, value in enumerate(params):
            if value is not None:
                stmt.bind(index, value)
        return stmt

    def _bind(self, name: str, params: Sequence[Any], fetch_size: int | None = None) -> Any:
        stmt = self._bound(name, params, fetch_size or DEFAULT_PAGE_SIZE)
        stmt.set_is_idempotent(self._idempotent[name])
        if self.timestamps is not None:
            stmt.set_timestamp(self.timestamps())
        return stmt

    async def execute(
        self,
        name: str,
        params: Sequence[Any] = (),
        *,
        serial_read: bool = False,
        fetch_size: int | None = None,
    ) -> list[Row]:
        stmt = self._bind(name, params, fetch_size)
        self.statements[name] += 1
        self.executed[name] += 1
        if serial_read:
            stmt.set_consistency(self._serial)
        return await self._all_pages(stmt, lwt=not self._idempotent[name], conditional=name in self._conditional)

    async def execute_batch(self, name: str, items: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Plain writes to several partitions as one UNLOGGED batch (see ``CassandraSession``)."""
        batch = acsylla.create_batch_unlogged()
        for part, params in items:
            if not self._idempotent[part]:
                raise ValueError(f"{part} is conditional: an LWT never goes in a batch here")
            batch.add_statement(self._bound(part, params))
        batch.set_is_idempotent(True)
        if self.timestamps is not None:
            batch.set_timestamp(self.timestamps())
        self.statements[name] += 1
        self.executed.update(part for part, _ in items)
        try:
            with self.stall.track():
                await self.session.execute_batch(batch)
        except cass.CassException as exc:
            raise _storage_error(exc, lwt=False, batch=len(items) > 1) from exc

    async def _all_pages(self, stmt: Any, *, lwt: bool, conditional: bool | None = None) -> list[Row]:
        rows: list[Row] = []
        while True:
            try:
                with self.stall.track():
                    result = await self.session.execute(stmt)
            except cass.CassException as exc:
                raise _storage_error(exc, lwt=lwt, conditional=conditional) from exc
            rows.extend(self._row(r) for r in result.all())
            if not result.has_more_pages():
                return rows
            stmt.set_page_state(result.page_state())

    def _row(self, r: Any) -> Row:
        row: Row = r.as_dict()
        for column in self._uuid_columns.intersection(row):
            value = row[column]
            if isinstance(value, str):
                row[column] = uuid.UUID(value)
        return row

    async def execute_raw(self, cql: str) -> list[Row]:
        """Run unprepared CQL (schema changes, admin); not for the hot path."""
        stmt = acsylla.create_statement(cql.replace("{ks}", self.keyspace), timeout=60, page_size=DEFAULT_PAGE_SIZE)
        try:
            return await self._all_pages(stmt, lwt=" IF " in cql)
        except StorageNotSent as exc:
            if refused_as_not_authorized(exc):
                # A schema change the bridge's role may not make: the operator's to grant, not an
                # outage to wait out at start (retried for BRIDGE_START_TIMEOUT as "cannot be reached").
                raise InvalidQuery(exc.message) from exc
            raise


def _storage_error(exc: BaseException, *, lwt: bool, batch: bool = False, conditional: bool | None = None) -> Exception:
    """``lwt``: a statement that must not be sent twice (a compare-and-set, a counter update);
    ``conditional`` (default: ``lwt``): a compare-and-set. A counter update refused Unavailable was
    applied nowhere (checked before it is forwarded and before it is applied): not sent, kept by
    the counts' flush for the next, not dropped as an unknown outcome (found by review)."""
    conditional = lwt if conditional is None else conditional
    if isinstance(exc, cass.CassErrorServerUnauthorized):
        return not_authorized(exc)
    if isinstance(exc, _INVALID):
        if names_missing_schema(str(exc)):
            return schema_missing(exc)
        return InvalidQuery(str(exc))
    if conditional and isinstance(exc, _LWT_UNKNOWN):
        return UnknownOutcome(f"{kind_of(exc)}: the write may or may not have applied")
    if isinstance(exc, _NOT_SENT) or (not batch and isinstance(exc, _NOT_SENT_ONE_PARTITION)):
        return StorageNotSent(f"cassandra unavailable: {type(exc).__name__}")
    # A timeout, a connection lost under the request, a failure on a replica: a conditional write
    # may still be applied later (CASSANDRA-9328); a plain statement is simply retried.
    if lwt:
        return UnknownOutcome(f"{kind_of(exc)}: the write may or may not have applied")
    return StorageUnavailable(f"cassandra error: {kind_of(exc)}")


@dataclass(frozen=True)
class _VerifyFlags:
    """The C++ driver's verify flags (``cass_ssl_set_verify_flags``), each checked on its own:
    PEER_CERT 0x01 (the chain), PEER_IDENTITY 0x02 (the node's address in the certificate),
    PEER_IDENTITY_DNS 0x04 (its host name). acsylla 1.2 gives PEER_IDENTITY PEER_CERT's value
    (1), so asked for by name the address was never checked: any certificate of the trusted CA
    (another service's) passed for any node. acsylla reads ``.value`` of what it is given."""

    value: int


_PEER_CERT, _PEER_IDENTITY, _PEER_IDENTITY_DNS = 0x01, 0x02, 0x04
VERIFY_CERT_AND_ADDRESS = _VerifyFlags(_PEER_CERT | _PEER_IDENTITY)
VERIFY_CERT_AND_HOST_NAME = _VerifyFlags(_PEER_CERT | _PEER_IDENTITY_DNS)


def system_ca_bundle() -> str:
    """The system's trusted CAs as PEM text: the C++ driver starts with an empty trust store and
    never loads OpenSSL's default paths, so without a CA file it trusted nothing (every node
    refused), where the documented default is the system's CAs (as the other driver and AMQP)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get(paths.openssl_cafile_env), paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text()
    folder = os.environ.get(paths.openssl_capath_env) or paths.capath or paths.openssl_capath
    pems = sorted(Path(folder).glob("*.pem")) if folder and Path(folder).is_dir() else []
    if not pems:
        raise ValueError("no system CA bundle found: set BRIDGE_CASSANDRA_TLS_CA_FILE")
    return "\n".join(p.read_text() for p in pems)


def _tls_options(s: Settings) -> dict[str, Any]:
    """TLS to Cassandra, verifying each node's certificate and its address (as ``tls_context``)."""
    files = (s.cassandra_tls_ca_file, s.cassandra_tls_cert_file, s.cassandra_tls_key_file)
    if not s.cassandra_tls and not any(files):
        return {}
    options: dict[str, Any] = {"ssl_enabled": True, "ssl_verify_flags": VERIFY_CERT_AND_ADDRESS}
    if s.cassandra_tls_ca_file:
        options["ssl_trusted_cert"] = Path(s.cassandra_tls_ca_file).read_text()
    else:
        options["ssl_trusted_cert"] = system_ca_bundle()
    if s.cassandra_tls_cert_file:
        options["ssl_cert"] = Path(s.cassandra_tls_cert_file).read_text()
    if s.cassandra_tls_key_file:
        options["ssl_private_key"] = Path(s.cassandra_tls_key_file).read_text()
    if any(re.search(r"[A-Za-z]", h) for h in s.cassandra_hosts):
        # A node named by host name: its certificate must name it (reverse lookups enabled).
        options["ssl_verify_flags"] = VERIFY_CERT_AND_HOST_NAME
        options["hostname_resolution"] = True
    return options
