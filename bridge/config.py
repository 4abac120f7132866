"""Settings: one object, read from ``BRIDGE_*`` environment variables (and an optional ``.env`` file).

Invalid configuration fails at start with a message that names the variable, because
pydantic-settings reports the field and we map the field back to its variable name.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bridge.errors import BridgeError
from bridge.transport.addresses import node_urls, parse_host, without_password, without_secrets

ENV_PREFIX = "BRIDGE_"
# Both Cassandra drivers wait this long before their first reconnection attempt, doubling up to
# BRIDGE_CASSANDRA_RECONNECT_MAX_DELAY; each refuses a longest wait below it.
CASSANDRA_RECONNECT_BASE_DELAY_S = 0.2
# One order of BRIDGE_AMQP_HOSTS per process (every connection of a bridge starts on the same node),
# another in the next process (a fleet spreads over the nodes).
_NODE_ORDER_SEED = int.from_bytes(os.urandom(8), "big")


class ConfigError(BridgeError):
    """Raised with a human-readable message naming the offending ``BRIDGE_*`` variable(s)."""

    code = "config"


def _split_csv(value: Any) -> Any:
    """Comma separated, or a JSON list of strings (pydantic-settings' own list format: read as
    comma separated, '["engine","engine-2"]' was the users '["engine"' and '"engine-2"]')."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    form = 'must be comma separated (a, b) or a JSON list of strings (["a", "b"])'
    try:
        parsed = json.loads(text) if text.startswith(("[", '"')) else None
    except ValueError:
        parsed = None  # not JSON: "[::1]:5672" is a host
    if parsed is not None:
        if not isinstance(parsed, list) or not all(isinstance(part, str) for part in parsed):
            raise ValueError(form)
        return [part.strip() for part in parsed if part.strip()]
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if any('"' in part for part in parts):
        raise ValueError(form)  # a JSON list gone wrong, not names
    return parts


UNENCODED_USERINFO = (
    "has a user or password with '/', '?', '#' or '@' in it as is, or an '@' in its vhost: percent-encode "
    "them (%2F, %3F, %23, %40)"
)


def password_unencoded(url: str) -> bool:
    """Whether an AMQP URL may hold a user or password with a character that ends the URL's host
    part (``/``, ``?``, ``#``) or an ``@``, unencoded. Such a URL still parses, as another host
    and vhost (``amqp://ops:4711#x@rabbit/`` is host ``ops``, port 4711; ``amqp://u:Xy@k9/Qr@rabbit/``
    is host ``k9``, vhost ``Qr@rabbit/``), and part of the password then shows in every message
    that names the host or the vhost. Told by an ``@`` where none can be: a second one in the host
    part, or one in the vhost or the fragment. An ``@`` in a query value (``?name=bridge@pod``)
    is taken; one in a vhost must be written ``%40``."""
    rest = url.partition("://")[2]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    host_part, tail = rest[:end], rest[end:]
    if host_part.count("@") > 1:
        return True
    path, _, after_path = tail.partition("?")
    query, _, fragment = after_path.partition("#")
    if "@" in path or "@" in fragment:
        return True
    # A query parameter whose name (or the whole of it, without a value) holds the '@': the rest
    # of a password ("amqp://u:4711?b@rabbit/"), not a value such as "name=bridge@pod-7".
    return any("@" in param.partition("=")[0] for param in query.split("&"))


def _amqp_tls_files_readable(query: str) -> None:
    """The TLS files an AMQP URL names (``cafile``, ``certfile``, ``keyfile``; ``capath`` a
    directory), checked at load: aiormq opens them at each connect, where a missing one raised a
    FileNotFoundError naming no file, taken for RabbitMQ out of reach and retried until the start
    timed out (exit 1; in a pod whose optional TLS Secret was not there, a crash loop)."""
    from urllib.parse import parse_qs

    # As aiormq reads them: the first value of each; the key file only with a certificate.
    given = {name: values[0] for name, values in parse_qs(query).items()}
    if "certfile" not in given:
        given.pop("keyfile", None)
    for name, value in given.items():
        if name not in ("cafile", "certfile", "keyfile", "capath"):
            continue
        path = Path(value)
        if name == "capath":
            if not (path.is_dir() and os.access(path, os.R_OK | os.X_OK)):
                raise ValueError(f"?capath= names no readable directory: {value}")
        elif not (path.is_file() and os.access(path, os.R_OK)):
            reason = "not a file" if path.exists() else "no readable file"
            raise ValueError(f"?{name}= names {reason}: {value}")


# A delivery limit (BRIDGE_MAX_DELIVERIES, and each of BRIDGE_SERVICE_MAX_DELIVERIES).
DeliveryLimit = Annotated[int, Field(ge=1, le=1000)]


class _KeyTwice(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` keeps the last of a key given twice, silently: ``{"reports": 5, "reports":
    {"daily": 3}}`` dropped the limit of every owner's service ``reports`` (found by review)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _KeyTwice(f"key {key!r} is given twice (JSON would keep only the last)")
        seen[key] = value
    return seen


_LIMIT: TypeAdapter[int] = TypeAdapter(DeliveryLimit)


def _limit_error(value: Any) -> str | None:
    """Why ``value`` is not a delivery limit, or None. As pydantic reads the field (``"3"`` and
    ``3.0`` are 3, as before), but ``true`` is not 1."""
    if isinstance(value, bool):
        return "true or false is not a delivery limit"
    try:
        _LIMIT.validate_python(value)
    except ValidationError:
        return f"{value!r} is not a delivery limit (an integer from 1 to 1000)"
    return None


def _check_delivery_limits(limits: dict[str, Any]) -> None:
    """One message naming the key at fault (pydantic's union names neither, and says it twice),
    and keys that can name no queue refused (an unset template variable renders ``{"": 3}``)."""
    for key, value in limits.items():
        # Only the empty key: a service or an owner id may begin or end with "/" ("/daily" is the
        # service of that name, an owner's map names any owner exactly).
        if not key:
            raise ValueError("the key '' names no queue (a service, owner/service, or an owner with a map)")
        if isinstance(value, dict):
            for service, limit in value.items():
                why = "an empty service names no queue" if not service else _limit_error(limit)
                if why:
                    raise ValueError(f"{key!r}: {{{service!r}: {limit!r}}}: {why}")
        elif (why := _limit_error(value)) is not None:
            raise ValueError(f'{key!r}: {why}, nor an owner\'s map ({{"service": n}})')


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        # ``inf`` passed every ``gt=0`` and the start crashed on it (``int(inf * 1000)``), exit 1
        # instead of a configuration error naming the variable.
        allow_inf_nan=False,
    )

    # --- transport -------------------------------------------------------------------------
    amqp_url: SecretStr = Field(SecretStr("amqp://guest:guest@127.0.0.1:5672/"), description="RabbitMQ connection URL.")
    amqp_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "The nodes of a RabbitMQ cluster (comma separated host[:port]) to connect to with "
            "BRIDGE_AMQP_URL's user, vhost and options instead of its host: tried in an order "
            "shuffled per process, moving to the next node when one is lost or out of reach."
        ),
    )
    amqp_connect_timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description=(
            "Seconds one RabbitMQ node has to accept a connection (TCP, TLS and the AMQP handshake), at "
            "start and at each reconnection, before the next node is tried: a node that accepts TCP and "
            "never answers (a load balancer with no backend, a stuck node) held the bridge for ever."
        ),
    )
    exchange: str = Field("queue-bridge", min_length=1, description="Direct exchange for add/fetch/ack.")
    results_exchange: str = Field(
        "queue-bridge.results",
        min_length=1,
        description="Topic exchange for results (routing key = serviceId).",
    )
    results_queue: str | None = Field(
        "queue-bridge.results",
        description="Durable queue bound to the results exchange ('#') for the engine; empty: declare none.",
    )
    queue_prefix: str = Field("queue-bridge", min_length=1, description="Prefix of the bridge's queue names.")
    queue_type: Literal["classic", "quorum"] = Field(
        "classic",
        description=(
            "Type of the bridge's durable queues (requests, add retry lane, dead letters, results, duty): "
            "quorum replicates them across a RabbitMQ cluster. Hint queues stay classic. A queue keeps the "
            "type it was declared with."
        ),
    )
    trusted_users: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["engine"],
        description="AMQP users (comma separated) allowed to name the owner in the x-owner header.",
    )
    prefetch: int = Field(64, ge=1, le=10_000, description="AMQP prefetch per consumer.")
    max_waiting_fetches: int = Field(
        1_000,
        ge=0,
        le=100_000,
        description="Long-poll fetches a bridge lets wait outside the prefetch window (their deliveries "
        "acknowledged at once); past it a waiting fetch keeps its delivery, and so its slot, until answered.",
    )
    max_value_bytes: int = Field(
        1_048_576,
        ge=1,
        description="Largest accepted task value (or ack result), as JSON bytes; request bodies may be 64 KiB larger.",
    )
    broker_max_message_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="RabbitMQ's max_message_size (4.x's default, 16 MiB): a result the bridge sends carries a token "
        "and a result of up to BRIDGE_MAX_VALUE_BYTES each, so the bridge refuses to start when 2 x that + 128 KiB "
        "does not fit (the broker would refuse the result and close the results channel, at every retry).",
    )

    dead_letter_max_length: int = Field(
        100_000, ge=1, description="Most messages kept in the dead-letter queue (the oldest are dropped beyond)."
    )
    dead_letter_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="Most bytes kept in the dead-letter queue (the oldest dropped beyond)."
    )

    # --- storage ---------------------------------------------------------------------------
    cassandra_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1"], description="Cassandra contact points (comma separated)."
    )
    cassandra_port: int = Field(9042, ge=1, le=65535)
    cassandra_keyspace: str = Field("queue_bridge", pattern=r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
    cassandra_replication: str = Field(
        "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        description="Replication map used when the bridge creates its keyspace.",
    )
    schema_mode: Literal["create", "verify"] = Field(
        "create",
        description="create: a bridge that finds tables or columns missing creates them (DDL at start only then). "
        "verify: it never runs DDL; it waits (under BRIDGE_START_TIMEOUT) for `queue-bridge schema`, run once.",
    )
    cassandra_local_dc: str | None = Field(None, description="Local data centre for the load balancing policy.")
    cassandra_username: str | None = None
    cassandra_password: SecretStr | None = None
    cassandra_driver: Literal["acsylla", "datastax"] = Field(
        "acsylla",
        description="CQL driver: acsylla (C++ driver, asyncio-native) or datastax (cassandra-driver, pure Python).",
    )
    cassandra_consistency: Literal["LOCAL_QUORUM", "QUORUM"] = Field(
        "LOCAL_QUORUM", description="Reads, plain writes and the LWT commit: a quorum, so that reads see writes."
    )
    cassandra_serial_consistency: Literal["SERIAL", "LOCAL_SERIAL"] = "SERIAL"
    cassandra_timeout: float = Field(5.0, gt=0, description="Per-request timeout in seconds.")
    cassandra_tls: bool = Field(False, description="Connect to Cassandra over TLS (implied by a TLS file below).")
    cassandra_tls_ca_file: Path | None = Field(
        None, description="CA bundle that signed the Cassandra nodes' certificates (default: the system's)."
    )
    cassandra_tls_cert_file: Path | None = Field(None, description="Client certificate, for mutual TLS.")
    cassandra_tls_key_file: Path | None = Field(None, description="Client private key, for mutual TLS.")
    cassandra_reconnect_max_delay: float = Field(
        2.0, le=600, description="Longest wait between reconnection attempts to a Cassandra node, seconds."
    )
    # An idle connection sends a heartbeat (an OPTIONS request) this long after its last write, and
    # a connection that has read nothing for the idle timeout is closed and its requests failed.
    # The interval is a fleet's cost (two connections a bridge: 100 bridges at 10 s sent 20
    # requests a second doing nothing); detection rests on the idle timeout, not on it.
    cassandra_heartbeat_interval: int = Field(
        20, ge=1, le=80, description="Seconds of no writes on a Cassandra connection before a heartbeat."
    )
    # At most 2 minutes: a decision (an ack's compare-and-set) held on a stuck connection may land
    # until that connection is closed, and the result relay waits 5 minutes for one to land
    # (``relay.DECISION_IN_FLIGHT_MS``); cassandra-driver closes it up to timeout + interval late.
    cassandra_idle_timeout: int = Field(
        30, ge=3, le=120, description="Seconds a Cassandra connection may read nothing before it is closed."
    )

    # --- keys ------------------------------------------------------------------------------
    keyring: Path | None = Field(None, description="Key-ring JSON file (owner -> keys).")
    key_server_url: str | None = Field(None, description="HTTP key server base URL (instead of a key-ring).")
    key_server_token: SecretStr | None = None
    key_server_allow_plain_http: bool = Field(
        False,
        description="Allow BRIDGE_KEY_SERVER_URL http:// to a host not on loopback (only where the network encrypts).",
    )
    key_server_timeout: float = Field(2.0, gt=0, le=60, description="Per-request timeout of the key server, seconds.")
    key_cache_seconds: float = Field(300.0, gt=0)
    key_cache_size: int = Field(1024, ge=1)
    # A key past the cache's age is still served while the key source cannot answer, for this long
    # past it (stale-if-error): never when the source answers (a revoked key, an unknown owner).
    key_stale_if_error_seconds: float = Field(3600.0, ge=0)

    # --- queue semantics -------------------------------------------------------------------
    task_ttl: timedelta = Field(timedelta(days=7), description="Lifetime of a task (ISO 8601 or seconds).")
    default_time_to_recover_ms: int = Field(60_000, ge=100)
    max_time_to_recover_ms: int = Field(12 * 3600 * 1000, ge=1000)
    scheduler_interval: float = Field(0.1, gt=0, le=5, description="Recovery scheduler tick, seconds.")
    clock_source: Literal["cassandra", "host"] = Field(
        "cassandra",
        description="Whose time the bridge keeps: 'cassandra' (Cassandra's clock, measured every "
        "BRIDGE_CLOCK_CHECK_INTERVAL and carried in between by this host's monotonic clock: the host's "
        "wall clock plays no part) or 'host' (the host's clock, checked against Cassandra's). One value "
        "for the whole fleet.",
    )
    clock_skew_margin: float = Field(
        0.025,
        # A bridge refuses leases while its clock may be more than half of it off, and its
        # measured uncertainty is never below about 0.5 ms plus half a round trip: below 2 ms no
        # bridge would ever grant a lease (it started, and never served a fetch).
        ge=0.002,
        le=60,
        description="Bound on the difference between any two bridges' clocks, seconds; one value for the "
        "whole fleet. A lease is taken back only this long after its deadline; a bridge whose clock may be "
        "more than half of it off Cassandra's (its measured uncertainty with 'cassandra', its offset with "
        "'host') refuses leases.",
    )
    clock_check_interval: float = Field(
        30.0, gt=0, le=3600, description="How often the bridge measures its clock against Cassandra's, seconds."
    )
    clock_offset_ms: int = Field(
        0, description="Shifts this bridge's clock (fault drills that play a skewed host only; never in production)."
    )
    max_queues_in_memory: int = Field(
        10_000,
        ge=10,
        description="Queues whose scan positions a bridge caches (two lanes a queue, about 3 kB a lane); the "
        "least recently used beyond this are forgotten and re-read from Cassandra when needed. Also bounds the "
        "hint queues kept declared and the queues' sweep times.",
    )
    result_republish_after: float = Field(
        10.0,
        gt=0,
        # An outbox row lives the task's remaining life plus a day, as little as a day: read later
        # than that, a result whose first publish failed was never sent again nor reported.
        le=3600,
        description="A result still unpublished this many seconds after its 10 s outbox bucket ends is re-published "
        "(at most an hour).",
    )
    hints: bool = Field(
        True,
        description="Dispatch by hints on RabbitMQ (each task handed to one fetch of the fleet; long-poll "
        "waits for them). Off: every fetch scans Cassandra's ready index, as before 1.2.",
    )
    hint_grace: float = Field(
        3.0, ge=0, le=600, description="A task without a claim this long after its hint is due is found by a scan."
    )
    read_unmarked_expiries: bool = Field(
        False,
        description="Read every expiry bucket, marked or not: for a rolling upgrade from 1.1 (whose bridges "
        "file deadlines without marks), until the last 1.1 bridge has been gone for the longest lease.",
    )
    read_unsharded: bool = Field(
        False,
        description="Also read the unsharded expiry and outbox tables of bridges before 1.3: for a rolling "
        "upgrade from 1.2, until the last 1.2 bridge has been gone for the longest lease and its "
        "pending results are published (BRIDGE_READ_UNMARKED_EXPIRIES implies it).",
    )
    # --- worker lifecycle (1.4) ------------------------------------------------------------
    max_deliveries: int = Field(
        10,
        ge=1,
        le=1000,
        description="Delivery limit: a task delivered this often without an ack (or failed at it) is parked.",
    )
    service_max_deliveries: Annotated[dict[str, DeliveryLimit | dict[str, DeliveryLimit]], NoDecode] = Field(
        default_factory=dict,
        description='Delivery limits per service, JSON: {"service": n}, {"owner/service": n}, or {"owner": '
        '{"service": n}} (exact, for ids holding "/"; it wins, then owner/service, then service).',
    )
    retry_base_ms: int = Field(
        1_000, ge=0, description="fail without retryInMs: backoff base (full jitter, doubling per delivery), ms."
    )
    retry_cap_ms: int = Field(300_000, ge=0, description="fail without retryInMs: longest backoff, ms.")
    stats_interval: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="How often the duty bridge refreshes the per-queue gauges, seconds (0: no gauges). Each "
        "refresh reads 3 statements per queue, plus up to 3 small ones per lane (2 lanes) looking for the "
        "oldest ready task, whatever the counts say.",
    )
    redrive_rate: float = Field(
        50.0, gt=0, le=10_000, description="Parked tasks put back per second per queue by this bridge's redrives."
    )
    key_missing_park_after_seconds: float = Field(
        7200.0,
        ge=0,
        le=30 * 24 * 3600,
        description="A task claimed for this long, every claim finding the key it was sealed with missing (not "
        "a key lookup that failed, and none handing it out), is parked at the next such claim (reason "
        "key_missing; at least 3 such claims; the waits between them double from its lease, a minute at most, "
        "up to 64 times that) instead of offered again. Its engine is not told: its token is sealed with that "
        "key. 0: never parked (offered again until its TTL).",
    )
    reconcile_interval: float = Field(
        30.0,
        ge=0,
        le=600,
        description="After a scan of a queue found nothing, a bridge scans it again after this (at once after "
        "a broker reconnect or a failed hint publish).",
    )

    # --- operations ------------------------------------------------------------------------
    # Health and metrics for the pod network; no secrets served.
    http_host: str = "0.0.0.0"  # nosec B104
    http_port: int = Field(8080, ge=0, le=65535, description="Health and metrics port (0 disables).")
    http_read_timeout: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Both HTTP servers (ops, gateway): a connection whose request does not arrive within this "
        "(idle, or sent a byte at a time) is closed; a request body not received within it is refused (408).",
    )
    shutdown_grace: float = Field(10.0, ge=0)
    start_timeout: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="At start, how long to keep trying a Cassandra or RabbitMQ that cannot be reached or refuses "
        "the bridge, 1 s doubling to 15 s between tries (0: exit at once, code 1). Liveness answers meanwhile.",
    )
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    instance_id: str | None = Field(None, description="Name of this bridge instance in logs and metrics.")

    # --- HTTP gateway (issue 11): the AMQP contract over HTTP, opt-in ---------------------------
    gateway_port: int = Field(0, ge=0, le=65535, description="HTTP gateway port (0: no gateway).")
    gateway_host: str = Field("127.0.0.1", description="HTTP gateway listen address.")
    gateway_keys_file: Path | None = Field(
        None, description="The gateway's API keys: a JSON list of {id, owner, sha256, trusted} (hashed secrets)."
    )
    gateway_max_in_flight_per_key: int = Field(
        256,
        ge=1,
        description="HTTP gateway: requests one API key may have in flight at once (long-polls included, and "
        "writes still finishing after their client hung up); more are answered 503 with Retry-After.",
    )
    console_write: bool = Field(
        False, description="The operator console (/console on the gateway) may redrive and discard parked tasks."
    )

    @field_validator(
        "results_queue",
        "keyring",
        "key_server_url",
        "cassandra_tls_ca_file",
        "cassandra_tls_cert_file",
        "cassandra_tls_key_file",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    _split_lists = field_validator("trusted_users", "cassandra_hosts", "amqp_hosts", mode="before")(_split_csv)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url_parses(cls, value: SecretStr) -> SecretStr:
        # Checked here, not at the first connect: "rabbit:5672" (no scheme) loaded, and
        # `queue-bridge permissions` printed vhost "672" for it. The message never shows the URL
        # (it holds the password).
        if password_unencoded(value.get_secret_value()):
            raise ValueError(UNENCODED_USERINFO)
        url = urlsplit(value.get_secret_value())
        if url.scheme not in ("amqp", "amqps"):
            raise ValueError("must be an amqp:// or amqps:// URL, such as amqp://user:password@rabbitmq:5672/")
        if not url.hostname:
            raise ValueError("names no host (amqp://user:password@HOST:5672/vhost)")
        try:
            url.port  # noqa: B018 (it raises for a port that is not a number from 0 to 65535)
        except ValueError:
            raise ValueError("has a port that is not a number from 1 to 65535") from None
        if url.scheme == "amqps":  # aiormq opens them for TLS only
            _amqp_tls_files_readable(url.query)
        return value

    @field_validator("cassandra_hosts")
    @classmethod
    def _cassandra_hosts_without_ports(cls, value: list[str]) -> list[str]:
        # BRIDGE_AMQP_HOSTS takes host[:port]; these do not, and "cass-0:9042" was taken for a
        # host name: every start failed with "cannot connect", naming no format problem.
        for host in value:
            if host.startswith("[") or re.fullmatch(r"[^:]+:\d*", host):
                raise ValueError(
                    f"{host!r}: give host names or addresses only; the port is BRIDGE_CASSANDRA_PORT (one for all)"
                )
        return value

    @field_validator("cassandra_keyspace")
    @classmethod
    def _keyspace_as_cassandra_names_it(cls, value: str) -> str:
        # The DDL and statements name the keyspace unquoted, so Cassandra folds it to lower case;
        # the schema checks compared the name as given, found nothing under "QueueBridge", and in
        # verify mode every bridge waited for a schema that was there (create mode ran the DDL at
        # every start). Lower case here is the keyspace Cassandra made, under either spelling.
        return value.lower()

    @field_validator("amqp_hosts")
    @classmethod
    def _amqp_hosts_parse(cls, value: list[str]) -> list[str]:
        for host in value:
            parse_host(host)  # its ValueError names the host
        return value

    @field_validator("task_ttl", mode="before")
    @classmethod
    def _ttl_in_seconds(cls, value: Any) -> Any:
        # pydantic reads a string only as a duration text (P7D, 7 days, 168:00:00); the README
        # and `queue-bridge config` give it in seconds, which is what an operator copies back.
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value):
            return float(value)
        return value

    @field_validator("service_max_deliveries", mode="before")
    @classmethod
    def _limits_json(cls, value: Any) -> Any:
        # Decoded here, not by pydantic-settings, whose error names the field, not the variable.
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                value = json.loads(value, object_pairs_hook=_no_duplicate_keys)
            except _KeyTwice as exc:
                raise ValueError(str(exc)) from None
            except ValueError:
                example = '{"billing": 3}, {"owner/billing": 3} or {"owner": {"billing": 3}}'
                raise ValueError(f"must be JSON, e.g. {example}") from None
        if isinstance(value, dict):
            _check_delivery_limits(value)
        return value

    @field_validator("task_ttl")
    @classmethod
    def _ttl_positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 1:
            raise ValueError("must be at least 1 second")
        if value.total_seconds() > 630_720_000:  # Cassandra's maximum TTL (20 years)
            raise ValueError("must be at most 20 years (Cassandra's TTL limit)")
        return value

    @field_validator("cassandra_tls_ca_file", "cassandra_tls_cert_file", "cassandra_tls_key_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        # Read only when the session connects: a path that does not match the mounted Secret
        # would stop the start there, with a traceback naming no variable.
        if value is not None and not (value.is_file() and os.access(value, os.R_OK)):
            reason = "not a file" if value.exists() and not value.is_file() else "no readable file"
            raise ValueError(f"{reason}: {value}")
        return value

    @field_validator("cassandra_replication")
    @classmethod
    def _replication_is_a_cql_map(cls, value: str) -> str:
        # Pasted into CREATE KEYSPACE: checked here, not found wrong by Cassandra at the first
        # start (a traceback; in verify mode, a schema Job failing and every sidecar crash-looping).
        entries = _REPLICATION_MAP.fullmatch(value.strip())
        keys = _REPLICATION_ENTRY.findall(value)
        if entries is None or "class" not in keys:
            raise ValueError(
                "must be a CQL map with a 'class', in single quotes: "
                "{'class': 'NetworkTopologyStrategy', 'dc1': 3} (JSON's double quotes are not CQL)"
            )
        return value

    @field_validator("cassandra_consistency", mode="before")
    @classmethod
    def _consistency_is_a_quorum(cls, value: Any) -> Any:
        # A read sees every acknowledged write only while reads and writes both take a quorum of
        # the replicas (R + W > RF, docs/storage.md "Consistency"): at ONE a write acknowledged by
        # one replica and a read answered by another miss each other (a lease read as it was).
        if value not in ("LOCAL_QUORUM", "QUORUM"):
            raise ValueError(
                f"{value!r} is not a quorum: must be LOCAL_QUORUM or QUORUM (reads see the queue's "
                "writes only if both take a quorum of the replicas; a one-node cluster works with either)"
            )
        return value

    @field_validator("cassandra_reconnect_max_delay")
    @classmethod
    def _reconnect_delay_from_the_base(cls, value: float) -> float:
        # The drivers refuse it only when the session connects: a traceback naming no variable.
        if not value >= CASSANDRA_RECONNECT_BASE_DELAY_S:
            raise ValueError(
                f"must be at least {CASSANDRA_RECONNECT_BASE_DELAY_S} (the drivers' first wait before reconnecting)"
            )
        return value

    @field_validator("cassandra_hosts")
    @classmethod
    def _hosts_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one host")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> Settings:
        if self.keyring is not None and self.key_server_url is not None:
            raise ValueError("set BRIDGE_KEYRING or BRIDGE_KEY_SERVER_URL, not both")
        return self

    @model_validator(mode="after")
    def _default_lease_within_the_maximum(self) -> Settings:
        # Refused whenever the default is set: a deployment that lowered the maximum alone below
        # the default (60 s) kept starting, its default lease the maximum, as before. (A default
        # raised alone past the 12 h maximum was taken and silently capped.)
        explicit = "default_time_to_recover_ms" in self.model_fields_set
        if explicit and self.default_time_to_recover_ms > self.max_time_to_recover_ms:
            raise ValueError(
                f"BRIDGE_DEFAULT_TIME_TO_RECOVER_MS ({self.default_time_to_recover_ms}) is above "
                f"BRIDGE_MAX_TIME_TO_RECOVER_MS ({self.max_time_to_recover_ms}): every fetch without a "
                "timeToRecover would silently get the maximum"
            )
        return self

    @model_validator(mode="after")
    def _heartbeats_within_the_idle_timeout(self) -> Settings:
        # A healthy idle connection reads only its heartbeats' answers: one sent at or after the idle
        # timeout (or too close before it to be answered) would have every quiet connection closed.
        # ... and the answer gets at least a third of the timeout (cassandra-driver waits only the
        # rest for it: 1 s, and a one-second stall of a node marked it down).
        if 3 * self.cassandra_heartbeat_interval > 2 * self.cassandra_idle_timeout:
            raise ValueError(
                f"BRIDGE_CASSANDRA_HEARTBEAT_INTERVAL ({self.cassandra_heartbeat_interval}) must be at most two "
                f"thirds of BRIDGE_CASSANDRA_IDLE_TIMEOUT ({self.cassandra_idle_timeout}): a quiet connection "
                "reads nothing but its heartbeats' answers, and each answer needs time to come"
            )
        return self

    @model_validator(mode="after")
    def _results_fit_the_broker(self) -> Settings:
        # A result message carries the task's token (an add body: up to the value limit + 64 KiB)
        # and the result (up to the value limit). Past the broker's max_message_size, each publish
        # was refused with a 406 that closed the results channel (the add retry lane's too) and
        # failed the results beside it, at every retry of the relay, for the result's life.
        needed = 2 * self.max_value_bytes + 2 * 65_536
        if needed > self.broker_max_message_bytes:
            raise ValueError(
                f"BRIDGE_MAX_VALUE_BYTES ({self.max_value_bytes}) is too large for the broker's message size "
                f"(BRIDGE_BROKER_MAX_MESSAGE_BYTES, {self.broker_max_message_bytes}): a result carries a token and "
                f"a result of that size each, {needed} bytes in all; raise RabbitMQ's max_message_size and "
                "BRIDGE_BROKER_MAX_MESSAGE_BYTES with it, or lower BRIDGE_MAX_VALUE_BYTES"
            )
        return self

    @model_validator(mode="after")
    def _gateway_has_keys(self) -> Settings:
        if self.gateway_port and self.gateway_keys_file is None:
            raise ValueError("BRIDGE_GATEWAY_PORT needs BRIDGE_GATEWAY_KEYS_FILE (the gateway has no anonymous access)")
        return self

    @property
    def amqp_urls(self) -> list[str]:
        """The URLs to connect to, in this process's order (see bridge.transport.addresses)."""
        return node_urls(self.amqp_url.get_secret_value(), self.amqp_hosts, random.Random(_NODE_ORDER_SEED))  # nosec B311 - load spreading

    @property
    def task_ttl_seconds(self) -> int:
        return int(self.task_ttl.total_seconds())

    def masked(self) -> dict[str, Any]:
        """The effective configuration as ``BRIDGE_*`` -> value, secrets masked (for ``queue-bridge config``)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "amqp_url":
                shown: Any = _shown_amqp_url(value.get_secret_value())
            elif isinstance(value, SecretStr):
                shown = "**********"
            elif name == "key_server_url" and value:
                shown = without_secrets(value)  # basic-auth credentials (or a query's token) read every key
            elif isinstance(value, Path):
                shown = str(value)
            elif isinstance(value, timedelta):
                shown = int(value.total_seconds())
            else:
                shown = value
            out[ENV_PREFIX + name.upper()] = shown
        return out


# A CQL map literal: 'key': 'text' or 'key': number, comma separated. A quoted part may hold
# anything but a lone quote (data centre names with spaces, transient replication's '3/1').
_CQL_TEXT = r"'(?:[^']|'')*'"
_REPLICATION_ENTRY = re.compile(rf"'((?:[^']|'')*)'\s*:\s*(?:{_CQL_TEXT}|\d+)")
_REPLICATION_MAP = re.compile(
    rf"\{{\s*{_CQL_TEXT}\s*:\s*(?:{_CQL_TEXT}|\d+)(?:\s*,\s*{_CQL_TEXT}\s*:\s*(?:{_CQL_TEXT}|\d+))*\s*\}}"
)


def _shown_amqp_url(url: str) -> str:
    """The RabbitMQ URL with only its password masked: the operator checking which broker, vhost
    and user a bridge uses saw nothing but stars."""
    try:
        return without_password(url)
    except ValueError:  # a port that is no number: nothing of it can be shown safely
        return "**********"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """What to say of each ``BRIDGE_*`` variable that names no setting: a misspelt one
    (``BRIDGE_CASSANDRA_HOST``) is ignored, and its setting silently keeps its default."""
    names = [ENV_PREFIX + field.upper() for field in Settings.model_fields]
    said = []
    for var in sorted(environ):
        if var.upper().startswith(ENV_PREFIX) and var.upper() not in names:
            close = difflib.get_close_matches(var.upper(), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            said.append(f"{var} is not a setting of this bridge{hint}: ignored")
    return said


def configured_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """What the settings are read from: ``environ`` over the ``.env`` file of the working directory
    (read by the settings too: a misspelt name there was dropped without a word)."""
    from dotenv import dotenv_values

    from_file = {k: v for k, v in dotenv_values(".env").items() if v is not None} if Path(".env").is_file() else {}
    return {**from_file, **environ}


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into a ConfigError naming each variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [str(part) for part in err["loc"] if isinstance(part, str)]
            var = ENV_PREFIX + loc[0].upper() if loc else "configuration"
            lines.append(f"{var}: {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
