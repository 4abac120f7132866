"""Health and metrics over HTTP for Kubernetes probes and Prometheus (aiohttp, access logs off).

- ``GET /health/live``: 200 ``{"status": "ok"}`` while the process and its event loop run.
  No dependency is checked here, so a RabbitMQ or Cassandra outage never restarts the sidecar.
- ``GET /health/ready``: runs every readiness check concurrently, each bounded by a timeout;
  a check that raises or times out counts as False. 200 ``{"status": "ready", ...}`` when all
  pass, else 503 ``{"status": "not_ready", ...}``; ``checks`` maps each name to its result.
- ``GET /health/started``: 200 ``{"status": "started"}`` once the bridge's start has ended (its
  dependencies reached, its consumers up), for the rest of the process's life; 503 before. The
  startup probe's: on ``/health/ready``, a sidecar unready just after its start (a clock probe
  slower than the margin under a loaded Cassandra) was killed and restarted with back-off.
- ``GET /metrics``: the Prometheus text exposition of the bridge's own registry.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bridge.observability.metrics import BridgeMetrics

log = logging.getLogger("bridge.http")

Check = Callable[[], Awaitable[bool] | bool]
DEFAULT_CHECK_TIMEOUT = 1.0
DEFAULT_READ_TIMEOUT = 60.0  # BRIDGE_HTTP_READ_TIMEOUT's default


class OpsServer:
    def __init__(
        self,
        metrics: BridgeMetrics | CollectorRegistry,
        checks: Mapping[str, Check],
        *,
        check_timeout: float = DEFAULT_CHECK_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        self.read_timeout = read_timeout
        self.registry = metrics.registry if isinstance(metrics, BridgeMetrics) else metrics
        self.checks = dict(checks)
        self.check_timeout = check_timeout
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._last_ready: bool | None = None
        self.started = False  # set by the bridge once its start has ended
        app = web.Application()
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/health/started", self._started)
        app.router.add_get("/metrics", self._metrics)
        self.app = app

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0 picks a free one) and return the bound port."""
        if self._runner is not None:
            raise RuntimeError("OpsServer already started")
        # aiohttp's idle limit is 3,630 s unless set (``run_app`` sets 75 s; a runner does not):
        # connections opened and never finished (slowloris) would each hold a file descriptor,
        # shared with the bridge's Cassandra and AMQP connections, for an hour.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, keepalive_timeout=self.read_timeout)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0][1]
        self.port = int(bound)
        log.info("ops http listening on %s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self.port = None

    # -- checks ------------------------------------------------------------------------------
    async def _run_check(self, name: str, check: Check) -> bool:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, timeout=self.check_timeout)
            return result is True
        except TimeoutError:
            log.debug("readiness check %s timed out after %.1fs", name, self.check_timeout)
            return False
        except Exception as exc:
            log.debug("readiness check %s failed: %s: %s", name, type(exc).__name__, exc)
            return False

    async def readiness(self) -> dict[str, bool]:
        names = list(self.checks)
        results = await asyncio.gather(*(self._run_check(n, self.checks[n]) for n in names))
        return dict(zip(names, results, strict=True))

    # -- handlers ----------------------------------------------------------------------------
    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _started(self, request: web.Request) -> web.Response:
        if self.started:
            return web.json_response({"status": "started"})
        return web.json_response({"status": "starting"}, status=503)

    async def _ready(self, request: web.Request) -> web.Response:
        checks = await self.readiness()
        ready = all(checks.values())
        if ready != self._last_ready:
            failing = sorted(name for name, ok in checks.items() if not ok)
            if ready:
                log.info("ready")
            else:
                log.warning("not ready: %s", ", ".join(failing))
            self._last_ready = ready
        return web.json_response(
            {"status": "ready" if ready else "not_ready", "checks": checks}, status=200 if ready else 503
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
