"""The bridge's requests by hand (for debugging and operations), as the bundled client sends them.

Worker side: ``fetch``, ``ack``, ``extend``, ``fail``. Engine side: ``add``, and the queue
management of contract 1.4: ``cancel``, ``purge``, ``queue-stats``, ``parked``, ``redrive``,
``discard``. ``queue-stats`` asks the bridge; ``stats`` (:mod:`bridge.cli.stats`) reads Cassandra.
Answers are printed as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from bridge.cli.base import (
    PARTIAL_EXIT,
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
    from bridge.client.rpc import Engine, FailOutcome, ParkedPage, ParkedTask, RpcClient, ServiceStats, Task, Worker

T = TypeVar("T")
C = TypeVar("C", bound="RpcClient")


@dataclass
class _Done:
    """What the answered requests of a multi-request command did so far (reported with a failure
    of a later one: those tasks stay purged or redriven, and the operator needs the count)."""

    what: str
    count: int = 0
    requests: int = 0
    resume: str | None = None  # a command line that goes on where the answered requests ended

    def add(self, count: int) -> None:
        self.count += count
        self.requests += 1


ServiceArgument = Annotated[str, typer.Argument(metavar="SERVICE", help="The queue's serviceId.")]
OwnerOption = Annotated[
    str | None,
    typer.Option("--owner", help="Owner of the queue; only for users the bridge trusts (BRIDGE_TRUSTED_USERS)."),
]
TaskIdOption = Annotated[
    str | None,
    typer.Option("--task-id", help="The task, as fetch printed it (or --held).", show_default=False),
]
EpochOption = Annotated[
    int | None, typer.Option("--epoch", help="The lease's epoch, from the fetch (fences a late request).")
]
HeldOption = Annotated[
    bool,
    typer.Option(
        "--held",
        help="No --task-id: whatever task the worker holds when the request arrives (contract 1.0). Only for a "
        "worker that is not running: a running one's task would be taken from under it.",
    ),
]


def _check_named(task_id: str | None, epoch: int | None, held: bool) -> None:
    """A worker-side request names its task, or says ``--held``: without either, the bridge would
    apply it to whatever the worker id holds at that moment (a live worker's task, completed or
    given back under it), which nobody means by leaving an option out."""
    if task_id is not None and held:
        raise typer.BadParameter("give --task-id or --held, not both", param_hint="--task-id / --held")
    if task_id is None and epoch is not None:
        raise typer.BadParameter("--epoch goes with --task-id", param_hint="--epoch")
    if task_id is None and not held:
        raise typer.BadParameter(
            "name the task: --task-id (and --epoch) as fetch printed them, or --held for whatever task the "
            "worker holds (never for a running worker: its task would be taken from under it)",
            param_hint="--task-id / --held",
        )


def _run_again() -> str:
    return "run it again to continue"


@dataclass(frozen=True)
class _Changing:
    """A request that changes tasks: ``notice`` is printed on stderr with its target before it is
    sent; ``advice`` says what to do when the outcome is unknown (no reply in time, the connection
    lost after the send, Ctrl-C): the bridge may have done it, or still be at it. Asked when the
    failure comes (a multi-request command's advice depends on how far it got)."""

    notice: str | None
    advice: Callable[[], str] = _run_again


async def _with_client(
    client: C, timeout: float, use: Callable[[C], Awaitable[T]], *, changing: _Changing | None = None
) -> T:
    """Open an RPC client, run ``use`` with it, close it; map failures to :class:`Failure`."""
    where = ", ".join(safe_url(url) for url in client.urls)
    try:
        await _open(client, timeout, where)
        try:
            return await use(client)
        except asyncio.CancelledError:
            if changing is None:
                raise
            # Ctrl-C (the runner cancels this task): typer exited 130 without a word, while the
            # request in flight went on at the bridge and the totals so far were lost.
            raise Failure(
                f"interrupted: the outcome is unknown, the bridge may still be working; {changing.advice()}"
            ) from None
        except Exception as exc:
            failure = _failure_of(exc, client, timeout, where, changing)
            if failure is None:
                raise
            raise failure from None
    finally:
        with contextlib.suppress(Exception):  # closing a broken connection: nothing more to report
            await client.close()


async def _open(client: RpcClient, timeout: float, where: str) -> None:
    from aio_pika.exceptions import CONNECTION_EXCEPTIONS

    # Every node has its connect bound (the last may be the one that answers), and the channel
    # the call's: one --timeout around it all let a node that accepts TCP and never answers take
    # it whole, and the nodes after it were never tried.
    connecting = client.connect_timeout * len(client.urls) + timeout
    began = time.monotonic()
    try:
        async with asyncio.timeout(connecting):
            await client.open()
    except TimeoutError:
        # The time waited, not the bound: a node's own connect bound ends the attempt first.
        waited = time.monotonic() - began
        raise Failure(
            f"cannot connect to RabbitMQ at {where}: no connection within {waited:.1f}s "
            f"({client.connect_timeout:g}s a node)"
        ) from None
    except CONNECTION_EXCEPTIONS as exc:  # AMQPError, OSError, and what aio-pika counts as such too
        raise Failure(f"cannot connect to RabbitMQ at {where}: {type(exc).__name__}: {exc}") from None


def _failure_of(
    exc: Exception, client: RpcClient, timeout: float, where: str, changing: _Changing | None
) -> Failure | None:
    """What a request's failure tells the operator (None: not one to map, a bug to see)."""
    from aiormq.exceptions import AMQPError

    from bridge.client.errors import BridgeClientError, BrokerRefused, ConnectionLost, RequestTimeout

    if isinstance(exc, RequestTimeout):
        # The real wait: a redrive's reply is awaited --timeout plus the time its pace takes.
        waited = exc.waited_s if exc.waited_s is not None else timeout
        if changing is not None:
            # The bridge may have taken the request and still be at it: "is a bridge
            # consuming?" sent the operator looking for a problem while tasks were purged.
            return Failure(
                f"no answer within {waited:g}s: the outcome is unknown, the bridge may still be working; "
                f"{changing.advice()}"
            )
        return Failure(
            f"no reply from the bridge within {waited:g}s (is a bridge consuming exchange "
            f"{client.exchange_name!r} on {where}?)"
        )
    if isinstance(exc, ConnectionLost):
        if changing is not None and exc.sent:
            return Failure(
                f"RabbitMQ connection failed ({where}) after the request was sent: {exc.message}; "
                f"the outcome is unknown; {changing.advice()}"
            )
        return Failure(f"RabbitMQ connection failed ({where}): {exc.message}")
    if isinstance(exc, BrokerRefused):
        return Failure(f"{exc.message} ({where})")
    if isinstance(exc, BridgeClientError):
        return Failure(f"the bridge answered {exc.code}: {exc.message}")
    if isinstance(exc, AMQPError | OSError):
        said = f"RabbitMQ connection failed ({where}): {type(exc).__name__}: {exc}"
        if changing is not None:
            return Failure(f"{said}; the outcome may be unknown; {changing.advice()}")
        return Failure(said)
    return None


def _run_client(
    client: C,
    timeout: float,
    use: Callable[[C], Awaitable[T]],
    *,
    changing: _Changing | None = None,
    done: _Done | None = None,
) -> T:
    quiet_driver_logs()
    try:
        result: T = run_async(_with_client(client, timeout, use, changing=changing))
    except Failure as exc:
        if done is not None and done.requests:
            said = f"{exc} ({done.count} {done.what} by the {done.requests} request(s) answered before it)"
            fail(f"{said}; to go on: {done.resume}" if done.resume else said)
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
        str | None,
        typer.Option(
            "--message-id",
            help="Idempotency key: the same id adds the task once (default: a new one, printed with an error "
            "that leaves the outcome unknown).",
        ),
    ] = None,
    delay_ms: Annotated[
        int | None, typer.Option("--delay-ms", min=0, help="Hand the task out no sooner than this many ms from now.")
    ] = None,
    not_before: Annotated[
        str | None,
        typer.Option(
            "--not-before", metavar="ISO8601", help="Hand the task out no sooner than this (with an offset: ...Z)."
        ),
    ] = None,
    max_deliveries: Annotated[
        int | None,
        typer.Option("--max-deliveries", min=1, max=1000, help="Park the task after this many deliveries."),
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option("--priority", min=0, max=3, help="0 to 3, higher handed out first (FIFO within a level)."),
    ] = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Add a task and print its id."""
    value = parse_json(value_json, "VALUE_JSON")
    token_value = parse_json(token, "--token") if token is not None else None
    when = _not_before(not_before, delay_ms)
    _check_service(service)
    _check_id(message_id, "--message-id")
    # Always an idempotency key: an add with no answer may have been stored, and a re-run
    # without the key would add the task a second time.
    key = message_id if message_id is not None else f"cli-{uuid.uuid4()}"

    async def use(client: Engine) -> str | None:
        return await client.add(
            service,
            value,
            token=token_value,
            message_id=key,
            delay_ms=delay_ms,
            not_before=when,
            max_deliveries=max_deliveries,
            priority=priority,
        )

    again = f"run it again with --message-id {shlex.quote(key)}: the task is added once"
    typer.echo(_engine_call(owner, amqp_url, timeout, use, changing=_Changing(None, lambda: again)))


def _check_id(given: str | None, hint: str) -> None:
    """An empty id is no idempotency key (the client then sends a random one): a script whose
    variable was unset re-ran an add that had been stored, as told, and added the task twice
    (found by review, 2026-12-07)."""
    if given is not None and not given.strip():
        raise typer.BadParameter("an empty id makes the request impossible to repeat safely: give one", param_hint=hint)


def _not_before(text: str | None, delay_ms: int | None) -> str | None:
    """``--not-before`` checked as the client checks it (a usage error here, exit code 2)."""
    if text is None:
        return None
    if delay_ms is not None:
        raise typer.BadParameter("give --delay-ms or --not-before, not both", param_hint="--delay-ms / --not-before")
    from bridge.client.rpc import iso_not_before

    try:
        return iso_not_before(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--not-before") from None


def _engine_call(
    owner: str | None,
    amqp_url: str | None,
    timeout: float,
    use: Callable[[Engine], Awaitable[T]],
    *,
    changing: _Changing | None = None,
    done: _Done | None = None,
) -> T:
    """Run ``use`` with an Engine of the configured exchange (``x-owner`` = ``owner`` if given).
    ``changing``: a request that changes tasks; its notice, what it is about to do, is printed on
    stderr with its target before it is sent (a wrong BRIDGE_AMQP_URL or --owner shows before
    tasks are gone, not after)."""
    settings = settings_or_exit()
    from bridge.client.rpc import Engine

    url = amqp_url_of(settings, amqp_url)
    hosts = () if amqp_url else settings.amqp_hosts  # BRIDGE_AMQP_HOSTS go with BRIDGE_AMQP_URL
    engine = Engine(
        url,
        owner=owner,
        exchange=settings.exchange,
        timeout=timeout,
        hosts=hosts,
        connect_timeout=min(settings.amqp_connect_timeout, timeout),
    )
    if changing is not None and changing.notice is not None:
        typer.echo(f"{changing.notice} {_target(url, hosts, owner, settings.exchange)}", err=True)
    return _run_client(engine, timeout, use, changing=changing, done=done)


def _target(url: str, hosts: Sequence[str], owner: str | None, exchange: str) -> str:
    """Where a request goes and for whom: broker host(s), vhost, user, owner, exchange."""
    from bridge.transport.permissions import amqp_user, amqp_vhost

    where = ",".join(hosts) if hosts else _host_port(url)
    whose = f"owner {owner!r}" if owner else f"the user's own queues ({amqp_user(url)!r})"
    return (
        f"on RabbitMQ {where} vhost {amqp_vhost(url)!r} as user {amqp_user(url)!r}, {whose}, "
        f"bridge exchange {exchange!r}"
    )


def _host_port(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"
    except ValueError:
        return "<unparsable URL>"


def _worker_call(
    service: str, worker: str, amqp_url: str | None, timeout: float, use: Callable[[Worker], Awaitable[T]]
) -> T:
    settings = settings_or_exit()
    from bridge.client.rpc import Worker

    client = Worker(
        amqp_url_of(settings, amqp_url),
        service=service,
        worker_id=worker,
        exchange=settings.exchange,
        timeout=timeout,
        hosts=() if amqp_url else settings.amqp_hosts,  # BRIDGE_AMQP_HOSTS go with BRIDGE_AMQP_URL
        connect_timeout=min(settings.amqp_connect_timeout, timeout),
    )
    return _run_client(client, timeout, use)


@app.command()
def fetch(
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="The queue's serviceId.")],
    worker: Annotated[str, typer.Option("--worker", help="The worker id (one task held at a time per id).")],
    ttr: Annotated[
        int | None,
        typer.Option("--ttr", min=100, help="Time to recover, ms: the lease length (default: the bridge's)."),
    ] = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Fetch a task as a worker; print it as JSON (id, deliveries, leaseExpiresAt, epoch, value) or null."""

    async def use(w: Worker) -> Task | None:
        return await w.fetch(ttr)

    task = _worker_call(service, worker, amqp_url, timeout, use)
    if task is None:
        typer.echo("null")
        return
    out = {
        "id": task.id,
        "deliveries": task.deliveries,
        "leaseExpiresAt": task.lease_expires_at,
        "epoch": task.epoch,
        "value": task.value,
    }
    typer.echo(json.dumps(out))


@app.command()
def ack(
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="The queue's serviceId.")],
    worker: Annotated[str, typer.Option("--worker", help="The worker id that fetched the task.")],
    result: Annotated[
        str | None, typer.Option("--result", metavar="JSON", help="The task's result (JSON; default null).")
    ] = None,
    error: Annotated[
        str | None,
        typer.Option(
            "--error",
            metavar="JSON",
            help="Complete the task with this business error (JSON), sent to the engine; see `fail` for a retry.",
        ),
    ] = None,
    task_id: TaskIdOption = None,
    epoch: EpochOption = None,
    held: HeldOption = False,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Acknowledge a task of the worker with a result or an error; print true, or false (not this worker's).

    Name the task with --task-id and --epoch, as fetch printed them; --held acks whatever task the
    worker holds.
    """
    if result is not None and error is not None:
        raise typer.BadParameter("give --result or --error, not both", param_hint="--result / --error")
    result_value = parse_json(result, "--result") if result is not None else None
    error_value = parse_json(error, "--error") if error is not None else None
    if error is not None and error_value is None:
        raise typer.BadParameter("the error must not be null", param_hint="--error")
    _check_named(task_id, epoch, held)

    async def use(w: Worker) -> bool:
        return await w.ack(result_value, error=error_value, task_id=task_id, epoch=epoch, held=held)

    typer.echo("true" if _worker_call(service, worker, amqp_url, timeout, use) else "false")


@app.command()
def extend(
    service: ServiceArgument,
    worker: Annotated[str, typer.Option("--worker", help="The worker id that fetched the task.")],
    ttr: Annotated[
        int | None,
        typer.Option("--ttr", min=100, help="Time to recover, ms: the new lease, from now (default: the bridge's)."),
    ] = None,
    task_id: TaskIdOption = None,
    epoch: EpochOption = None,
    held: HeldOption = False,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Renew the lease of a task of the worker; print true, or false (the task is no longer this worker's).

    Name the task with --task-id and --epoch, as fetch printed them; --held renews whatever task
    the worker holds.
    """
    _check_named(task_id, epoch, held)

    async def use(w: Worker) -> bool:
        return await w.extend(ttr, task_id=task_id, epoch=epoch, held=held)

    typer.echo("true" if _worker_call(service, worker, amqp_url, timeout, use) else "false")


@app.command("fail")
def fail_task(
    service: ServiceArgument,
    worker: Annotated[str, typer.Option("--worker", help="The worker id that fetched the task.")],
    error: Annotated[
        str | None, typer.Option("--error", metavar="JSON", help="Why (JSON), kept as the task's last error.")
    ] = None,
    retry_in: Annotated[
        int | None,
        typer.Option(
            "--retry-in",
            metavar="MS",
            min=0,
            max=86_400_000,
            help="Deliver it again after this many ms (default: backoff).",
        ),
    ] = None,
    task_id: TaskIdOption = None,
    epoch: EpochOption = None,
    held: HeldOption = False,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Give a task of the worker back after a technical failure: it comes back later, or is parked at its
    delivery limit. Print {id, deliveries, parked, retryAt}, or false (the task is no longer this worker's).

    Name the task with --task-id and --epoch, as fetch printed them; --held gives back whatever task
    the worker holds. A business error that completes the task is `ack --error`.
    """
    error_value = parse_json(error, "--error") if error is not None else None
    _check_named(task_id, epoch, held)

    async def use(w: Worker) -> FailOutcome | None:
        return await w.fail(error_value, retry_in_ms=retry_in, task_id=task_id, epoch=epoch, held=held)

    outcome = _worker_call(service, worker, amqp_url, timeout, use)
    if outcome is None:
        typer.echo("false")
        return
    out = {
        "id": outcome.task_id,
        "deliveries": outcome.deliveries,
        "parked": outcome.parked,
        "retryAt": outcome.retry_at,
    }
    typer.echo(json.dumps(out))


@app.command()
def cancel(
    service: ServiceArgument,
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The task's id (as add printed it).")],
    request_id: Annotated[
        str | None,
        typer.Option(
            "--request-id",
            help="The request's id: a re-run with the id of one that got no answer answers true if that one "
            "cancelled the task (default: a new one, printed with such an error).",
        ),
    ] = None,
    owner: OwnerOption = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Cancel a task (ready, delayed, in flight or parked); print true, or false (already finished or unknown)."""
    _check_task_ids([task_id], "TASK_ID")
    _check_service(service)
    _check_id(request_id, "--request-id")
    rid = request_id if request_id is not None else f"cli-{uuid.uuid4()}"

    async def use(engine: Engine) -> bool:
        return await engine.cancel(service, task_id, request_id=rid)

    # Without the request's id, a re-run after no answer printed false ("already finished") for
    # a task the first copy had cancelled.
    again = f"run it again with --request-id {shlex.quote(rid)}: true if this request cancelled it"
    what = f"cancel: cancelling task {task_id} of service {service!r}"
    typer.echo(
        "true" if _engine_call(owner, amqp_url, timeout, use, changing=_Changing(what, lambda: again)) else "false"
    )


@app.command()
def purge(
    service: ServiceArgument,
    yes: Annotated[bool, typer.Option("--yes", help="Really cancel every ready task of the queue.")] = False,
    owner: OwnerOption = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Cancel the queue's tasks claimable now: ready ones, and those whose lease ran out (a late ack
    of one is then false); never a running lease, delayed or parked tasks. Print {"purged": n} (and
    "more": true when it stopped short: ready tasks may remain, exit code 3)."""
    _check_service(service)
    if not yes:
        raise typer.BadParameter(
            f"purge cancels every ready task of {service!r} for good: add --yes to do it", param_hint="--yes"
        )

    done = _Done("purged")
    short: list[bool] = []

    async def use(engine: Engine) -> int:
        return await engine.purge(service, progress=done.add, stopped_short=lambda: short.append(True))

    what = f"purge: cancelling every ready task of service {service!r}"
    purged = _engine_call(owner, amqp_url, timeout, use, changing=_Changing(what), done=done)
    if short:
        # The count alone read as "the queue is purged" while ready tasks remained.
        typer.echo(
            "purge stopped short: its last request looked at as many entries as one may and cancelled "
            "none; ready tasks may remain (run it again later)",
            err=True,
        )
        typer.echo(json.dumps({"purged": purged, "more": True}))
        # Not 0: `purge --yes && deploy` went on with ready tasks still queued (found by review).
        raise typer.Exit(PARTIAL_EXIT)
    typer.echo(json.dumps({"purged": purged}))


def _stats_doc(s: ServiceStats) -> dict[str, object]:
    return {
        "serviceId": s.service_id,
        "ready": s.ready,
        "inFlight": s.in_flight,
        "delayed": s.delayed,
        "parked": s.parked,
        "oldestReadyAgeMs": s.oldest_ready_age_ms,
    }


@app.command("queue-stats")
def queue_stats(
    service: Annotated[
        str | None,
        typer.Argument(metavar="SERVICE", help="The queue's serviceId (default: every queue of the owner)."),
    ] = None,
    owner: OwnerOption = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Ask the bridge for queue counts (ready, inFlight, delayed, parked); print {"services": [...]}.

    `stats` counts a queue by reading Cassandra directly, without a bridge.
    """

    if service is not None:
        _check_service(service)

    async def use(engine: Engine) -> list[ServiceStats]:
        return await engine.stats(service)

    services = _engine_call(owner, amqp_url, timeout, use)
    unavailable = list(getattr(services, "unavailable", []))
    doc: dict[str, object] = {"services": [_stats_doc(s) for s in services]}
    if unavailable:
        doc["unavailable"] = unavailable
    typer.echo(json.dumps(doc))
    if unavailable:
        # The counts printed are not all the owner's: a script must not read them as complete.
        listed = ", ".join(unavailable[:10])
        message = f"counts of {len(unavailable)} queues could not be read now (ask again): {listed}"
        fail(message, PARTIAL_EXIT)


def _parked_doc(t: ParkedTask) -> dict[str, object]:
    return {
        "id": t.id,
        "deliveries": t.deliveries,
        "reason": t.reason,
        "lastError": t.last_error,
        "parkedAt": t.parked_at,
        "addedAt": t.added_at,
        "hasToken": t.has_token,
        **({"lastErrorOmitted": True} if t.last_error_omitted else {}),
    }


@app.command()
def parked(
    service: ServiceArgument,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="List at most this many tasks.")] = 100,
    after: Annotated[
        str | None,
        typer.Option(
            "--after",
            metavar="TASK_ID",
            help='Go on after this task: the "after" an earlier listing printed.',
            show_default=False,
        ),
    ] = None,
    owner: OwnerOption = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """List the queue's parked tasks (never their values); print {"tasks": [...]}. When more may be
    parked past them, also "more": true and "after": the TASK_ID to give --after for the next page
    (exit code 3)."""
    _check_service(service)
    if after is not None:
        _check_task_ids([after], "--after")

    async def use(engine: Engine) -> ParkedPage:
        # One more than asked (within the contract's 1,000): a list of exactly --limit tasks is
        # then known complete (flagged "more", it failed `set -e` scripts on a complete list).
        return await engine.parked_page(service, min(limit + 1, 1000), after=after)

    page = _engine_call(owner, amqp_url, timeout, use)
    tasks, next_after = page.tasks, page.after
    more = next_after is not None or len(tasks) > limit
    if len(tasks) > limit:
        tasks = tasks[:limit]
        next_after = tasks[-1].id  # the next page starts past the last one listed
    docs = [_parked_doc(t) for t in tasks]
    if not page.paged:
        # A bridge before contract 1.11 cannot page, and says nothing of what is past its 1,000.
        more = more or len(tasks) >= 1000
        if more:
            typer.echo(
                f"parked: {len(tasks)} listed, more may be parked (the bridge is older than contract 1.11 and "
                "cannot list past them: redrive or discard what is listed, then list again)",
                err=True,
            )
            typer.echo(json.dumps({"tasks": docs, "more": True}))
            raise typer.Exit(PARTIAL_EXIT)
    elif more:
        # A script reading the list took it for every parked task (a triage that filtered it found
        # nothing past the first --limit, and exited 0): said, and not 0 (found by review).
        typer.echo(f"parked: {len(tasks)} listed, more may be parked: --after {next_after} lists them", err=True)
        typer.echo(json.dumps({"tasks": docs, "more": True, "after": next_after}))
        raise typer.Exit(PARTIAL_EXIT)
    typer.echo(json.dumps({"tasks": docs}))


@app.command()
def redrive(
    service: ServiceArgument,
    task_ids: Annotated[
        list[str] | None, typer.Argument(metavar="TASK_ID", help="Parked tasks to put back.", show_default=False)
    ] = None,
    all_parked: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Put back every task parked when it starts (1000 a request, until none is left); tasks "
            "parked again meanwhile (a worker still failing them) stay parked.",
        ),
    ] = False,
    parked_before: Annotated[
        str | None,
        typer.Option(
            "--parked-before",
            metavar="ISO8601",
            help="With --all: only tasks parked before this time (the bridge's clock). To go on with a --all "
            "that failed part way, give the bound and --after its error printed.",
            show_default=False,
        ),
    ] = None,
    after: Annotated[
        str | None,
        typer.Option(
            "--after",
            metavar="TASK_ID",
            help="With --all: go on after this task of the parked index.",
            show_default=False,
        ),
    ] = None,
    owner: OwnerOption = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Put parked tasks back in the queue, their delivery count starting again; print {"redriven": n}.

    The bridge answers once they are back, at BRIDGE_REDRIVE_RATE a second: the reply is awaited
    --timeout plus that long (set BRIDGE_REDRIVE_RATE as the bridges have it; at a high rate,
    Cassandra's writes take longer than the pace: give a large redrive a longer --timeout).
    --all asks for 1000 at a time until every task parked when it started is back, and ends even
    while workers still fail what comes back: those parked again after it started stay parked
    (the bound is the bridge's clock; a bridge before contract 1.9 is asked until it answers 0).
    If a later request fails, the error prints the command that goes on with the same bound: a
    plain re-run takes a new one, and puts back again what workers parked since.
    """
    if all_parked == bool(task_ids):
        raise typer.BadParameter("give TASK_IDs or --all (exactly one)", param_hint="TASK_ID / --all")
    if not all_parked and (parked_before is not None or after is not None):
        raise typer.BadParameter("--parked-before and --after go with --all", param_hint="--parked-before / --after")
    when = _parked_before(parked_before)
    if after is not None:
        _check_task_ids([after], "--after")
    ids = _check_task_ids(task_ids or [], "TASK_ID")
    _check_service(service)
    # The bridge answers only once it has put them all back, at BRIDGE_REDRIVE_RATE a second: the
    # reply is awaited that much longer (at the default rate's wait, a slower bridge's success
    # would be reported as no reply).
    rate = settings_or_exit().redrive_rate

    done = _Done("redriven")

    def went_to(bound: str, last: str) -> None:
        done.resume = _resume_redrive(service, owner, amqp_url, timeout, bound, last)

    async def use(engine: Engine) -> int:
        if all_parked:
            return await engine.redrive(
                service,
                all=True,
                redrive_rate=rate,
                progress=done.add,
                parked_before=when,
                after=after,
                position=went_to,
            )
        total = 0
        for chunk in _chunks(ids):
            count = await engine.redrive(service, chunk, redrive_rate=rate)
            total += count
            done.add(count)
        return total

    # Named or not, a redrive changes tasks: a reply that does not come says the outcome is
    # unknown (the bridge may still be pacing it), not "is a bridge consuming?".
    if all_parked:
        what = f"redrive --all: putting back every parked task of service {service!r}"
        changing = _Changing(what, lambda: "go on as below" if done.resume else "run it again to continue")
    else:
        what = f"redrive: putting back {len(ids)} parked task(s) of service {service!r}"
        changing = _Changing(what)
    redriven = _engine_call(owner, amqp_url, timeout, use, changing=changing, done=done)
    typer.echo(json.dumps({"redriven": redriven}))


def _resume_redrive(
    service: str, owner: str | None, amqp_url: str | None, timeout: float, bound: str, after: str
) -> str:
    """The command line that goes on with an interrupted ``redrive --all`` (the URL never: it
    holds the password; the operator gives it again if it was on the command line)."""
    words = ["queue-bridge", "redrive", "--all", "--parked-before", bound, "--after", after]
    if owner is not None:
        words += ["--owner", owner]
    if amqp_url is not None:
        words += ["--amqp-url", "URL"]
    # The service last, after "--": one that begins with "-" is not read as an option.
    words += ["--timeout", repr(timeout), "--", service]
    return shlex.join(words)


def _parked_before(text: str | None) -> str | None:
    """``--parked-before`` checked as the bridge checks it (a usage error here, exit code 2)."""
    if text is None:
        return None
    from bridge.client.rpc import iso_not_before

    try:
        return iso_not_before(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--parked-before") from None


#: At most this many ids a redrive or discard request names (the bridge refuses more).
IDS_PER_REQUEST = 1000


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[i : i + IDS_PER_REQUEST] for i in range(0, len(ids), IDS_PER_REQUEST)]


def _check_task_ids(ids: Sequence[str], param: str) -> list[str]:
    """Task ids as the bridge takes them (version-1 time UUIDs), checked before anything is sent:
    a typo was refused by the bridge (exit 1) after the "about to act" notice."""
    from bridge.domain.models import a_task_id

    for text in ids:
        try:
            a_task_id(uuid.UUID(text))
        except ValueError:
            raise typer.BadParameter(
                f"{text!r} is not a task id (a version-1 time UUID, as add printed it)", param_hint=param
            ) from None
    return list(ids)


def _check_service(service: str) -> None:
    """A serviceId as the bridge takes it (the same rule), checked before anything is sent."""
    from pydantic import TypeAdapter, ValidationError

    from bridge.domain.models import Identifier

    try:
        TypeAdapter(Identifier).validate_python(service)
    except ValidationError as exc:
        why = exc.errors()[0]["msg"]
        raise typer.BadParameter(f"not a serviceId the bridge takes: {why}", param_hint="SERVICE") from None


@app.command()
def discard(
    service: ServiceArgument,
    task_ids: Annotated[list[str], typer.Argument(metavar="TASK_ID", help="Parked tasks to drop for good.")],
    owner: OwnerOption = None,
    amqp_url: AmqpUrlOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Drop parked tasks for good (only parked ones); print {"discarded": n}. More than 1000 ids go
    as several requests."""
    ids = _check_task_ids(task_ids, "TASK_ID")
    _check_service(service)
    done = _Done("discarded")

    async def use(engine: Engine) -> int:
        total = 0
        for chunk in _chunks(ids):
            count = await engine.discard(service, chunk)
            total += count
            done.add(count)
        return total

    what = f"discard: dropping {len(ids)} parked task(s) of service {service!r} for good"
    typer.echo(
        json.dumps({"discarded": _engine_call(owner, amqp_url, timeout, use, changing=_Changing(what), done=done)})
    )
