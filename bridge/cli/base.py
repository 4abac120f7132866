"""What every ``queue-bridge`` command shares: the typer apps, options, and failure handling."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import typer

from bridge.config import UNENCODED_USERINFO, ConfigError, Settings, load_settings, password_unencoded
from bridge.domain import jsonvalue

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
        help="RabbitMQ URL to connect with (default: BRIDGE_AMQP_URL). Its user is the caller's identity. "
        "A password here is visible to every local user (ps) and kept in shell history: prefer "
        "BRIDGE_AMQP_URL in the command's environment.",
        show_default=False,
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="Seconds to wait for the connection and for the bridge's reply."),
]


# The exit code of a command that answered, but not all there is: `purge` stopped short (ready
# tasks may remain), `parked` listing --limit tasks (more may be parked), `queue-stats` with queues
# it could not count. Not 0: a script must not take the output for complete.
PARTIAL_EXIT = 3


class Failure(Exception):
    """An expected failure: printed as one line on stderr, exit code ``code`` (1; 2 for a
    configuration the command refuses, as ``run`` exits)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # only around the import: an ImportError raised by ``coro`` is its own
        return asyncio.run(coro)
    return uvloop.run(coro)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str, param: str) -> Any:
    """Parse a JSON argument; invalid JSON is a usage error (exit code 2). So is JSON the client
    cannot send as it is: ``NaN`` and ``Infinity`` (Python reads them; they would go as null),
    and nesting deeper than the wire allows."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): {text[:60]!r}",
            param_hint=param,
        ) from None
    except (ValueError, RecursionError) as exc:
        raise typer.BadParameter(f"not valid JSON ({exc}): {text[:60]!r}", param_hint=param) from None
    try:
        jsonvalue.dumps(value)
    except jsonvalue.JsonError as exc:
        raise typer.BadParameter(str(exc), param_hint=param) from None
    return value


def safe_url(url: str) -> str:
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


def quiet_driver_logs() -> None:
    # The drivers log connection failures (with tracebacks) that we report ourselves, once.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for name in ("cassandra", "aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def cassandra_where(settings: Settings) -> str:
    """The Cassandra contact points, for messages."""
    return f"{','.join(settings.cassandra_hosts)}:{settings.cassandra_port}"


def cassandra_errors() -> tuple[type[BaseException], ...]:
    """What talking to Cassandra (``CassandraSession``) may raise when the server, not the command,
    is at fault: the driver's own errors (connect is not mapped), and the storage errors the
    adapter maps them to (InvalidQuery included: a missing keyspace or table is the operator's to
    fix, ``queue-bridge schema``, not a bug of the command). Each command says what it was doing."""
    from cassandra import (
        ConfigurationException,
        DriverException,
        OperationTimedOut,
        RequestExecutionException,
        RequestValidationException,
    )
    from cassandra.cluster import NoHostAvailable

    from bridge.storage.errors import InvalidQuery, StorageError

    return (
        StorageError,
        InvalidQuery,
        NoHostAvailable,
        DriverException,
        OperationTimedOut,
        RequestExecutionException,
        RequestValidationException,
        ConfigurationException,
        OSError,
        TimeoutError,
    )


def amqp_url_of(settings: Settings, url: str | None) -> str:
    """``--amqp-url`` (checked: a usage error, exit code 2, if it cannot be a RabbitMQ URL), else
    the bridge's own BRIDGE_AMQP_URL."""
    if not url:
        return settings.amqp_url.get_secret_value()
    if password_unencoded(url):
        raise typer.BadParameter(f"not a RabbitMQ URL: it {UNENCODED_USERINFO}", param_hint="'--amqp-url'")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number (or out of range)
    except ValueError:
        # Never the parser's words: they quote the port, which may be part of the password.
        raise typer.BadParameter(
            "not a RabbitMQ URL (its port is not a number from 1 to 65535)", param_hint="'--amqp-url'"
        ) from None
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise typer.BadParameter(
            "not a RabbitMQ URL (amqp://user:password@host:port/vhost or amqps://...)", param_hint="'--amqp-url'"
        )
    return url
