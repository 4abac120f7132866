"""Structured logs: JSON lines in production, readable lines on a terminal. Never values or keys."""

from __future__ import annotations

import logging
import socket
import sys

import structlog
from aiohttp.http_exceptions import BadHttpMessage

from bridge.config import Settings


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced later)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class _ExpectedChannelClose(logging.Filter):
    """aio-pika logs a traceback at ERROR from its robust channels' close callbacks whenever the
    broker goes away ("RuntimeError: ... closed"): an expected event that the transport already
    logs once, counts (``queue_bridge_amqp_channels_lost_total``) and recovers from. Those records
    become one DEBUG line; any other aio-pika error stays as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "_on_close" in message and "closed" in message:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = None
            record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class _MalformedHttpRequest(logging.Filter):
    """aiohttp logs a traceback at ERROR (``aiohttp.server``) for every malformed request it
    answers 400 itself (a bad header line, a broken chunk), before any middleware: anyone who can
    reach a port flooded the log, and tripped alerts on errors, with one ``nc`` loop. The client's
    doing, not the bridge's: one DEBUG line; anything else aiohttp logs stays as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = None
            record.exc_text = None
            record.msg, record.args = "malformed HTTP request answered 400: %s", (exc.message,)
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def configure_logging(settings: Settings) -> None:
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    # Tracebacks without local variables, in both formats: a frame's locals hold request bodies
    # (task values, tokens). structlog's console renderer shows them by default when rich is
    # installed (typer brings it); the JSON renderer wrote exc_info as three reprs, no stack.
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    rendering: list[structlog.types.Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt != "console":
        rendering.append(structlog.processors.format_exc_info)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Every line names its bridge (the hostname unless set, as the metrics do): a fleet's logs
    # are read together, and a pod's hostname is what tells its lines apart.
    instance = settings.instance_id or socket.gethostname()
    shared.append(lambda _l, _m, ev: {**ev, "instance": instance})
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[*rendering, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for noisy in ("aio_pika", "aiormq", "cassandra"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    tools = logging.getLogger("aio_pika.tools")
    if not any(isinstance(f, _ExpectedChannelClose) for f in tools.filters):
        tools.addFilter(_ExpectedChannelClose())
    http = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedHttpRequest) for f in http.filters):
        http.addFilter(_MalformedHttpRequest())
