"""aio-pika's tracebacks for an expected broker restart become one DEBUG line (issue 13.11)."""

from __future__ import annotations

import logging

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
