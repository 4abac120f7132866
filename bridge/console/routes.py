"""The console's routes on the gateway app: the page (public, no data) and its JSON (keys required).

============================================================  ===========================================
``GET  /console``                                             the page (inline JS/CSS; strict CSP)
``GET  /console/api/session``                                 the caller: key id, owner, trusted, write
``GET  /console/api/services``                                every service of the owner, with its counts
``GET  /console/api/metrics``                                 this bridge's adds/completions/redeliveries
                                                              per minute, the last hour
``GET  /console/api/queues/{serviceId}/tasks/{taskId}``       one task's history (never its value); 404
``GET  /console/api/queues/{serviceId}/parked?limit=``        parked tasks (no lastError: that is data; none
                                                              is even read)
``POST /console/api/queues/{serviceId}/redrive``              ``{"taskIds": [...]}`` or ``{"all": true}`` (and
                                                              ``parkedBefore``, ``after``: as on the wire)
``POST /console/api/queues/{serviceId}/discard``              ``{"taskIds": [...]}``
============================================================  ===========================================

Identity is the gateway's (its middleware authenticates every path but the page; ``X-Owner`` for
trusted keys). Redrive and discard answer 403 unless ``BRIDGE_CONSOLE_WRITE`` is true. Replies are
the gateway's: ``{"result": ...}`` or ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import importlib.resources
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import suppress
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from bridge.config import Settings
from bridge.console import CONSOLE_API, CONSOLE_PATH
from bridge.console.history import Counters, MetricsHistory
from bridge.domain.errors import BadRequest
from bridge.domain.lifecycle import TaskInfo
from bridge.domain.models import DiscardRequest, Identifier, ParkedRequest, RedriveRequest, TaskId, parse
from bridge.errors import BridgeError
from bridge.gateway.errors import Forbidden, NotFound
from bridge.gateway.server import KEY, GatewayServer, _check_service_segment
from bridge.transport import wire
from bridge.transport.errors import Busy

log = logging.getLogger("bridge.console")
_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)

QUEUE_PATH = CONSOLE_API + "/queues/{serviceId}"
SERVICE_SEGMENT = QUEUE_PATH.split("/").index("{serviceId}")  # where the path names its queue
JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
LIMIT_PATTERN = re.compile(r"[0-9]{1,6}")
STATS_CONCURRENCY = 16  # services whose counts /services reads at once
# How long one read of an owner's counts (or of a queue's parked list) answers every console tab
# polling it on this bridge, and how many such reads are kept. Each open tab read every service's
# counts and the parked indexes every 2 s, nothing shared: six operators opening the console in an
# incident multiplied the reads of a Cassandra already under strain, and took the owner's slots
# for long requests from its stats, purges and discards (found by review, 2026-12-07).
SHARED_READ_TTL_S = 5.0
SHARED_READS_KEPT = 1_000
PAGE_PARKED_LIMIT = 100  # what the page asks for: the one parked listing shared (other limits read alone)
READ_ONLY = "the console is read-only here (BRIDGE_CONSOLE_WRITE=false); redrive and discard are off"


class TaskRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    service_id: Identifier = Field(alias="serviceId")
    task_id: TaskId = Field(alias="taskId")


def _page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy: only its own inline script and style (by hash),
    requests to this origin only, nothing else loaded from anywhere."""
    page = importlib.resources.files("bridge.console").joinpath("page.html").read_bytes()

    def hashes(tag: str) -> str:
        found = re.findall(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), page, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in found)

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, csp


class SharedReads:
    """The console's polled reads, one at a time per key, each answering every request for that key
    for ``SHARED_READ_TTL_S`` after it began (and every request that came while it ran). A read
    that failed is not kept: the next request reads again. A read runs to its end even if the
    request that began it goes away (the others may be waiting for it), as the gateway's work
    does: ``track`` hands it to the gateway's stop, which waits for it or cancels it before the
    store closes."""

    def __init__(self, now: Callable[[], float], track: Callable[[asyncio.Task[Any]], None]) -> None:
        self._now = now
        self._track = track
        self._reads: OrderedDict[tuple[str, ...], tuple[float, asyncio.Task[Any]]] = OrderedDict()

    async def get(self, key: tuple[str, ...], read: Callable[[], Awaitable[_T]]) -> _T:
        now = self._now()
        kept = self._reads.get(key)
        if kept is not None and (not kept[1].done() or now - kept[0] < SHARED_READ_TTL_S):
            return await self._answer(kept[1])
        self._drop_stale(now)
        task = asyncio.ensure_future(read())
        self._track(task)
        self._reads.pop(key, None)  # to the end: the order reads began in
        self._reads[key] = (now, task)
        # Only answers are kept: a failure (its traceback holding every waiter's frames) goes at once.
        task.add_done_callback(functools.partial(self._settled, key))
        return await self._answer(task)

    @staticmethod
    async def _answer(task: asyncio.Task[_T]) -> _T:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            handler = asyncio.current_task()
            if not task.cancelled() or (handler is not None and handler.cancelling()):
                raise  # this request's own handler was cancelled (its client went)
            # The read itself was cut at the gateway's stop deadline: said as the gateway's own
            # work cut there is (503, retry elsewhere), not counted as the client's error.
            raise Busy("the bridge is shutting down; retry (another bridge may answer)") from None

    def _settled(self, key: tuple[str, ...], task: asyncio.Task[Any]) -> None:
        error = None if task.cancelled() else task.exception()  # retrieved: asyncio warns of none
        if error is not None and not isinstance(error, BridgeError):
            # Maybe awaited by nobody now (its tabs reloaded): said here, or by nobody.
            log.error("a shared console read failed", exc_info=error)
        failed = task.cancelled() or error is not None
        kept = self._reads.get(key)
        if failed and kept is not None and kept[1] is task:
            del self._reads[key]

    def _drop_stale(self, now: float) -> None:
        """Answers past their time go; past SHARED_READS_KEPT, the oldest answers too (a read still
        running is never dropped: it would be started again beside itself, in another slot)."""
        for k in [k for k, (began, task) in self._reads.items() if task.done() and now - began >= SHARED_READ_TTL_S]:
            del self._reads[k]
        excess = len(self._reads) + 1 - SHARED_READS_KEPT
        if excess > 0:
            for k in [k for k, (_, task) in self._reads.items() if task.done()][:excess]:
                del self._reads[k]

    def forget(self, owner: str) -> None:
        """An owner's redrive or discard on this bridge: its next reads here show what it did."""
        for key in [k for k in self._reads if k[1] == owner]:
            del self._reads[key]


class Console:
    """The console of one gateway: its routes, and the chart's sampler (runs while the gateway does)."""

    def __init__(self, gateway: GatewayServer, settings: Settings, counters: Counters | None) -> None:
        self.gateway = gateway
        self.queue = gateway.queue
        self.write = settings.console_write
        self.history = MetricsHistory(counters, gateway.queue.clock.now_ms)
        self.reads = SharedReads(lambda: asyncio.get_running_loop().time(), gateway.track)
        self._page, self._csp = _page()

    def install(self, app: web.Application) -> None:
        r = app.router
        # The gateway's answer to ``Expect`` (aiohttp's own, before any middleware, told an
        # unauthenticated client announcing a gigabyte to send it).
        get = functools.partial(r.add_get, allow_head=False, expect_handler=self.gateway.expect)
        post = functools.partial(r.add_post, expect_handler=self.gateway.expect)
        # Named "<method>.console" where the contract has the method: observed like the gateway's
        # requests (queue_bridge_requests_total{method}); the others are not observed.
        get(CONSOLE_PATH, self.page)
        get(CONSOLE_API + "/session", self.session)
        get(CONSOLE_API + "/services", self.services, name="stats.console")
        get(CONSOLE_API + "/metrics", self.metrics)
        get(QUEUE_PATH + "/tasks/{taskId}", self.task)
        get(QUEUE_PATH + "/parked", self.parked, name="parked.console")
        post(QUEUE_PATH + "/redrive", self.redrive, name="redrive.console")
        post(QUEUE_PATH + "/discard", self.discard, name="discard.console")
        app.cleanup_ctx.append(self._sampling)

    async def _sampling(self, app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self.history.run(), name="console metrics history")
        yield
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    # -- handlers ----------------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        headers = {
            "Content-Security-Policy": self._csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-cache",
        }
        return web.Response(body=self._page, content_type="text/html", charset="utf-8", headers=headers)

    async def session(self, request: web.Request) -> web.Response:
        key = request[KEY]
        owner = self._owner(request)
        return _json({"keyId": key.id, "owner": owner, "trusted": key.trusted, "write": self.write})

    async def services(self, request: web.Request) -> web.Response:
        owner = self._owner(request)

        async def read() -> Any:
            # WorkQueue.stats reads at most STATS_CONCURRENCY services at a time (all of up to 1,000
            # at once was thousands of Cassandra reads in one burst). One slot per read, not per tab.
            with self.gateway.capacity.slot("stats", owner):
                return wire.stats(await self.queue.stats(owner, None, partial=True))["result"]

        return _json(await self.reads.get(("services", owner), read))

    async def metrics(self, request: web.Request) -> web.Response:
        self._owner(request)  # a bad X-Owner is refused here too
        return _json(self.history.series())

    async def task(self, request: web.Request) -> web.Response:
        owner = self._owner(request)
        req = parse(TaskRequest, {"serviceId": self._service(request), "taskId": request.match_info["taskId"]})
        (task_id,) = self._task_ids([req.task_id])
        info = await self.queue.task_info(owner, req.service_id, task_id)
        if info is None:
            raise NotFound(f"no task {req.task_id} in {req.service_id}")
        return _json({"task": _task(req.service_id, info)})

    async def parked(self, request: web.Request) -> web.Response:
        owner = self._owner(request)
        body: dict[str, Any] = {"serviceId": self._service(request)}
        limit = request.query.get("limit")
        if limit is not None:
            # ASCII digits only: str.isdigit() accepts "²", which int() then refuses.
            if not LIMIT_PATTERN.fullmatch(limit):
                raise BadRequest("limit must be a number from 1 to 1000")
            body["limit"] = int(limit)
        req = parse(ParkedRequest, body)

        async def read() -> Any:
            # Without errors: the worker's error may carry task data and is not shown here, so none
            # is read nor decrypted (up to 100 of them every 2 s per open console, all thrown away).
            with self.gateway.capacity.slot("parked", owner):
                found = await self.queue.lifecycle.parked(owner, req.service_id, req.limit, with_errors=False)
            tasks = wire.parked(found)["result"]["tasks"]
            for t in tasks:
                t.pop("lastError", None)
            return {"tasks": tasks}

        if req.limit != PAGE_PARKED_LIMIT:
            return _json(await read())  # a script's own limit: read alone (1,000 limits kept 1,000 lists)
        return _json(await self.reads.get(("parked", owner, req.service_id), read))

    # Writes run as the gateway's do (``GatewayServer.shielded``): a tab closed mid-way does not
    # cut an unpark or a discard in two (counts drifting, an index row left), and the gateway's
    # stop waits for them before the store closes.
    async def redrive(self, request: web.Request) -> web.Response:
        owner, req = await self._write(request, RedriveRequest)
        if req.task_ids is not None:
            ids = self._task_ids(req.task_ids)
            n = await self._shielded(request, owner, "redrive", self.queue.redrive(owner, req.service_id, ids))
            return _json({"redriven": n})
        after = None if req.after is None else self._task_ids([req.after])[0]
        round_ = self.queue.redrive_all(owner, req.service_id, req.parked_before_ms(), after)
        done = await self._shielded(request, owner, "redrive", round_)
        return _json(wire.redriven_round(done)["result"])

    async def discard(self, request: web.Request) -> web.Response:
        owner, req = await self._write(request, DiscardRequest)
        ids = self._task_ids(req.task_ids)
        n = await self._shielded(request, owner, "discard", self.queue.discard(owner, req.service_id, ids))
        return _json({"discarded": n})

    # -- helpers -----------------------------------------------------------------------------------
    async def _shielded(self, request: web.Request, owner: str, method: str, work: Coroutine[Any, Any, _T]) -> _T:
        """``work`` run to its end as the gateway's writes are, in one of the bridge's slots for
        long lifecycle requests (shared with AMQP and the gateway's API: ``Capacity``), held until
        it ends even when the tab is closed; ``Busy`` (503), nothing done, when they are taken."""

        async def in_slot() -> _T:
            try:
                with self.gateway.capacity.slot(method, owner):
                    return await work
            finally:
                work.close()  # never started when the slot was refused; a no-op once it ran
                self.reads.forget(owner)  # the next poll shows what it did

        return await self.gateway.shielded(request, method, in_slot())

    @staticmethod
    def _service(request: web.Request) -> str:
        """The path's serviceId, checked as the gateway's is (its escapes must decode to UTF-8, in
        one segment: ``%ff`` was the queue ``%FF`` here, which the gateway and AMQP refuse)."""
        service = request.match_info["serviceId"]
        _check_service_segment(request.rel_url.raw_path, service, SERVICE_SEGMENT)
        return service

    def _owner(self, request: web.Request) -> str:
        return GatewayServer._owner(request[KEY], request.headers.get("X-Owner"))

    @staticmethod
    def _task_ids(raw: list[str]) -> list[uuid.UUID]:
        """The ids of a parsed request (the models accept only task ids: time UUIDs)."""
        return [uuid.UUID(t) for t in raw]

    async def _write(self, request: web.Request, model: type[_M]) -> tuple[str, _M]:
        """The owner and the parsed request. Only the model outlives this: the parsed body (up to
        ~24 times the body's size in objects, unknown fields included) was held through a paced
        redrive; the gateway's requests drop it as soon, too."""
        owner = self._owner(request)
        if not self.write:
            raise Forbidden(READ_ONLY)
        service = self._service(request)
        body = await self.gateway._read_json(request)
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        if "serviceId" in body and body["serviceId"] != service:
            raise BadRequest("the body's serviceId differs from the path's; leave it out of the body")
        req: _M = parse(model, {**body, "serviceId": service})
        return owner, req


def _json(result: Any) -> web.Response:
    response = web.Response(body=wire.encode(wire.reply(result)), headers=JSON_HEADERS)
    response.content_type = "application/json"
    return response


def _iso(ms: int | None) -> str | None:
    return None if ms is None else wire.iso(ms)


def _task(service: str, t: TaskInfo) -> dict[str, Any]:
    """What the console shows of a task: ids, state, deliveries, worker, times (never its value)."""
    return {
        "id": str(t.task_id),
        "serviceId": service,
        "state": t.state,
        "deliveries": t.deliveries,
        "maxDeliveries": t.max_deliveries,
        "worker": t.worker,
        "addedAt": _iso(t.added_at_ms),
        "dueAt": _iso(t.due_at_ms),
        "leaseExpiresAt": _iso(t.lease_expires_at_ms),
        "completedAt": _iso(t.completed_at_ms),
        "parkedAt": _iso(t.parked_at_ms),
        "parkReason": t.park_reason,
        "priority": t.priority,
        "hasToken": t.has_token,
    }
