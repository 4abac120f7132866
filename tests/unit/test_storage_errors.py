"""How driver errors become the domain's storage errors: what an outcome is said to be.

Pure logic (a scripted session, no Cassandra): the outcome a caller hears decides whether it
counts, retries or looks the lease up later, so each mapping is pinned here.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from acsylla import errors as cass

from bridge.domain.errors import MaybeApplied, NotSent
from bridge.domain.records import QueueKey
from bridge.storage.acsylla_session import _storage_error
from bridge.storage.cassandra import NoBlindRetries
from bridge.storage.errors import StorageNotSent, StorageUnavailable, UnknownOutcome
from bridge.storage.repository import CassandraTaskStore

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("error", [cass.CassErrorServerUnavailable, cass.CassErrorServerOverloaded])
def test_an_lwt_answered_unavailable_or_overloaded_is_an_unknown_outcome(error: type[Exception]) -> None:
    """Paxos v1 commits a proposal a quorum accepted; that commit can answer Unavailable (a replica
    gone meanwhile) or Overloaded (a hint backlog): the compare-and-set may be decided already.
    Said "not sent", a claim or a cancel that applied was answered unavailable and its retry false."""
    assert isinstance(_storage_error(error("injected"), lwt=True), UnknownOutcome)


def test_a_plain_write_answered_unavailable_is_not_sent_unless_it_is_a_batch_of_several_partitions() -> None:
    """A coordinator checks each mutation's live replicas before sending it, but a batch's
    mutations one after another: a batch answered Unavailable may have written the partitions
    before the one refused. Said "not sent", an add whose task row had landed was neither counted
    nor hinted (cassandra-driver's adapter said "may have landed"). Found by review, 2026-12-06."""
    unavailable = cass.CassErrorServerUnavailable("injected")
    assert isinstance(_storage_error(unavailable, lwt=False), StorageNotSent)
    batch = _storage_error(unavailable, lwt=False, batch=True)
    assert isinstance(batch, StorageUnavailable) and not isinstance(batch, StorageNotSent)


def test_both_drivers_say_a_single_statement_answered_unavailable_was_not_sent() -> None:
    """cassandra-driver's adapter said "may have landed" where acsylla's said "not sent" for the
    same refusal of one statement: on the datastax driver, an add refused so kept its ageing task
    id for good and looked up a write that never happened (found by review, 2026-12-06)."""
    from cassandra import ConsistencyLevel, Unavailable

    from bridge.storage.cassandra import storage_error

    refused = Unavailable("injected", consistency=ConsistencyLevel.QUORUM, required_replicas=2, alive_replicas=1)
    assert isinstance(storage_error(refused, lwt=False), StorageNotSent)
    batch = storage_error(refused, lwt=False, batch=True)
    assert isinstance(batch, StorageUnavailable) and not isinstance(batch, StorageNotSent)
    assert isinstance(storage_error(refused, lwt=True), UnknownOutcome)
    # Sent again by the driver (its first host lost the connection under it): may have landed.
    resent = storage_error(refused, lwt=False, resent=True)
    assert isinstance(resent, StorageUnavailable) and not isinstance(resent, StorageNotSent)


def test_a_plain_write_answered_overloaded_may_have_landed() -> None:
    """Cassandra's hint check answers Overloaded replica by replica as it sends the write (after
    the live replicas before it got it): not a refusal before anything was written."""
    for batch in (False, True):
        mapped = _storage_error(cass.CassErrorServerOverloaded("injected"), lwt=False, batch=batch)
        assert isinstance(mapped, StorageUnavailable) and not isinstance(mapped, StorageNotSent)


def test_the_datastax_driver_does_not_send_an_lwt_again_after_unavailable() -> None:
    policy = NoBlindRetries()

    class Query:
        def __init__(self, idempotent: bool) -> None:
            self.is_idempotent = idempotent

    decision, _ = policy.on_unavailable(Query(False), None, 2, 1, 0)
    assert decision == policy.RETHROW
    decision, _ = policy.on_unavailable(Query(True), None, 2, 1, 0)
    assert decision == policy.RETRY_NEXT_HOST  # the driver's default for a plain statement


class _Session:
    """A session whose SERIAL lease read fails as scripted."""

    def __init__(self, read_error: Exception) -> None:
        self.read_error = read_error

    async def execute(self, name: str, params: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise self.read_error


@pytest.mark.parametrize("resend", [True, False])
@pytest.mark.parametrize("failure", [StorageNotSent("no host"), StorageUnavailable("read timeout")])
async def test_an_unknown_outcome_whose_settling_fails_stays_unknown(resend: bool, failure: Exception) -> None:
    """A compare-and-set timed out (unknown), and settling it (the resend, the SERIAL read) failed:
    the caller heard plain ``unavailable``, which says nothing landed, and never looked the lease up
    later: a claim or a completion that applied went uncounted."""
    store = CassandraTaskStore(_Session(failure), lambda: 0, 3600)  # type: ignore[arg-type]
    sent: list[int] = []

    async def attempt() -> list[dict[str, Any]]:
        sent.append(1)
        if len(sent) == 1:
            raise UnknownOutcome("write timeout (injected)")
        raise failure

    with pytest.raises(MaybeApplied) as raised:
        await store._cas(QueueKey("o", "s"), uuid.uuid4(), attempt, lambda lease: True, resend=resend)
    assert not isinstance(raised.value, NotSent)
    assert len(sent) == (2 if resend else 1)


@pytest.mark.parametrize("lwt", [False, True])
def test_an_answer_names_the_drivers_error_type_not_its_text(
    lwt: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver's text names replicas' addresses and server exceptions: it went into every
    tenant's ``unavailable`` answer (the gateway's 503 body, the AMQP reply). The answer names the
    type; the text is logged for the operator (once every 10 s: a fresh throttle here)."""
    from bridge.storage import errors

    monkeypatch.setattr(errors, "_details", {})  # fresh throttles
    exc = cass.CassErrorServerReadFailure("Connection to 10.9.8.7:9042 failed: replica 10.9.8.6 ReadFailure")
    mapped = _storage_error(exc, lwt=lwt)
    assert isinstance(mapped, StorageUnavailable | UnknownOutcome)
    assert "10.9.8" not in mapped.message and "CassErrorServerReadFailure" in mapped.message, mapped.message
    assert "10.9.8.7" in caplog.text  # the operator's copy


async def test_writes_sent_side_by_side_of_which_one_was_refused_unsent_may_have_landed() -> None:
    """An add over the batch size sends its writes side by side: one refused unsent (its
    partition without a quorum) beside a task row that landed was said "not sent", and the stored
    add was neither counted nor hinted (found by the session's re-review, 2026-12-06)."""

    class Db:
        async def execute(self, name: str, params: Any, **kwargs: Any) -> list[dict[str, Any]]:
            if name == "idem.record":
                raise StorageNotSent("cassandra unavailable: Unavailable (injected)")
            return []

    store = CassandraTaskStore(Db(), lambda: 0, 3600)  # type: ignore[arg-type]
    writes = [("ready.insert", ()), ("idem.record", ())]
    with pytest.raises(StorageUnavailable) as raised:
        await store._store("add", writes, batchable=False)
    assert not isinstance(raised.value, NotSent)

    class Refused:
        async def execute(self, name: str, params: Any, **kwargs: Any) -> list[dict[str, Any]]:
            raise StorageNotSent("no host available (injected)")

    store = CassandraTaskStore(Refused(), lambda: 0, 3600)  # type: ignore[arg-type]
    with pytest.raises(StorageNotSent):  # every one of them refused unsent: nothing landed
        await store._store("add", writes, batchable=False)


@pytest.mark.parametrize("last", ["Unavailable", "NoHostAvailable"])
@pytest.mark.parametrize(
    ("earlier", "landed"), [((), False), (("Unavailable",), False), (("ConnectionException",), True)]
)
async def test_a_statement_the_datastax_driver_sent_again_after_a_lost_connection_may_have_landed(
    monkeypatch: pytest.MonkeyPatch, earlier: tuple[str, ...], landed: bool, last: str
) -> None:
    """The driver sends an idempotent statement to the next host after a connection lost under it
    (its first copy may have applied) and reports only the last answer: an Unavailable there was
    said "not sent". Copies answered Unavailable before it were applied nowhere: still not sent."""
    from cassandra import ConsistencyLevel, Unavailable
    from cassandra.connection import ConnectionException

    made = {
        "Unavailable": lambda: Unavailable(
            "i", consistency=ConsistencyLevel.QUORUM, required_replicas=2, alive_replicas=1
        ),
        "ConnectionException": lambda: ConnectionException("lost under it (injected)"),
    }
    errors = {f"host{i}": made[kind]() for i, kind in enumerate(earlier)}
    final: Exception = Unavailable("i", consistency=ConsistencyLevel.QUORUM, required_replicas=2, alive_replicas=1)
    errors["last"] = final
    if last == "NoHostAvailable":  # the driver ran out of hosts after them (found by review, 2026-12-07)
        from cassandra.cluster import NoHostAvailable

        final = NoHostAvailable("no host left (injected)", dict(errors))
    # The hosts it was written to: every one above (a copy lost under a connection was sent).
    session = _datastax_answering(monkeypatch, final, errors, attempted=list(errors))
    with pytest.raises(StorageUnavailable) as raised:
        await session._run(object(), lwt=False)
    assert isinstance(raised.value, NotSent) is not landed


def _datastax_answering(
    monkeypatch: pytest.MonkeyPatch, final: Exception, errors: dict[str, Any], *, attempted: list[str]
) -> Any:
    """A cassandra-driver session whose request fails with ``final``, the driver's per-host record
    of it being ``errors`` (``_errors``) and the hosts it was written to ``attempted``."""
    from bridge.storage import cassandra as datastax
    from bridge.storage.stall import StallWatch

    future = type("ResponseFuture", (), {"_errors": errors, "attempted_hosts": attempted})()

    class Session:
        def execute_async(self, bound: Any, **kwargs: Any) -> Any:
            return future

    async def to_asyncio(rf: Any, loop: Any) -> Any:
        raise final

    monkeypatch.setattr(datastax, "_to_asyncio", to_asyncio)
    session = datastax.CassandraSession.__new__(datastax.CassandraSession)
    session._session = Session()  # type: ignore[assignment]
    session.stall = StallWatch(10.0)
    return session


async def test_hosts_the_datastax_driver_never_wrote_to_are_not_copies_that_may_have_landed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The driver records hosts it moved past without sending (all connections busy, a pool shut
    down, a host marked down) beside those it sent to: taken for copies sent, "no host available"
    made of them only was "may have landed" (found by the re-review, 2026-12-07)."""
    from cassandra.cluster import NoHostAvailable
    from cassandra.connection import ConnectionBusy, ConnectionException
    from cassandra.pool import NoConnectionsAvailable

    errors: dict[str, Any] = {
        "a": NoConnectionsAvailable(),
        "b": ConnectionBusy("busy"),
        "c": ConnectionException("Host has been marked down or removed"),
    }
    final = NoHostAvailable("no host left (injected)", dict(errors))
    session = _datastax_answering(monkeypatch, final, errors, attempted=[])
    with pytest.raises(StorageNotSent):
        await session._run(object(), lwt=False)


def test_a_counter_update_answered_unavailable_was_not_sent_and_its_timeout_is_unknown() -> None:
    """A counter update must not be sent twice (not idempotent), but one refused Unavailable was
    applied nowhere: its coordinator checks the live replicas before it forwards it to the leader
    replica, which checks again before it applies it. Both drivers took it for an unknown outcome,
    and the counts' flush dropped every delta of a queue whose counter replicas were down: stats
    said 0 ready over a backlog for days (found by review, 2026-12-07). Kept for the next flush
    now; a timeout (it may have applied) is still unknown, and a compare-and-set's refusal too."""
    from cassandra import ConsistencyLevel, Unavailable, WriteTimeout

    from bridge.storage.cassandra import storage_error

    refused = Unavailable("injected", consistency=ConsistencyLevel.QUORUM, required_replicas=2, alive_replicas=1)
    assert isinstance(storage_error(refused, lwt=True, conditional=False), StorageNotSent)
    assert isinstance(storage_error(refused, lwt=True, conditional=True), UnknownOutcome)
    timed_out = WriteTimeout("injected", consistency=ConsistencyLevel.QUORUM, required_responses=2, write_type=3)
    assert isinstance(storage_error(timed_out, lwt=True, conditional=False), UnknownOutcome)
    unavailable = cass.CassErrorServerUnavailable("injected")
    assert isinstance(_storage_error(unavailable, lwt=True, conditional=False), StorageNotSent)
    assert isinstance(_storage_error(unavailable, lwt=True, conditional=True), UnknownOutcome)
    for maybe in (cass.CassErrorServerOverloaded("injected"), cass.CassErrorServerWriteTimeout("injected")):
        assert isinstance(_storage_error(maybe, lwt=True, conditional=False), UnknownOutcome)


def test_the_counter_updates_are_the_statements_sent_once_that_are_not_compare_and_sets() -> None:
    """What the drivers' adapters take for a compare-and-set (``IF`` in its CQL) and what for a
    statement sent once only (not idempotent): the counter updates are the second, not the first."""
    from bridge.storage.statements import STATEMENTS

    once_not_cas = {name for name, (cql, idempotent) in STATEMENTS.items() if not idempotent and " IF " not in cql}
    assert once_not_cas == {"counts.add", "delayed.add"}


def test_a_missing_keyspace_or_table_is_an_outage_not_invalid_cql() -> None:
    """A `DROP KEYSPACE` by mistake: cassandra-driver's adapter raised the refusal as it was (a
    bug: ``internal``) and every add was dead-lettered; acsylla's as ``InvalidQuery``. Both say
    ``SchemaMissing`` now (an outage: not sent), and any other refusal of the CQL stays a bug."""
    from cassandra import InvalidRequest

    from bridge.storage.cassandra import storage_error
    from bridge.storage.errors import InvalidQuery, SchemaMissing

    for text in ("unconfigured table leases", "Keyspace qb does not exist", "table qb.leases does not exist"):
        assert isinstance(storage_error(InvalidRequest(text), lwt=True), SchemaMissing), text
        assert isinstance(_storage_error(cass.CassErrorServerInvalidQuery(text), lwt=False), SchemaMissing), text
    assert storage_error(InvalidRequest("Undefined column name nope"), lwt=False) is None
    assert isinstance(_storage_error(cass.CassErrorServerInvalidQuery("line 1:7 no viable"), lwt=False), InvalidQuery)
    assert issubclass(SchemaMissing, StorageNotSent)


def test_an_unauthorized_statement_is_not_sent_on_both_drivers() -> None:
    """While the replicas of `system_auth` are out of reach, Cassandra refuses every statement as
    Unauthorized ("Unable to perform authorization of permissions"). Taken for an invalid query
    (`internal`), every add of the fleet was dead-lettered and every request failed for good
    (found by review, 2026-12-07). The authorizer refuses before anything is applied: not sent,
    retried as an outage is."""
    from cassandra import Unauthorized

    from bridge.storage.cassandra import storage_error

    text = "Unable to perform authorization of permissions: Cannot achieve consistency level LOCAL_ONE"
    for lwt in (False, True):
        assert isinstance(_storage_error(cass.CassErrorServerUnauthorized(text), lwt=lwt), StorageNotSent)
        assert isinstance(storage_error(Unauthorized(text), lwt=lwt), StorageNotSent)


def test_a_missing_keyspace_is_not_described_to_the_tenants() -> None:
    """Every tenant's reply carried the driver's words (keyspace and table names) while the schema
    was missing; the operator reads them in the log (found by review, 2026-12-07)."""
    from cassandra import InvalidRequest

    from bridge.storage.cassandra import storage_error
    from bridge.storage.errors import SchemaMissing

    text = "Keyspace 'tenant_queue_ks' does not exist"
    for err in (
        _storage_error(cass.CassErrorServerInvalidQuery(text), lwt=False),
        storage_error(InvalidRequest(text), lwt=False),
    ):
        assert isinstance(err, SchemaMissing)
        assert "tenant_queue_ks" not in str(err)


def test_a_rare_storage_error_is_logged_beside_a_storm_of_another(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One throttle for every driver error text: in a storm of write timeouts, a rare error of
    another kind (a read over too many tombstones, naming its table) was never the first of a
    window, and never logged (found by review, 2026-12-07)."""
    import logging

    from bridge.storage import errors
    from bridge.storage.errors import kind_of

    monkeypatch.setattr(errors, "_details", {})  # fresh throttles

    class WriteTimeoutStorm(Exception):
        pass

    class ReadFailure(Exception):
        pass

    caplog.set_level(logging.WARNING, logger="bridge.storage")
    for _ in range(100):
        kind_of(WriteTimeoutStorm("coordinator timed out"))
    kind_of(ReadFailure("too many tombstones in table parked"))
    said = [r.getMessage() for r in caplog.records]
    assert any("too many tombstones in table parked" in line for line in said), said
    assert sum("coordinator timed out" in line for line in said) == 1


async def test_a_schema_change_the_role_may_not_make_stays_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Statements refused as not authorized are an outage (not sent); a schema change is not:
    retried as "Cassandra cannot be reached at start", a role without ALTER crash-looped for
    BRIDGE_START_TIMEOUT with the reason in a throttled line (the re-review, 2026-12-07)."""
    from cassandra import Unauthorized

    from bridge.config import load_settings
    from bridge.storage.cassandra import CassandraSession
    from bridge.storage.errors import InvalidQuery, not_authorized

    session = CassandraSession(load_settings(_env_file=None))

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise not_authorized(Unauthorized("User bridge has no ALTER permission on <table ks.leases>"))

    monkeypatch.setattr(session, "_run", refused)
    with pytest.raises(InvalidQuery, match="not authorized"):
        await session.execute_raw("ALTER TABLE {ks}.leases ADD x int")
