"""The reply bodies of the wire contract, made from the domain's results.

One place for both doors of the bridge: the AMQP handlers (:mod:`bridge.transport.handlers`) and
the HTTP gateway (:mod:`bridge.gateway`) answer every request with the same JSON, built here:
``{"result": ...}`` (plus ``task`` for add, fetch, extend and fail) or
``{"error": {"code", "message"}}``. Nothing here touches a message or a connection.

:data:`LIFECYCLE` is the contract 1.4 RPCs as (request model, call of the domain queue that
returns the reply body): the AMQP lifecycle queue and the gateway run the same table.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from pydantic import BaseModel

from bridge.domain import jsonvalue, sealing
from bridge.domain.models import (
    AddCommand,
    CancelRequest,
    Delivery,
    DiscardRequest,
    ExtendRequest,
    FailRequest,
    ParkedRequest,
    QueueRequest,
    RedriveRequest,
    StatsRequest,
)
from bridge.domain.stats import ServiceStats, StatsFound
from bridge.domain.timeline import ms_of
from bridge.errors import BridgeError

if TYPE_CHECKING:
    from bridge.domain.lifecycle import Extended, Failed, ParkedTask, RedriveRound
    from bridge.domain.queue import WorkQueue

Body = dict[str, Any]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso(ms: int) -> str:
    """Milliseconds since the epoch as the contract writes times: ISO 8601, UTC, milliseconds.

    Exact, for every time a request may name (``models.instant``: years 1 to 9999 in UTC): no
    float, and not the platform's ``gmtime``, which some refuse before 1970."""
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def reply(result: Any = None, *, extra: dict[str, Any] | None = None) -> Body:
    """``{"result": ...}`` plus ``extra`` (``task``)."""
    body: Body = {"result": result}
    if extra:
        body.update(extra)
    return body


def error(err: BridgeError) -> Body:
    return {"error": {"code": str(err.code), "message": err.message}}


def encode(body: Body) -> bytes:
    """The body as JSON bytes (values and errors that came back from storage are spliced in as they are)."""
    return orjson.dumps(body)


# -- one builder per method -------------------------------------------------------------------------
def added(task_id: str, cmd: AddCommand) -> Body:
    task: dict[str, Any] = {"id": task_id}
    if cmd.delay_ms is not None or cmd.not_before is not None:
        task["notBefore"] = iso(ms_of(uuid.UUID(task_id)))  # a delayed task's id is its due time
    return reply(True, extra={"task": task})


def fetched(delivery: Delivery | None) -> Body:
    if delivery is None:
        return reply(None)
    task = {
        "id": delivery.task_id,
        "epoch": delivery.epoch,
        "deliveries": delivery.deliveries,
        "leaseExpiresAt": iso(delivery.lease_expires_at_ms),
        "hasToken": delivery.has_token,
    }
    return reply(jsonvalue.fragment(delivery.value_json), extra={"task": task})


def acked(done: bool, next_reply: Body | None = None) -> Body:
    """With ``next_reply`` (1.6, the ack asked for ``next``): the fetch reply, or error, of the
    worker's next task, beside the ack's own answer."""
    return reply(done) if next_reply is None else reply(done, extra={"next": next_reply})


def extended(done: Extended | None) -> Body:
    if done is None:
        return reply(False)
    task = {"id": str(done.task_id), "epoch": done.epoch, "leaseExpiresAt": iso(done.lease_until_ms)}
    return reply(True, extra={"task": task})


def failed(done: Failed | None) -> Body:
    if done is None:
        return reply(False)
    task = {
        "id": str(done.task_id),
        "deliveries": done.deliveries,
        "parked": done.parked,
        "retryAt": None if done.retry_at_ms is None else iso(done.retry_at_ms),
    }
    return reply(True, extra={"task": task})


def cancelled(done: bool) -> Body:
    return reply(done)


def purged(purged: int, more: bool) -> Body:
    return reply({"purged": purged, "more": more})


def stats(found: list[ServiceStats]) -> Body:
    services = [
        {
            "serviceId": s.service,
            "ready": s.ready,
            "inFlight": s.in_flight,
            "delayed": s.delayed,
            "parked": s.parked,
            "oldestReadyAgeMs": s.oldest_ready_age_ms,
        }
        for s in found
    ]
    # Only when some queue's counts could not be read: an answer of 1.4-1.9's shape otherwise.
    unavailable = found.unavailable if isinstance(found, StatsFound) else []
    return reply({"services": services, **({"unavailable": unavailable} if unavailable else {})})


def parked(found: list[ParkedTask], after: uuid.UUID | None = None) -> Body:
    """``after`` (1.11): where the listing stopped short of the index's end, for the caller to send
    back for the next page; null: it read to the end. Always there, so that a client can tell a
    complete page from the reply of a bridge before 1.11, which ignores a request's ``after``
    (paging through one, a client got the first page again; a caller before 1.11 ignores it)."""
    tasks = []
    for t in found:
        doc: dict[str, Any] = {
            "id": str(t.task_id),
            "deliveries": t.deliveries,
            "reason": t.reason,
            "lastError": None if t.last_error_json is None else jsonvalue.fragment(t.last_error_json),
            "parkedAt": iso(t.parked_at_ms),
            "addedAt": iso(ms_of(t.task_id)),
            "hasToken": t.has_token,
        }
        if t.last_error_omitted:  # (1.7) only when true: the listing's errors filled their budget
            doc["lastErrorOmitted"] = True
        tasks.append(doc)
    return reply({"tasks": tasks, "after": None if after is None else str(after)})


def redriven(n: int) -> Body:
    return reply({"redriven": n})


def redriven_round(r: RedriveRound) -> Body:
    """(1.9) An ``all`` request's reply: also the bound it used, and where to go on if it stopped
    short, for the caller to send back (a caller of 1.4 reads ``redriven`` alone)."""
    result: dict[str, Any] = {"redriven": r.redriven, "parkedBefore": iso(r.parked_before_ms)}
    if r.after is not None:
        result["after"] = str(r.after)
    return reply(result)


def discarded(n: int) -> Body:
    return reply({"discarded": n})


# -- the lifecycle RPCs (contract 1.4): request model and domain call, for every transport ----------
Call = Callable[["WorkQueue", str, Any], Awaitable[Body]]


@dataclass(frozen=True, slots=True)
class Operation:
    model: type[BaseModel]
    call: Call  # (queue, owner, parsed request) -> reply body


async def _extend(queue: WorkQueue, owner: str, req: ExtendRequest) -> Body:
    return extended(await queue.extend(owner, req))


async def _fail(queue: WorkQueue, owner: str, req: FailRequest) -> Body:
    return failed(await queue.fail(owner, req))


async def _cancel(queue: WorkQueue, owner: str, req: CancelRequest) -> Body:
    return cancelled(await queue.cancel(owner, req.service_id, uuid.UUID(req.task_id)))


async def cancel_once(queue: WorkQueue, owner: str, req: CancelRequest, request_id: str | None) -> Body:
    """A cancel whose copies (a redelivery, a resend with the same id) all answer as the first."""
    return cancelled(await queue.cancel(owner, req.service_id, uuid.UUID(req.task_id), request_id=request_id))


async def _purge(queue: WorkQueue, owner: str, req: QueueRequest) -> Body:
    return purged(*await queue.purge(owner, req.service_id))


async def _stats(queue: WorkQueue, owner: str, req: StatsRequest) -> Body:
    return stats(await queue.stats(owner, req.service_id, partial=req.partial))


async def _parked(queue: WorkQueue, owner: str, req: ParkedRequest) -> Body:
    after = None if req.after is None else uuid.UUID(req.after)
    page = await queue.parked_page(owner, req.service_id, req.limit, after)
    return parked(page.tasks, page.after)


async def _redrive(queue: WorkQueue, owner: str, req: RedriveRequest) -> Body:
    if req.task_ids is not None:
        return redriven(await queue.redrive(owner, req.service_id, [uuid.UUID(t) for t in req.task_ids]))
    after = None if req.after is None else uuid.UUID(req.after)
    return redriven_round(await queue.redrive_all(owner, req.service_id, req.parked_before_ms(), after))


async def _discard(queue: WorkQueue, owner: str, req: DiscardRequest) -> Body:
    return discarded(await queue.discard(owner, req.service_id, [uuid.UUID(t) for t in req.task_ids]))


LIFECYCLE: dict[str, Operation] = {
    "extend": Operation(ExtendRequest, _extend),
    "fail": Operation(FailRequest, _fail),
    "cancel": Operation(CancelRequest, _cancel),
    "purge": Operation(QueueRequest, _purge),
    "stats": Operation(StatsRequest, _stats),
    "parked": Operation(ParkedRequest, _parked),
    "redrive": Operation(RedriveRequest, _redrive),
    "discard": Operation(DiscardRequest, _discard),
}


M = TypeVar("M", bound=BaseModel)


# A body at most this large keeps its parsed tree (some 24 times its bytes: 64 held at once, 25
# MiB at most): converting costs an ack about 3.6 us more (a half more than its parse), for nothing.
TREE_KEPT_MAX_BYTES = 16_384


def outcome_as_json(request: M, max_value_bytes: int, *, body_bytes: int | None = None) -> M:
    """An ack's result or error (a fail's error) as its JSON bytes, not the parsed tree, as an
    add's value (``handlers._as_json``): an ack is held through its reads, its compare-and-set and the
    retry of an unknown outcome, 64 at once, and 64 results of 1 MiB of small objects held as trees
    were 1.5 GiB, past a sidecar's 1 GiB limit (found by review, 2026-12-07). Other requests are
    returned as they are. The HTTP gateway's acks and fails are held the same way."""
    if body_bytes is not None and body_bytes <= TREE_KEPT_MAX_BYTES:
        return request
    fields = type(request).model_fields
    # An error wins over a result (``AckRequest.outcome``): the result is dropped, not encoded,
    # or a result that grew past the limit when written again (``1e15`` is 18 bytes as
    # ``1000000000000000.0``) refused an ack whose error was fine (found by the re-review).
    dropped = "result" if "result" in fields and getattr(request, "error", None) is not None else None
    update: dict[str, Any] = {
        name: None if name == dropped else jsonvalue.fragment(sealing.encode(tree, f"the {name}", max_value_bytes))
        for name in ("result", "error")
        if name in fields and (tree := getattr(request, name)) is not None
    }
    return request.model_copy(update=update) if update else request
