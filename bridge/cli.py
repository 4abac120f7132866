"""The ``queue-bridge`` command line (typer)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated, Any

import typer

from bridge.config import ConfigError, Settings, load_settings

app = typer.Typer(
    help="queue-bridge: a persistent work queue over AMQP, stored encrypted in Apache Cassandra.",
    no_args_is_help=True,
    add_completion=False,
)


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


@app.command()
def run() -> None:
    """Run the bridge until SIGTERM or SIGINT."""
    settings = _settings()
    from bridge.app import run_forever
    from bridge.observability.logging import configure_logging

    configure_logging(settings)
    _run_async(run_forever(settings))


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
