"""The ``queue-bridge`` command line (typer).

Exit codes: 0 success; 1 an operation failed (a server unreachable, an error answered by the
bridge, a file that cannot be written); 2 bad usage or arguments (invalid JSON, invalid
configuration). Expected failures print one clear message on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer

from bridge.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from bridge.client.rpc import RpcClient
    from bridge.domain.stats import QueueStats

T = TypeVar("T")
C = TypeVar("C", bound="RpcClient")

app = typer.Typer(
    help="queue-bridge: a persistent work queue over AMQP, stored encrypted in Apache Cassandra.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold secrets (URLs, keys)
)
keyring_app = typer.Typer(
    help="Create or rotate a key-ring file (owner -> AES-256 keys) for BRIDGE_KEYRING.",
    no_args_is_help=True,
)
app.add_typer(keyring_app, name="keyring")

AmqpUrlOption = Annotated[
    str | None,
    typer.Option(
        "--amqp-url",
        help="RabbitMQ URL to connect with (default: BRIDGE_AMQP_URL). Its user is the caller's identity.",
        show_default=False,
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="Seconds to wait for the connection and for the bridge's reply."),
]


# -- helpers ---------------------------------------------------------------------------------
class _Failure(Exception):
    """An expected failure: printed as one line on stderr, exit code 1."""


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _parse_json(text: str, param: str) -> Any:
    """Parse a JSON argument; invalid JSON is a usage error (exit code 2)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): {text[:60]!r}",
            param_hint=param,
        ) from None


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit((parts.scheme, user + host, parts.path, "", ""))
    except ValueError:
        return "<unparsable URL>"


def _quiet_driver_logs() -> None:
    # The drivers log connection failures (with tracebacks) that we report ourselves, once.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for name in ("cassandra", "aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _amqp_url(settings: Settings, url: str | None) -> str:
    return url if url else settings.amqp_url.get_secret_value()


async def _with_client(client: C, timeout: float, use: Callable[[C], Awaitable[T]]) -> T:
    """Open an RPC client, run ``use`` with it, close it; map failures to :class:`_Failure`."""
    from aiormq.exceptions import AMQPError

    from bridge.client.errors import BridgeClientError, RequestTimeout

    where = _safe_url(client.url)
    try:
        try:
            async with asyncio.timeout(timeout):
                await client.open()
        except TimeoutError:
            raise _Failure(f"cannot connect to RabbitMQ at {where}: no connection within {timeout}s") from None
        except (AMQPError, OSError) as exc:
            raise _Failure(f"cannot connect to RabbitMQ at {where}: {type(exc).__name__}: {exc}") from None
        try:
            return await use(client)
        except RequestTimeout:
            raise _Failure(
                f"no reply from the bridge within {timeout}s (is a bridge consuming exchange "
                f"{client.exchange_name!r} on {where}?)"
            ) from None
        except BridgeClientError as exc:
            raise _Failure(f"the bridge answered {exc.code}: {exc.message}") from None
        except (AMQPError, OSError) as exc:
            raise _Failure(f"RabbitMQ connection failed ({where}): {type(exc).__name__}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):  # closing a broken connection: nothing more to report
            await client.close()


def _run_client(client: C, timeout: float, use: Callable[[C], Awaitable[T]]) -> T:
    _quiet_driver_logs()
    try:
        result: T = _run_async(_with_client(client, timeout, use))
    except _Failure as exc:
        _fail(str(exc))
    return result


# -- bridge ------------------------------------------------------------------------------------
@app.command()
def run() -> None:
    """Run the bridge until SIGTERM or SIGINT."""
    settings = _settings()
    from bridge.app import run_forever
    from bridge.observability.logging import configure_logging

    configure_logging(settings)
    _run_async(run_forever(settings))


@app.command()
def permissions(
    bridge_user: Annotated[str, typer.Option(help="The bridge's RabbitMQ user (default: from BRIDGE_AMQP_URL).")] = "",
    engine: Annotated[
        list[str] | None, typer.Option(help="An engine user (repeatable; default: BRIDGE_TRUSTED_USERS).")
    ] = None,
    worker: Annotated[list[str] | None, typer.Option(help="A worker user (repeatable).")] = None,
    vhost: Annotated[str, typer.Option(help="The virtual host.")] = "/",
) -> None:
    """Print the rabbitmqctl lines that give each user the narrowest permissions that work."""
    from bridge.transport.permissions import amqp_user, role_permissions

    s = _settings()
    roles = role_permissions(s.exchange, s.results_exchange, s.queue_prefix, s.results_queue)
    users = {"bridge": [bridge_user or amqp_user(s.amqp_url.get_secret_value())]}
    users["engine"] = engine or list(s.trusted_users)
    users["worker"] = worker or ["<worker-user>"]
    for role, names in users.items():
        typer.echo(f"# {role}")
        for user in names:
            typer.echo(roles[role].rabbitmqctl(user, vhost))


@app.command()
def config() -> None:
    """Print the effective configuration (secrets masked)."""
    typer.echo(json.dumps(_settings().masked(), indent=2, default=str))


@app.command()
def schema(
    print_only: Annotated[bool, typer.Option("--print", help="Print the CQL instead of applying it.")] = False,
) -> None:
    """Create or upgrade the keyspace and tables."""
    settings = _settings()
    from bridge.storage.schema import all_cql

    statements = all_cql(settings.cassandra_keyspace, settings.cassandra_replication, settings.task_ttl_seconds)
    if print_only:
        for cql in statements:
            typer.echo(cql.strip() + ";\n")
        return

    async def apply() -> None:
        from bridge.storage.cassandra import CassandraSession
        from bridge.storage.repository import TaskRepository

        db = CassandraSession(settings)
        await db.connect()
        try:
            await TaskRepository(db).create_schema(settings)
        finally:
            await db.close()

    _run_async(apply())
    typer.echo(f"schema ready in keyspace {settings.cassandra_keyspace}")


# -- stats -------------------------------------------------------------------------------------
def _cassandra_errors() -> tuple[type[BaseException], ...]:
    from cassandra import (
        ConfigurationException,
        DriverException,
        OperationTimedOut,
        RequestExecutionException,
        RequestValidationException,
    )
    from cassandra.cluster import NoHostAvailable

    from bridge.storage.errors import StorageError

    return (
        StorageError,
        NoHostAvailable,
        DriverException,
        OperationTimedOut,
        RequestExecutionException,
        RequestValidationException,
        ConfigurationException,
        OSError,
        TimeoutError,
    )


async def _stats(settings: Settings, owner: str, service: str, limit: int) -> QueueStats:
    from bridge.domain.stats import queue_stats
    from bridge.storage.cassandra import CassandraSession
    from bridge.storage.repository import TaskRepository

    errors = _cassandra_errors()
    where = f"{','.join(settings.cassandra_hosts)}:{settings.cassandra_port}"
    db = CassandraSession(settings)
    try:
        try:
            await db.connect()
        except errors as exc:
            raise _Failure(f"cannot connect to Cassandra at {where}: {type(exc).__name__}: {exc}") from None
        repo = TaskRepository(db)
        try:
            await repo.prepare()
        except errors as exc:
            raise _Failure(
                f"cannot use keyspace {settings.cassandra_keyspace!r} at {where} ({type(exc).__name__}: {exc}); "
                "does it exist? `queue-bridge schema` creates it"
            ) from None
        try:
            return await queue_stats(repo, owner, service, time.time_ns() // 1_000_000, limit=limit)
        except errors as exc:
            raise _Failure(f"reading the queue from Cassandra at {where} failed: {type(exc).__name__}: {exc}") from None
    finally:
        await db.close()


def _format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@app.command()
def stats(
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="The queue's serviceId.")],
    owner: Annotated[str, typer.Option("--owner", help="The queue's owner (the workers' AMQP user).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Read at most this many ready-index entries.")] = 20_000,
) -> None:
    """Count a queue's tasks: ready, in flight, done, dead (reads Cassandra directly).

    Counts start at the queue's scan cursors (all before them were claimed), so done/dead cover recent tasks only.
    """
    settings = _settings()
    _quiet_driver_logs()
    try:
        result: QueueStats = _run_async(_stats(settings, owner, service, limit))
    except _Failure as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"owner": owner, "service": service, **asdict(result)}, indent=2))
        return
    rows = [
        ("queue", f"{owner} / {service}"),
        ("ready", str(result.ready)),
        ("in flight", str(result.in_flight)),
        ("done", str(result.done)),
        ("dead", str(result.dead)),
        ("oldest ready", _format_age(result.oldest_ready_age_s)),
        ("scanned", f"{result.scanned} entries"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        typer.echo(f"{name:<{width}}  {value}")
    typer.echo("note: done/dead count only tasks after the queue's scan cursors")
    if result.truncated:
        typer.echo(f"note: stopped after --limit {limit} entries: the counts are lower bounds")


# -- client commands ---------------------------------------------------------------------------
@app.command()
def add(
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="The queue's serviceId.")],
    value_json: Annotated[str, typer.Argument(metavar="VALUE_JSON", help="The task value, as JSON.")],
    token: Annotated[
        str | None, typer.Option("--token", metavar="JSON", help="Opaque token returned with the result (JSON).")
    ] = None,
    owner: Annotated[
        str | None,
        typer.Option("--owner", help="Owner of the task; only for users the bridge trusts (BRIDGE_TRUSTED_USERS)."),
    ] = None,
    message_id: Annotated[
        str | None, typer.Option("--message-id", help="Idempotency key: the same id adds the task once.")
    ] = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Add a task and print its id."""
    value = _parse_json(value_json, "VALUE_JSON")
    token_value = _parse_json(token, "--token") if token is not None else None
    settings = _settings()
    from bridge.client.rpc import Engine

    engine = Engine(_amqp_url(settings, amqp_url), owner=owner, exchange=settings.exchange, timeout=timeout)

    async def use(client: Engine) -> str | None:
        return await client.add(service, value, token=token_value, message_id=message_id)

    typer.echo(_run_client(engine, timeout, use))


@app.command()
def fetch(
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="The queue's serviceId.")],
    worker: Annotated[str, typer.Option("--worker", help="The worker id (one task held at a time per id).")],
    ttr: Annotated[
        int | None,
        typer.Option("--ttr", min=1, help="Time to recover, ms: the lease length (default: the bridge's)."),
    ] = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Fetch a task as a worker; print it as JSON (id, deliveries, leaseExpiresAt, value) or null."""
    settings = _settings()
    from bridge.client.rpc import Task, Worker

    client = Worker(
        _amqp_url(settings, amqp_url), service=service, worker_id=worker, exchange=settings.exchange, timeout=timeout
    )

    async def use(w: Worker) -> Task | None:
        return await w.fetch(ttr)

    task = _run_client(client, timeout, use)
    if task is None:
        typer.echo("null")
        return
    out = {"id": task.id, "deliveries": task.deliveries, "leaseExpiresAt": task.lease_expires_at, "value": task.value}
    typer.echo(json.dumps(out))


@app.command()
def ack(
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="The queue's serviceId.")],
    worker: Annotated[str, typer.Option("--worker", help="The worker id that fetched the task.")],
    result: Annotated[
        str | None, typer.Option("--result", metavar="JSON", help="The task's result (JSON; default null).")
    ] = None,
    error: Annotated[
        str | None, typer.Option("--error", metavar="JSON", help="Fail the task with this error (JSON).")
    ] = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Acknowledge the worker's task with a result or an error; print true or false (no task held)."""
    if result is not None and error is not None:
        raise typer.BadParameter("give --result or --error, not both", param_hint="--result / --error")
    result_value = _parse_json(result, "--result") if result is not None else None
    error_value = _parse_json(error, "--error") if error is not None else None
    if error is not None and error_value is None:
        raise typer.BadParameter("the error must not be null", param_hint="--error")
    settings = _settings()
    from bridge.client.rpc import Worker

    client = Worker(
        _amqp_url(settings, amqp_url), service=service, worker_id=worker, exchange=settings.exchange, timeout=timeout
    )

    async def use(w: Worker) -> bool:
        return await w.ack(result_value, error=error_value)

    typer.echo("true" if _run_client(client, timeout, use) else "false")


# -- keyring -----------------------------------------------------------------------------------
@keyring_app.command("generate")
def keyring_generate(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="The key-ring file to write.")],
    owners: Annotated[list[str], typer.Option("--owner", help="An owner to create a key for (repeatable).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a new key-ring with one fresh key per owner (file mode 0600)."""
    from bridge.crypto import generate_keyring, write_keyring

    if path.exists() and not force:
        _fail(f"{path} exists; use --force to overwrite it")
    try:
        doc = generate_keyring(owners)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--owner") from None
    try:
        write_keyring(path, doc)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}")
    typer.echo(f"wrote {path} with owners: {', '.join(owners)}")


@keyring_app.command("rotate")
def keyring_rotate(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="The key-ring file to update in place.")],
    owner: Annotated[str, typer.Option("--owner", help="The owner that gets a new current key (created if new).")],
) -> None:
    """Add a new current key for an owner; old keys are kept so existing tasks stay readable."""
    from bridge.crypto import rotate_keyring, write_keyring
    from bridge.crypto.keyring_file import parse_keyring

    if not owner:
        raise typer.BadParameter("must not be empty", param_hint="--owner")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(f"{path} is not valid JSON ({type(exc).__name__})")
    try:
        parse_keyring(doc, source=str(path))
    except ValueError as exc:
        _fail(f"not a valid key-ring: {exc}")
    existed = owner in doc["owners"]
    key_id = rotate_keyring(doc, owner)
    try:
        write_keyring(path, doc)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}")
    what = "new current key" if existed else "added with key"
    typer.echo(f"owner {owner!r}: {what} {key_id}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
