"""The bridge itself: ``run``, ``permissions``, ``config``, ``schema``."""

from __future__ import annotations

import json
import logging
import os
from typing import Annotated

import typer

from bridge.cli.base import (
    Failure,
    app,
    cassandra_errors,
    cassandra_where,
    fail,
    quiet_driver_logs,
    run_async,
    settings_or_exit,
)
from bridge.config import ConfigError, configured_variables, unknown_variables


@app.command()
def run() -> None:
    """Run the bridge until SIGTERM or SIGINT."""
    settings = settings_or_exit()
    from bridge.app import run_forever
    from bridge.observability.logging import configure_logging
    from bridge.storage.errors import StorageUnavailable
    from bridge.storage.schema import SchemaNotReady
    from bridge.transport.errors import BrokerUnreachable

    configure_logging(settings)
    for said in unknown_variables(configured_variables(os.environ)):
        logging.getLogger("bridge.config").warning(said)
    try:
        run_async(run_forever(settings))
    except ConfigError as exc:  # found at start (e.g. an invalid gateway keys file): exit 2, no traceback
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except BrokerUnreachable as exc:  # only at start, like Cassandra's below; the message masks the password
        fail(str(exc))
    except SchemaNotReady as exc:  # BRIDGE_SCHEMA_MODE=verify and nobody ran `queue-bridge schema`
        fail(str(exc))
    except StorageUnavailable as exc:
        # Only at start: once started, a bridge rides out a Cassandra outage (it pauses its
        # consumers) and never raises it. acsylla (the default driver) maps its errors to this.
        fail(f"cannot connect to Cassandra at {cassandra_where(settings)}: {exc}")
    except _datastax_unreachable() as exc:  # BRIDGE_CASSANDRA_DRIVER=datastax: connect is not mapped
        fail(f"cannot connect to Cassandra at {cassandra_where(settings)}: {type(exc).__name__}: {exc}")


def _datastax_unreachable() -> tuple[type[BaseException], ...]:
    """The datastax driver's errors for a Cassandra out of reach. Not OSError or TimeoutError:
    at start those may be the bridge's own (its HTTP port taken), not Cassandra's."""
    from cassandra import OperationTimedOut
    from cassandra.cluster import NoHostAvailable

    return (NoHostAvailable, OperationTimedOut)


@app.command()
def permissions(
    bridge_user: Annotated[str, typer.Option(help="The bridge's RabbitMQ user (default: from BRIDGE_AMQP_URL).")] = "",
    engine: Annotated[
        list[str] | None, typer.Option(help="An engine user (repeatable; default: BRIDGE_TRUSTED_USERS).")
    ] = None,
    worker: Annotated[list[str] | None, typer.Option(help="A worker user (repeatable).")] = None,
    vhost: Annotated[
        str | None, typer.Option(help="The virtual host (default: BRIDGE_AMQP_URL's).", show_default=False)
    ] = None,
) -> None:
    """Print the rabbitmqctl lines that give each user the narrowest permissions that work."""
    from bridge.transport.permissions import amqp_user, amqp_vhost, role_permissions

    s = settings_or_exit()
    roles = role_permissions(s.exchange, s.results_exchange, s.queue_prefix, s.results_queue)
    url = s.amqp_url.get_secret_value()
    # The bridge's own vhost: "/" for a bridge on another one granted its users nothing it uses.
    vhost = amqp_vhost(url) if vhost is None else vhost
    if not bridge_user and amqp_user(url) == "guest":
        # BRIDGE_AMQP_URL unset (its default's user) or naming RabbitMQ's default administrator:
        # the lines pasted cut guest down to the bridge's rules, and the bridge's user got none.
        fail(
            "the bridge's user would be 'guest' (BRIDGE_AMQP_URL unset, or naming RabbitMQ's default "
            "administrator): give --bridge-user NAME, or set BRIDGE_AMQP_URL as the bridges have it",
            code=2,
        )
    users = {"bridge": [bridge_user or amqp_user(url)]}
    users["engine"] = engine or list(s.trusted_users)
    users["worker"] = worker or ["<worker-user>"]
    for role, names in users.items():
        typer.echo(f"# {role}")
        if role == "engine" and s.results_queue == s.results_exchange:
            # RabbitMQ permissions name resources, not their kind: read on the shared name covers
            # the exchange too, and exchange.bind needs only read on its source.
            typer.echo(
                "# note: the results queue and exchange share a name, so this read also lets the engine"
                " bind the results exchange to an exchange it may write (the bridge's: results would"
                " then reach its request queues); give BRIDGE_RESULTS_QUEUE a name of its own to prevent it"
            )
        for user in names:
            typer.echo(roles[role].rabbitmqctl(user, vhost))


@app.command()
def config() -> None:
    """Print the effective configuration (secrets masked)."""
    typer.echo(json.dumps(settings_or_exit().masked(), indent=2, default=str))


@app.command()
def schema(
    print_only: Annotated[bool, typer.Option("--print", help="Print the CQL instead of applying it.")] = False,
) -> None:
    """Create or upgrade the keyspace and tables."""
    settings = settings_or_exit()
    from bridge.storage.schema import printed_cql

    if print_only:
        ks, replication, ttl = settings.cassandra_keyspace, settings.cassandra_replication, settings.task_ttl_seconds
        for cql in printed_cql(ks, replication, ttl):
            typer.echo(cql.strip() + ";\n")
        return

    quiet_driver_logs()
    errors = cassandra_errors()
    where = cassandra_where(settings)

    async def apply() -> None:
        from bridge.storage.cassandra import CassandraSession
        from bridge.storage.schema import LayoutMismatch, check_layout, create_schema

        db = CassandraSession(settings)
        try:
            try:
                await db.connect()
            except errors as exc:
                raise Failure(f"cannot connect to Cassandra at {where}: {type(exc).__name__}: {exc}") from None
            try:
                await create_schema(db, settings)
                await check_layout(db, settings.cassandra_keyspace)
            except LayoutMismatch as exc:
                raise Failure(str(exc), code=2) from None  # bad configuration, as `run` exits
            except errors as exc:
                raise Failure(
                    f"creating the schema in keyspace {settings.cassandra_keyspace!r} at {where} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
        finally:
            await db.close()

    try:
        run_async(apply())
    except Failure as exc:
        fail(str(exc), exc.code)
    typer.echo(f"schema ready in keyspace {settings.cassandra_keyspace}")
