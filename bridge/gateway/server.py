"""The HTTP gateway: the AMQP contract over HTTP, one endpoint per method (aiohttp).

Each request is parsed with the same pydantic models as on AMQP, run against the same
:class:`~bridge.domain.queue.WorkQueue` calls, and answered with the same JSON
(:mod:`bridge.transport.wire`); errors map to HTTP statuses (:mod:`bridge.gateway.errors`).

- Identity: ``Authorization: Bearer qb_<id>_<secret>`` (:mod:`bridge.gateway.keys`), required on
  every path but ``GET /openapi.json`` and ``GET /console`` (public: the contract and the operator
  console's page, no data; :mod:`bridge.console`). A trusted key may name the
  owner with ``X-Owner``; any other key only its own owner (else 403).
- Bodies: ``application/json`` (415 otherwise), at most ``BRIDGE_MAX_VALUE_BYTES`` + 64 KiB: a
  larger one is refused with 413 from its ``Content-Length`` before it is read, or as soon as the
  bytes read pass the limit. An empty body is ``{}``; one not received whole is 400.
  ``GET /api/queue/stats`` reads no body.
- The AMQP headers have HTTP twins: ``X-Owner`` (``x-owner``), ``Idempotency-Key`` on add and
  cancel (the AMQP ``message_id``), ``traceparent`` (kept with the task; fetch answers a child of it).
- Requests are observed as the AMQP ones are (``queue_bridge_requests_total{method,outcome}``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from bridge.config import Settings
from bridge.console import CONSOLE_PATH
from bridge.console.history import Counters
from bridge.domain import jsonvalue
from bridge.domain.errors import BadRequest, PayloadTooLarge, Unavailable
from bridge.domain.fetching import RequestAbandoned, Requester
from bridge.domain.models import AckRequest, AddCommand, CancelRequest, FetchRequest, parse
from bridge.domain.queue import PendingAdd, WorkQueue
from bridge.errors import BridgeError, ErrorCode, wire_code
from bridge.gateway.endpoints import ENDPOINTS, OPENAPI_PATH, STATS_ALL, STATS_ALL_PATH, Endpoint
from bridge.gateway.errors import (
    Forbidden,
    HttpError,
    MethodNotAllowed,
    NotFound,
    UnsupportedMediaType,
    status_of,
)
from bridge.gateway.keys import ApiKey, KeyFile
from bridge.observability.metrics import METHODS
from bridge.observability.throttled import ThrottledWarning
from bridge.observability.tracing import child_traceparent, extract_traceparent
from bridge.transport import wire
from bridge.transport.capacity import Capacity
from bridge.transport.envelope import ENVELOPE_ALLOWANCE, OWNER_PATTERN
from bridge.transport.errors import Busy, observed_outcome
from bridge.transport.fate import fate_of

log = logging.getLogger("bridge.gateway")

Observer = Callable[[str, str, float], None]  # (method, outcome, seconds), as the AMQP transport's
Reply = tuple[wire.Body, Mapping[str, str] | None]
_R = TypeVar("_R")

OK = "ok"
# A request whose client hung up before its answer: a waiting fetch that stopped waiting (it claimed
# nothing). Shielded work that went on after the hang-up is counted by how it ended instead.
CLIENT_GONE = "client_gone"
KEY = web.RequestKey("qb.key", ApiKey)
# Set when a request's work goes on without its handler (the client hung up): that work, when it
# ends, is observed and frees its key's in-flight slot, not the middleware.
HANDED_OVER = web.RequestKey("qb.handed_over", bool)
STARTED = web.RequestKey("qb.started", float)
INTERNAL_MESSAGE = "internal error; see the bridge log"
# As AMQP's x-idempotency-key (bridge.transport.envelope): printable characters (Unicode), at most
# 255; empty: no key of the caller's own.
IDEMPOTENCY_PATTERN = re.compile(r"[^\x00-\x1f\x7f]{0,255}")
# Every JSON answer: never cached (the data is an owner's), never sniffed as another type.
JSON_HEADERS: Mapping[str, str] = {hdrs.CACHE_CONTROL: "no-store", hdrs.X_CONTENT_TYPE_OPTIONS: "nosniff"}
RETRY_AFTER_S = 1
# How long an add is retried in place (``Gateway._add``): an HTTP client waits on its request,
# so less than the AMQP handler's 30 s, which hold a delivery; past it the client is told 503.
ADD_RETRY_BUDGET_S = 10.0
MIN_SHUTDOWN_WAIT_S = 0.05
CHUNK = 65_536
PUBLIC_PATHS = frozenset({OPENAPI_PATH, CONSOLE_PATH})  # no data on either


@dataclass(frozen=True, slots=True)
class _PreparedAdd:
    """An add sealed before its write: its task, and its command without the value and token."""

    pending: PendingAdd
    cmd: AddCommand


class GatewayServer:
    """The gateway's aiohttp app; :meth:`start` listens, :meth:`stop` finishes in-flight requests."""

    def __init__(
        self,
        settings: Settings,
        queue: WorkQueue,
        observe: Observer,
        *,
        keys: KeyFile | None = None,
        metrics: Counters | None = None,
        capacity: Capacity | None = None,
    ) -> None:
        if keys is None:
            if settings.gateway_keys_file is None:
                raise ValueError("the gateway needs BRIDGE_GATEWAY_KEYS_FILE")
            keys = KeyFile(settings.gateway_keys_file)
        self.keys = keys
        self.queue = queue
        # The bridge's count of long lifecycle requests, shared with AMQP (and the console): a
        # flood of purges through the gateway takes no more of the store than one through AMQP.
        self.capacity = capacity or Capacity()
        self.observe = observe
        self.limit = settings.max_value_bytes + ENVELOPE_ALLOWANCE
        self.max_value_bytes = settings.max_value_bytes
        self.grace = settings.shutdown_grace
        self.read_timeout = settings.http_read_timeout
        self.max_in_flight = settings.gateway_max_in_flight_per_key
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._closing = False
        self._warn_add_retry = ThrottledWarning(log)  # an outage retries every add: said once a while
        self._warn_unread = ThrottledWarning(log)  # answers their clients did not take: cut
        self._shielded: set[asyncio.Future[Any]] = set()  # shielded requests still running
        self.console: Any = None  # bridge.console.routes.Console, once the app is built
        self._in_flight: dict[str, int] = {}  # requests in flight per key id (``_admit``)
        from bridge.gateway.openapi import document, dumps

        self._openapi = dumps(document())
        app = web.Application(middlewares=[self._middleware], client_max_size=self.limit)
        for ep in ENDPOINTS:
            app.router.add_post(ep.path, self._handler(ep), name=ep.method, expect_handler=self.expect)
        # Every route answers ``Expect`` itself (``expect``), the console's too.
        get = functools.partial(app.router.add_get, allow_head=False, expect_handler=self.expect)
        get(STATS_ALL_PATH, self._handler(STATS_ALL), name="stats.all")
        get(OPENAPI_PATH, self._openapi_doc, name="openapi")
        from bridge.console.routes import Console

        self.console = Console(self, settings, metrics)
        self.console.install(app)  # /console: the operator console (issue 11)
        # Last, so that it matches only what no route above does: a path of none (404), or a
        # method the path does not take (405). Unmatched, aiohttp answered ``Expect`` itself,
        # before any middleware: ``100 Continue`` to a client with no key announcing a gigabyte,
        # a plain-text 417 to any other expectation.
        app.router.add_route("*", "/{tail:.*}", self._unmatched, expect_handler=self.expect)
        self.app = app

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` and return the bound port."""
        if self._runner is not None:
            raise RuntimeError("the gateway is already started")
        # A handler is cancelled when its client hangs up: a long-poll fetch then stops waiting
        # (kept waiting, it claimed the next task for a reply nobody reads, leased to a gone
        # worker). The work itself is shielded from that cancellation (``shielded``): only a
        # fetch's wait is cut short, never a claim or a write under way.
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.grace,
            handler_cancellation=True,
            # A request that does not arrive within it (a connection left idle, or sent a byte at
            # a time: slowloris) is closed; aiohttp's own limit is an hour.
            keepalive_timeout=self.read_timeout,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("http gateway listening on %s:%d", host, self.port, extra={"keys": len(self.keys)})
        return self.port

    def closing(self) -> None:
        """From now on, new requests are answered ``unavailable`` (503) and those whose body was
        still arriving start no work: the first step of :meth:`stop`, taken at once."""
        self._closing = True

    async def stop(self, deadline: float | None = None) -> None:
        """Stop listening; requests in flight finish by ``deadline`` (the event loop's time;
        default: BRIDGE_SHUTDOWN_GRACE from now), new ones on open connections are answered
        ``unavailable``. Work still running then is cancelled: the store closes after this."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.grace
        self._closing = True
        runner, self._runner = self._runner, None
        if runner is not None:
            for site in list(runner.sites):  # no new connection: a balancer sends them elsewhere
                await site.stop()
        # Every request's work is tracked (``shielded``): it ends, and its handler answers, by the
        # deadline. The runner's own wait came first, and it waits its timeout twice (for the
        # handler, then again after cancelling it), then this wait: up to three graces in all.
        if self._shielded:
            await asyncio.wait(set(self._shielded), timeout=max(0.0, deadline - loop.time()))
        leftovers = set(self._shielded)
        for work in leftovers:  # past the deadline the store closes under them: end them first
            work.cancel()
        if leftovers:
            log.warning("%d gateway requests cut short at the shutdown deadline", len(leftovers))
            await asyncio.wait(leftovers)
        if runner is not None:
            # What is left is handlers without work of the store's (reading a body, a console
            # read): half the time left, which aiohttp waits twice. Never 0 (that is no limit).
            runner._shutdown_timeout = max(MIN_SHUTDOWN_WAIT_S, (deadline - loop.time()) / 2)
            await runner.cleanup()
        self.port = None

    # -- every request -----------------------------------------------------------------------------
    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.name or ""
        method = route.split(".", 1)[0]
        request[STARTED] = started
        outcome: str = ErrorCode.INTERNAL
        admitted: str | None = None
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(method=method or None, transport="http")
        try:
            if request.path not in PUBLIC_PATHS:  # no anonymous access anywhere else, not even to a 404
                key = self.keys.authenticate(request.headers.get(hdrs.AUTHORIZATION))
                request[KEY] = key
                structlog.contextvars.bind_contextvars(user=f"key:{key.id}")
                admitted = self._admit(key)
            if self._closing:
                raise Busy("the bridge is shutting down; retry (another bridge may answer)")
            response = await handler(request)
            outcome = OK
            if self._closing:
                response.force_close()  # answered while stopping: the next request goes elsewhere
            await self._answer(request, response)
            return response
        except asyncio.CancelledError:
            # The client hung up (handlers are cancelled then, ``start``), or the gateway stopped
            # past its grace: no answer goes out. Work under way goes on and is counted when it
            # ends (``shielded``); a request broken off before (its body not all sent) is the
            # client's doing, as a read cut short was before handler cancellation (nginx's 499).
            # (One that hung up while its answer was being written was served: ok.)
            if outcome != OK:
                outcome = ErrorCode.BAD_REQUEST
            raise
        except RequestAbandoned:
            # Its connection closed as it waited, before the handler's cancellation came: the
            # answer goes nowhere (no error of the bridge's, none of the client's request either).
            outcome = CLIENT_GONE
            return self._error(Unavailable("the client hung up"))
        except web.HTTPException as exc:  # the router's: no such path, wrong method
            err = self._router_error(request, exc)
            outcome = wire_code(err)
            return self._error(err)
        except Exception as exc:
            outcome = observed_outcome(exc, wire_code(exc))  # answered by its code, shedding counted apart
            return self._error(exc)
        finally:
            if not request.get(HANDED_OVER, False):
                self._release(admitted)
                # The queue's requests only: the contract's document and the console's pages were
                # counted as requests of an unknown method (an alert on those fired on a browser).
                if method in METHODS and method != "unknown":
                    self.observe(method, str(outcome), time.perf_counter() - started)

    async def _answer(self, request: web.Request, response: web.StreamResponse) -> None:
        """Write the answer now, and have it taken within ``BRIDGE_HTTP_READ_TIMEOUT``, else cut
        the connection. aiohttp writes a handler's response after the middleware and waits for
        the client to read it with no deadline (its keep-alive timer only runs between
        requests): a client that never read its answers (megabytes of a parked listing, a tiny
        receive window) held each one in the bridge's memory for ever, outside every limit (its
        key's in-flight slot was freed as the handler returned; it is freed after this now)."""
        try:
            async with asyncio.timeout(self.read_timeout):
                await response.prepare(request)
                await response.write_eof()
        except ConnectionError:
            # The client went as its answer was written (its hang-up not seen by aiohttp yet): the
            # request was served; aiohttp's own write ignores this quietly too.
            return
        except TimeoutError:
            transport = request.transport
            if transport is not None:
                transport.abort()  # its buffered answer is let go with it
            self._warn_unread.warning(
                "an answer was not taken within %g s (BRIDGE_HTTP_READ_TIMEOUT): connection cut", self.read_timeout
            )

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``, which aiohttp answers before any middleware: the client is told
        to send its body only when its key and the body's announced size are good; otherwise it
        gets the answer the request would get, at once, and the connection is closed (aiohttp's
        own handler told an unauthenticated client announcing a gigabyte to go ahead, and answered
        any other expectation with a plain-text 417 the contract does not know)."""
        expect = request.headers.get(hdrs.EXPECT, "")
        try:
            if expect.lower() != "100-continue":
                raise HttpError(f"unsupported Expect: {expect[:64]!r} (only 100-continue)", 417)
            if request.path not in PUBLIC_PATHS:
                self.keys.authenticate(request.headers.get(hdrs.AUTHORIZATION))
            length = request.content_length
            if length is not None and length > self.limit:
                raise PayloadTooLarge(f"the body is {length} bytes; the limit is {self.limit}")
        except BridgeError as exc:
            method = (request.match_info.route.name or "").split(".", 1)[0]
            if method:
                self.observe(method, str(observed_outcome(exc, wire_code(exc))), 0.0)
            response = self._error(exc)
            response.force_close()  # the body the client may send all the same is not read
            return response
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # as aiohttp's own: the response proper starts after it
        return None

    def _admit(self, key: ApiKey) -> str:
        """Count a request of ``key`` in flight; refused (503, ``Retry-After``) past the limit:
        one key's client (a runaway retry loop, thousands of long-polls) cannot take every
        connection and task of the bridge from the others."""
        n = self._in_flight.get(key.id, 0)
        if n >= self.max_in_flight:
            raise Busy(
                f"key {key.id!r} has {n} requests in flight, the limit (BRIDGE_GATEWAY_MAX_IN_FLIGHT_PER_KEY); retry"
            )
        self._in_flight[key.id] = n + 1
        return key.id

    def _release(self, key_id: str | None) -> None:
        if key_id is None:
            return
        n = self._in_flight.get(key_id, 0) - 1
        if n > 0:
            self._in_flight[key_id] = n
        else:
            self._in_flight.pop(key_id, None)

    @staticmethod
    def _router_error(request: web.Request, exc: web.HTTPException) -> BridgeError:
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allow = ", ".join(sorted(exc.allowed_methods))
            return MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allow}", allow)
        if isinstance(exc, web.HTTPNotFound):
            return NotFound(f"no such endpoint: {request.method} {request.path}; see {OPENAPI_PATH}")
        if exc.status == 413:
            return PayloadTooLarge("the body is too large")
        return HttpError(exc.reason, exc.status)

    def _error(self, exc: BaseException) -> web.Response:
        code = wire_code(exc)
        if code is ErrorCode.INTERNAL or not isinstance(exc, BridgeError):
            log.error("gateway request failed unexpectedly", exc_info=exc)
            err = BridgeError(INTERNAL_MESSAGE, ErrorCode.INTERNAL)
        else:
            err = exc
        status = status_of(exc) if isinstance(exc, BridgeError) else 500
        headers: dict[str, str] = {}
        if status == 401:
            headers[hdrs.WWW_AUTHENTICATE] = 'Bearer realm="queue-bridge"'
        elif status == 503:
            headers[hdrs.RETRY_AFTER] = str(RETRY_AFTER_S)
        elif isinstance(exc, MethodNotAllowed):
            headers[hdrs.ALLOW] = exc.allow
        if code is ErrorCode.INTEGRITY_ERROR:
            log.warning("gateway request refused: %s (%s)", code, err.message)
        else:
            log.debug("gateway request refused: %s (%s)", code, err.message)
        response = web.Response(status=status, body=wire.encode(wire.error(err)), headers={**JSON_HEADERS, **headers})
        response.content_type = "application/json"
        if status == 413:
            response.force_close()  # the rest of the body is not read: the connection cannot be reused
        elif self._closing:
            # Stopping: a keep-alive connection left open kept its client (and a balancer's pool)
            # coming back to this bridge, answered 503 each time until it was gone.
            response.force_close()
        return response

    # -- the endpoints -----------------------------------------------------------------------------
    def _handler(self, ep: Endpoint) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await self._serve(request, ep)

        return handle

    async def _unmatched(self, request: web.Request) -> web.StreamResponse:
        """What the router answered without the catch-all route: 405 (with the methods the path
        takes) when another route has the path, else 404; the middleware words both."""
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not request.match_info.route.resource:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        raise web.HTTPNotFound()

    async def _openapi_doc(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._openapi)
        response.content_type = "application/json"
        return response

    async def _serve(self, request: web.Request, ep: Endpoint) -> web.Response:
        received_ms = self.queue.clock.now_ms()
        owner = self._owner(request[KEY], request.headers.get("X-Owner"))
        # GET /api/queue/stats takes no body (its OpenAPI operation has none, nor 413/415): one
        # sent anyway is not read, so it can neither narrow the result nor be refused.
        # Its one option comes as a query parameter: `?partial=true` (contract 1.10).
        body = (
            {"partial": request.query.get("partial") == "true"} if ep is STATS_ALL else await self._read_json(request)
        )
        service = request.match_info.get("serviceId")
        if service is not None:
            # The path alone (an absolute-form target's raw_path holds its scheme and host).
            _check_service_segment(request.rel_url.raw_path, service)
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            if "serviceId" in body and body["serviceId"] != service:
                raise BadRequest("the body's serviceId differs from the path's; leave it out of the body")
            body = {**body, "serviceId": service}
        req = wire.outcome_as_json(parse(ep.model, body), self.max_value_bytes)
        # Dropped now, not held through the request (a 30 s long-poll): the models ignore unknown
        # fields, and a body padded to the limit with ``[{}, {}, ...]`` parses to ~24 times its
        # size in objects; 256 such fetches of one key held gigabytes. As on AMQP, a temporary.
        del body
        structlog.contextvars.bind_contextvars(
            owner=owner, service=getattr(req, "service_id", None), worker=getattr(req, "worker_id", None)
        )
        if isinstance(req, AddCommand):
            # Sealed now, and the parsed value let go: held through the write and its retries in
            # place (10 s while Cassandra is slow), 256 adds of a key held their values' JSON
            # trees, some 24 times a body's bytes (gigabytes in a store's brownout).
            req = await self._prepare_add(owner, req, request)
        reply, headers = await self._run(ep.method, owner, req, request, received_ms)
        response = web.Response(body=wire.encode(reply), headers={**JSON_HEADERS, **(headers or {})})
        response.content_type = "application/json"
        return response

    async def _run(self, method: str, owner: str, req: Any, request: web.Request, received_ms: int) -> Reply:
        if method == "fetch":
            assert isinstance(req, FetchRequest)
            # A fetch whose client hangs up stops waiting at once (a hint it was handed goes back)
            # and makes no claim after (asked before each); a claim under way is finished, with
            # its counts, the lease's timer and the pointer's cleanup. One that claimed is a lost
            # reply: the task stays leased to the worker until its timeToRecover, and the
            # worker's next fetch without ``fresh`` gets it again through its pointer.
            requester = Requester(lambda: _connected(request))
            fetching = self._fetch(owner, req, requester)
            return await self.shielded(request, method, fetching, on_hang_up=requester.hang_up)
        # Finished even when the client hangs up meanwhile: a write cut short is retried by the
        # client into an unknown state (an add without an idempotency key twice, half an ack).
        return await self.shielded(request, method, self._run_to_the_end(method, owner, req, request, received_ms))

    async def shielded(
        self,
        request: web.Request,
        method: str,
        work: Awaitable[_R],
        *,
        on_hang_up: Callable[[], None] | None = None,
    ) -> _R:
        """Run a request's ``work`` to its end whatever its client does: a handler cancelled by a
        hang-up leaves it running (``on_hang_up`` is told), and :meth:`stop` waits for it (up to
        the shutdown deadline) before the store closes. Work that outlives its handler is
        observed by how it ended, and holds its key's in-flight slot until then."""
        if self._closing:
            # Its body was still arriving when ``stop`` began: work started now would be waited
            # for by nobody (stop's wait took the work under way when it began) and would run
            # on while the store closed under it. Nothing of it is done: the client retries.
            if asyncio.iscoroutine(work):
                work.close()
            raise Busy("the bridge is shutting down; retry (another bridge may answer)")
        running = asyncio.ensure_future(work)
        self._shielded.add(running)
        running.add_done_callback(self._finished)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            if on_hang_up is not None:
                on_hang_up()
            request[HANDED_OVER] = True
            key = request.get(KEY)
            left = functools.partial(
                self._left_ended, method, request.get(STARTED, time.perf_counter()), None if key is None else key.id
            )
            running.add_done_callback(left)
            raise

    def _left_ended(self, method: str, started: float, key_id: str | None, work: asyncio.Future[Any]) -> None:
        """Work that went on after its client hung up has ended: counted by how it ended."""
        self._release(key_id)
        if work.cancelled():
            outcome: str = ErrorCode.UNAVAILABLE  # cut at the shutdown deadline
        elif isinstance(work.exception(), RequestAbandoned):
            outcome = CLIENT_GONE  # a waiting fetch that stopped waiting: it claimed nothing
        elif (exc := work.exception()) is not None:
            outcome = observed_outcome(exc, wire_code(exc))
        else:
            outcome = OK  # done; its answer was lost with the connection
        self.observe(method, str(outcome), time.perf_counter() - started)

    def track(self, work: asyncio.Future[Any]) -> None:
        """Work that outlives the request that began it (a console read its tabs share): as a
        shielded request's, :meth:`stop` waits for it up to the deadline, then cancels it, before
        the store closes (untracked, it went on reading and moving cursors after the stop)."""
        self._shielded.add(work)
        # Not ``_finished``: nobody hung up, and each request waiting for it observes its end.
        work.add_done_callback(self._shielded.discard)

    def _finished(self, work: asyncio.Future[Any]) -> None:
        self._shielded.discard(work)
        # Retrieved here: after a hang-up nobody awaits it, and the middleware never saw its end.
        exc = None if work.cancelled() else work.exception()
        if exc is not None and not isinstance(exc, BridgeError):
            log.warning("request failed after its client hung up: %s", type(exc).__name__)

    async def _fetch(self, owner: str, req: FetchRequest, requester: Requester) -> Reply:
        delivery = await self.queue.fetch(owner, req, still_wanted=requester)
        child = child_traceparent(delivery.traceparent) if delivery is not None else None
        return wire.fetched(delivery), ({"traceparent": child} if child else None)

    async def _prepare_add(self, owner: str, cmd: AddCommand, request: web.Request) -> _PreparedAdd:
        pending = await self.queue.prepare_add(owner, cmd, traceparent=extract_traceparent(request.headers))
        # The command kept for its reply (delay fields) without its value and token: let go.
        return _PreparedAdd(pending, cmd.model_copy(update=dict.fromkeys(("value", "token"))))

    async def _run_to_the_end(self, method: str, owner: str, req: Any, request: web.Request, received_ms: int) -> Reply:
        if method == "add":
            assert isinstance(req, _PreparedAdd)
            task_id = await self._add(req.pending, request)
            return wire.added(task_id, req.cmd), None
        if method == "ack":
            assert isinstance(req, AckRequest)
            # Received now, so sent before now: an ack without taskId older than the worker's
            # current lease is refused, as on AMQP (where the message timestamp says it).
            return wire.acked(await self.queue.ack(owner, req, sent_before_ms=received_ms)), None
        with self.capacity.slot(method, owner):
            if method == "cancel":
                # Its Idempotency-Key names the request, as the AMQP message-id does: a copy sent
                # again after a lost reply answers true again (without it, false: "it had finished").
                assert isinstance(req, CancelRequest)
                return await wire.cancel_once(self.queue, owner, req, _idempotency_key(request)), None
            return await wire.LIFECYCLE[method].call(self.queue, owner, req), None

    async def _add(self, pending: PendingAdd, request: web.Request) -> str:
        """Store an add, retried in place while its failure is one to retry, within
        :data:`ADD_RETRY_BUDGET_S`, with the same prepared task (one task id), as the AMQP
        handler does: its Idempotency-Key is recorded (a compare-and-set) before the task is
        written, and a client's retry after one failed write prepared another task id, found the
        key naming the first (never stored) and was refused as "still being stored" for 30 s, on
        every gateway. An attempt that failed but landed later rewrites the same rows."""
        message_id = _idempotency_key(request)
        give_up = time.monotonic() + ADD_RETRY_BUDGET_S
        delay = 0.1
        while True:
            try:
                return await self.queue.store_add(pending, message_id=message_id)
            except BridgeError as exc:
                if not fate_of(wire_code(exc), "add").retry or self._closing or time.monotonic() + delay > give_up:
                    raise
                self._warn_add_retry.warning("add failed (%s), retrying in %.1fs", exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    @staticmethod
    def _owner(key: ApiKey, named: str | None) -> str:
        """The owner the request acts for: the key's, or (trusted keys only) the one X-Owner names.
        An empty X-Owner names nobody (the key's own owner), as an empty x-owner on AMQP."""
        if not named:
            return key.owner
        if not OWNER_PATTERN.fullmatch(named) or not _is_utf8(named):
            raise BadRequest("the X-Owner header must be 1 to 255 printable characters (UTF-8)")
        if key.trusted:
            return named
        if named != key.owner:
            raise Forbidden(f"key {key.id!r} may not act for owner {named!r} (only trusted keys may name one)")
        return key.owner

    async def _read_json(self, request: web.Request) -> Any:
        """The body as JSON (``{}`` when empty), refused before it is read when too large."""
        length = request.content_length
        if length is not None and length > self.limit:
            raise PayloadTooLarge(f"the body is {length} bytes; the limit is {self.limit}")
        if not request.can_read_body:
            return {}
        if not _is_json(request.content_type):
            raise UnsupportedMediaType(f"send the body as application/json, not {request.content_type}")
        data = bytearray()
        try:
            # Bounded: a body sent a byte at a time kept its handler and buffer (up to the limit)
            # for as long as the client liked; a few thousand such clients held the bridge's memory
            # and file descriptors.
            async with asyncio.timeout(self.read_timeout):
                while chunk := await request.content.read(CHUNK):
                    data += chunk
                    if len(data) > self.limit:
                        raise PayloadTooLarge(f"the body is more than {self.limit} bytes, the limit")
        except TimeoutError:
            raise HttpError(f"the body was not received within {self.read_timeout:g} s", 408) from None
        except (ConnectionResetError, asyncio.IncompleteReadError, HttpProcessingError):
            # The client went away mid-body, or sent a malformed (chunked) body: its fault, not a
            # bug of the bridge (not counted as internal, not logged as an error).
            raise BadRequest("the body was not received completely") from None
        if not data:
            return {}
        try:
            return jsonvalue.loads(bytes(data))
        except jsonvalue.JsonError as exc:
            raise BadRequest(f"the body is {exc}") from None


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


def _is_utf8(value: str) -> bool:
    """False for a header that was not UTF-8: aiohttp surrogate-escapes its bytes, which pass
    OWNER_PATTERN but have no UTF-8 form (the key server's URL cannot be made of them)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _connected(request: web.Request) -> bool:
    """Whether the request's client is still connected (aiohttp drops the transport once the
    connection is lost)."""
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _idempotency_key(request: web.Request) -> str | None:
    """The add's idempotency key, as AMQP's x-idempotency-key: up to 255 printable characters
    (UTF-8); empty, or absent: none of the caller's own."""
    value = request.headers.get("Idempotency-Key")
    if value is None:
        return None
    if not IDEMPOTENCY_PATTERN.fullmatch(value) or not _is_utf8(value):
        raise BadRequest("the Idempotency-Key header must be 0 to 255 printable characters (UTF-8)")
    return value or None


def _check_service_segment(raw_path: str, service: str, index: int = 3) -> None:
    """The path's serviceId (its ``index``-th segment), as sent, must be UTF-8 once its escapes
    are decoded: aiohttp keeps an escape that is not (``%ff``) as its text (``%FF``), so
    ``/api/queue/%ff/tasks`` was the queue ``%FF``, the same as ``/api/queue/%25FF/tasks``, where
    an AMQP body with those bytes is refused (found by review, 2026-12-07)."""
    from urllib.parse import unquote_to_bytes

    segments = raw_path.split("?", 1)[0].split("/")
    sent = segments[index] if len(segments) > index else ""
    try:
        decoded = unquote_to_bytes(sent).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the path's serviceId is not UTF-8 once its %-escapes are decoded") from None
    if decoded != service:
        raise BadRequest("the path's serviceId is not written as one path segment")
