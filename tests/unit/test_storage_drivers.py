"""What the two session adapters ask of their drivers, and how their start-time errors reach the start.

No Cassandra: each driver's cluster factory (or its session) is replaced by a recorder, so the
arguments the adapter passes, and the errors it lets out, are pinned here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import acsylla
import pytest
from acsylla import errors as cass
from cassandra import OperationTimedOut, ReadTimeout, Unavailable, WriteTimeout
from cassandra.cluster import EXEC_PROFILE_DEFAULT, NoHostAvailable
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

import bridge.app
from bridge.app import Bridge, _storage_unreachable
from bridge.config import ConfigError, Settings, load_settings
from bridge.crypto import generate_keyring, write_keyring
from bridge.storage import cassandra as datastax
from bridge.storage.acsylla_session import AcsyllaSession
from bridge.storage.cassandra import CassandraSession

pytestmark = pytest.mark.anyio


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    keyring = tmp_path / "keyring.json"
    if not keyring.exists():
        write_keyring(keyring, generate_keyring(["worker-a"]))
    return load_settings(_env_file=None, keyring=keyring, http_port=0, **overrides)


async def _acsylla_cluster_arguments(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> dict[str, Any]:
    captured: dict[str, Any] = {}

    class Cluster:
        async def create_session(self) -> object:
            return object()

    def create_cluster(contact_points: list[str], **kwargs: Any) -> Cluster:
        captured.update(kwargs, contact_points=contact_points)
        return Cluster()

    monkeypatch.setattr(acsylla, "create_cluster", create_cluster)
    await AcsyllaSession(settings).connect()
    return captured


def _datastax_cluster_arguments(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> dict[str, Any]:
    captured: dict[str, Any] = {}

    class Cluster:
        def __init__(self, **kwargs: Any) -> None:
            captured.update(kwargs)

        def connect(self) -> object:
            return object()

    monkeypatch.setattr(datastax, "Cluster", Cluster)
    CassandraSession(settings)._connect_blocking()
    return captured


# -- routing (multi-DC) ----------------------------------------------------------------------------


@pytest.mark.parametrize("local_dc", [None, "dc2"])
async def test_acsylla_routes_to_the_local_dc_token_aware(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, local_dc: str | None
) -> None:
    """LOCAL_QUORUM counts the replicas of the coordinator's DC. With BRIDGE_CASSANDRA_LOCAL_DC
    unset the adapter asked for round robin over every node of every DC: a write coordinated in
    DC2 and a read coordinated in DC1 did not overlap, and a DC holding no replica answered
    Unavailable. Unset, the driver's own DC-aware default (the DC of the first contact point it
    reaches) must be left in place; set, it names the DC."""
    kwargs = await _acsylla_cluster_arguments(monkeypatch, _settings(tmp_path, cassandra_local_dc=local_dc))
    assert not kwargs.get("load_balance_round_robin"), kwargs
    assert kwargs.get("load_balance_dc_aware") == local_dc
    assert kwargs["token_aware_routing"] is True


@pytest.mark.parametrize("local_dc", [None, "dc2"])
def test_datastax_routes_to_the_local_dc_token_aware(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, local_dc: str | None
) -> None:
    """As for acsylla: unset, TokenAwarePolicy(RoundRobinPolicy()) spread requests over every DC.
    DCAwareRoundRobinPolicy without a DC takes the DC of the contact points (the driver's default)."""
    kwargs = _datastax_cluster_arguments(monkeypatch, _settings(tmp_path, cassandra_local_dc=local_dc))
    policy = kwargs["execution_profiles"][EXEC_PROFILE_DEFAULT].load_balancing_policy
    assert isinstance(policy, TokenAwarePolicy)
    child = policy._child_policy
    assert isinstance(child, DCAwareRoundRobinPolicy), child
    assert child.local_dc == (local_dc or "")  # empty: inferred from the contact points at connect
    assert child.used_hosts_per_remote_dc == 0  # never a coordinator in another DC


# -- dead connections ------------------------------------------------------------------------------


async def test_acsylla_heartbeats_a_quiet_connection_every_20_s_and_drops_a_silent_one_at_30_s(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """docs/storage.md ("The CQL driver"): a heartbeat once a connection wrote nothing for 20 s, and
    a connection that read nothing for 30 s is closed. acsylla's own idle timeout is 60 s (a dead
    connection held its requests twice as long); a 10 s interval cost an idle fleet of 32
    bridges 6.4 of its 12.8 requests a second (docs/performance.md)."""
    kwargs = await _acsylla_cluster_arguments(monkeypatch, _settings(tmp_path))
    assert (kwargs["heartbeat_interval_sec"], kwargs["idle_timeout_sec"]) == (20, 30)


def test_datastax_gives_a_heartbeat_the_rest_of_the_idle_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kwargs = _datastax_cluster_arguments(monkeypatch, _settings(tmp_path))
    assert (kwargs["idle_heartbeat_interval"], kwargs["idle_heartbeat_timeout"]) == (20, 10)


@pytest.mark.parametrize(("interval", "idle"), [(30, 30), (29, 30), (21, 30), (10, 5)])
def test_a_heartbeat_interval_above_two_thirds_of_the_idle_timeout_is_refused(
    tmp_path: Path, interval: int, idle: int
) -> None:
    """A quiet connection reads nothing but its heartbeats' answers: at the timeout or near it,
    every one would be closed, or closed for an answer a second late (cassandra-driver)."""
    with pytest.raises(ConfigError, match="BRIDGE_CASSANDRA_HEARTBEAT_INTERVAL"):
        _settings(tmp_path, cassandra_heartbeat_interval=interval, cassandra_idle_timeout=idle)


def test_an_idle_timeout_past_two_minutes_is_refused(tmp_path: Path) -> None:
    """A decision held on a stuck connection may land until the connection is closed; the result
    relay waits 5 minutes for one (``DECISION_IN_FLIGHT_MS``), then voids its result for good."""
    with pytest.raises(ConfigError, match="BRIDGE_CASSANDRA_IDLE_TIMEOUT"):
        _settings(tmp_path, cassandra_heartbeat_interval=20, cassandra_idle_timeout=600)
    assert (
        _settings(tmp_path, cassandra_heartbeat_interval=80, cassandra_idle_timeout=120).cassandra_idle_timeout == 120
    )


# -- start-time errors ---------------------------------------------------------------------------


async def _start_tries(bridge: Bridge, attempt: Any) -> None:
    """The start's retry helper, as ``Bridge.start`` runs it for Cassandra, without waiting."""
    import asyncio

    bridge._start_gives_up = asyncio.get_running_loop().time() + 60
    await bridge._until_reachable("Cassandra", attempt, _storage_unreachable())


class _AcsyllaPreparesFailingOnce:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    async def create_prepared(self, cql: str) -> object:
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return object()


@pytest.mark.parametrize(
    "error", [cass.CassErrorLibRequestTimedOut("injected"), cass.CassErrorLibNoHostsAvailable("injected")]
)
async def test_acsylla_a_prepare_that_times_out_at_start_is_tried_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception
) -> None:
    """A node going down as the bridge prepared its statements: prepare() mapped only invalid CQL,
    the driver's timeout came out raw, not among the start's retried errors, and the start
    exited 1 with a traceback however long BRIDGE_START_TIMEOUT was."""
    monkeypatch.setattr(bridge.app, "START_RETRY_FIRST_S", 0.0)  # no waiting between tries here
    b = Bridge(_settings(tmp_path, start_timeout=60))
    assert isinstance(b.db, AcsyllaSession)
    driver = _AcsyllaPreparesFailingOnce(error)
    b.db._session = driver
    await _start_tries(b, b.store.prepare)
    assert driver.calls > 1


class _DatastaxAnswer:
    """A ResponseFuture that has already failed (or answered no rows)."""

    has_more_pages = False

    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def add_callbacks(self, on_ok: Any, on_err: Any) -> None:
        if self.error is not None:
            on_err(self.error)
        else:
            on_ok(None)


class _DatastaxFailingOnce:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def execute_async(self, query: Any, *args: Any, **kwargs: Any) -> _DatastaxAnswer:
        self.calls += 1
        return _DatastaxAnswer(self.error if self.calls == 1 else None)

    def prepare(self, cql: str) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise self.error

        class Prepared:
            is_idempotent = True

        return Prepared()


_DATASTAX_ERRORS = [
    WriteTimeout("injected", consistency=6, required_responses=2, received_responses=1, write_type=0),
    ReadTimeout("injected", consistency=6, required_responses=2, received_responses=1),
    Unavailable("injected", consistency=6, required_replicas=2, alive_replicas=1),
    OperationTimedOut("injected"),
    NoHostAvailable("injected", {}),
]


@pytest.mark.parametrize(
    "cql", ["CREATE TABLE IF NOT EXISTS {ks}.t (k int PRIMARY KEY)", "ALTER TABLE {ks}.t ADD c int"]
)
@pytest.mark.parametrize("error", _DATASTAX_ERRORS, ids=lambda e: type(e).__name__)
async def test_datastax_a_schema_statement_that_fails_at_start_is_tried_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception, cql: str
) -> None:
    """execute_raw (the schema step) mapped only invalid CQL: a WriteTimeout, Unavailable or
    ReadTimeout of a schema statement (a node restarting as a fleet starts) came out raw and ended
    the start (exit 1) although BRIDGE_START_TIMEOUT said to keep trying."""
    monkeypatch.setattr(bridge.app, "START_RETRY_FIRST_S", 0.0)
    b = Bridge(_settings(tmp_path, start_timeout=60, cassandra_driver="datastax"))
    assert isinstance(b.db, CassandraSession)
    driver = _DatastaxFailingOnce(error)
    b.db._session = driver  # type: ignore[assignment]
    await _start_tries(b, lambda: b.db.execute_raw(cql))
    assert driver.calls == 2


@pytest.mark.parametrize("error", _DATASTAX_ERRORS[3:], ids=lambda e: type(e).__name__)
async def test_datastax_a_prepare_that_fails_at_start_is_tried_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception
) -> None:
    monkeypatch.setattr(bridge.app, "START_RETRY_FIRST_S", 0.0)
    b = Bridge(_settings(tmp_path, start_timeout=60, cassandra_driver="datastax"))
    driver = _DatastaxFailingOnce(error)
    b.db._session = driver  # type: ignore[attr-defined]
    await _start_tries(b, lambda: b.db.prepare("ping", "SELECT now() FROM system.local", idempotent=True))
    assert driver.calls == 2
