"""Tracebacks for what is not the bridge's fault become one DEBUG line: aio-pika's for an
expected broker restart (issue 13.11), aiohttp's for a malformed request."""

from __future__ import annotations

import logging

import pytest

from bridge.config import Settings
from bridge.observability.logging import configure_logging


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_channel_close_callback_errors_are_demoted_and_others_kept() -> None:
    configure_logging(Settings(keyring=None, log_format="json", log_level="INFO"))
    tools = logging.getLogger("aio_pika.tools")
    seen = _Records()
    logging.getLogger().addHandler(seen)
    try:
        try:
            raise RuntimeError("<Connection: amqp://...> closed")
        except RuntimeError:
            tools.exception(
                "Callback %r error: %s: %s", "<OneShotCallback: cb=RobustChannel._on_close>", "RuntimeError", "closed"
            )
        tools.error("Callback %r error: %s: %s", "<OneShotCallback: cb=something_else>", "ValueError", "boom")
    finally:
        logging.getLogger().removeHandler(seen)
    messages = [(r.levelname, r.getMessage()) for r in seen.records if r.name == "aio_pika.tools"]
    assert messages == [("ERROR", "Callback '<OneShotCallback: cb=something_else>' error: ValueError: boom")]


@pytest.mark.anyio
async def test_a_malformed_http_request_is_one_debug_line_not_an_error_traceback() -> None:
    """aiohttp answers a malformed request 400 itself, before any middleware, and logged a
    traceback at ERROR for each: anyone reaching a port flooded the log (and error alerts) with a
    ``nc`` loop. Now one DEBUG line; its other errors stay (found by review, 2026-12-07)."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from bridge.observability.http import OpsServer

    configure_logging(Settings(keyring=None, log_format="json", log_level="INFO"))
    seen = _Records()
    logging.getLogger().addHandler(seen)
    ops = OpsServer(CollectorRegistry(), {})
    port = await ops.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), answer
        try:
            raise ValueError("a bug")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Unhandled exception")
    finally:
        await ops.stop()
        logging.getLogger().removeHandler(seen)
    said = [(r.levelname, r.getMessage()) for r in seen.records if r.name == "aiohttp.server"]
    assert said == [("ERROR", "Unhandled exception")], said
