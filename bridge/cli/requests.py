"""``add``, ``fetch``, ``ack`` by hand (for debugging), as the bundled client sends them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from bridge.cli.base import (
    AmqpUrlOption,
    Failure,
    TimeoutOption,
    amqp_url_of,
    app,
    fail,
    parse_json,
    quiet_driver_logs,
    run_async,
    safe_url,
    settings_or_exit,
)

if TYPE_CHECKING:
    from bridge.client.rpc import RpcClient, Task, Worker

T = TypeVar("T")
C = TypeVar("C", bound="RpcClient")


async def _with_client(client: C, timeout: float, use: Callable[[C], Awaitable[T]]) -> T:
    """Open an RPC client, run ``use`` with it, close it; map failures to :class:`Failure`."""
    from aiormq.exceptions import AMQPError

    from bridge.client.errors import BridgeClientError, ConnectionLost, RequestTimeout

    where = safe_url(client.url)
    try:
        try:
            async with asyncio.timeout(timeout):
                await client.open()
        except TimeoutError:
            raise Failure(f"cannot connect to RabbitMQ at {where}: no connection within {timeout}s") from None
        except (AMQPError, OSError) as exc:
            raise Failure(f"cannot connect to RabbitMQ at {where}: {type(exc).__name__}: {exc}") from None
        try:
            return await use(client)
        except RequestTimeout:
            raise Failure(
                f"no reply from the bridge within {timeout}s (is a bridge consuming exchange "
                f"{client.exchange_name!r} on {where}?)"
            ) from None
        except ConnectionLost as exc:
            raise Failure(f"RabbitMQ connection failed ({where}): {exc.message}") from None
        except BridgeClientError as exc:
            raise Failure(f"the bridge answered {exc.code}: {exc.message}") from None
        except (AMQPError, OSError) as exc:
            raise Failure(f"RabbitMQ connection failed ({where}): {type(exc).__name__}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):  # closing a broken connection: nothing more to report
            await client.close()


def _run_client(client: C, timeout: float, use: Callable[[C], Awaitable[T]]) -> T:
    quiet_driver_logs()
    try:
        result: T = run_async(_with_client(client, timeout, use))
    except Failure as exc:
        fail(str(exc))
    return result


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
    value = parse_json(value_json, "VALUE_JSON")
    token_value = parse_json(token, "--token") if token is not None else None
    settings = settings_or_exit()
    from bridge.client.rpc import Engine

    engine = Engine(amqp_url_of(settings, amqp_url), owner=owner, exchange=settings.exchange, timeout=timeout)

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
    settings = settings_or_exit()
    from bridge.client.rpc import Worker

    client = Worker(
        amqp_url_of(settings, amqp_url), service=service, worker_id=worker, exchange=settings.exchange, timeout=timeout
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
    result_value = parse_json(result, "--result") if result is not None else None
    error_value = parse_json(error, "--error") if error is not None else None
    if error is not None and error_value is None:
        raise typer.BadParameter("the error must not be null", param_hint="--error")
    settings = settings_or_exit()
    from bridge.client.rpc import Worker

    client = Worker(
        amqp_url_of(settings, amqp_url), service=service, worker_id=worker, exchange=settings.exchange, timeout=timeout
    )

    async def use(w: Worker) -> bool:
        return await w.ack(result_value, error=error_value)

    typer.echo("true" if _run_client(client, timeout, use) else "false")
