"""One error model: one root, one list of wire codes, one table of message fates.

Ties together what would otherwise drift apart: the exception tree drawn in ``bridge/errors.py``
and the classes, the wire codes and the server's and the client's classes (both ways), the fate
table and what the transport really does with a message, and the table and the docs.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import yaml

import bridge.client.errors as client_errors
import bridge.crypto.errors as crypto_errors
import bridge.domain.errors as domain_errors
import bridge.errors
import bridge.storage.errors as storage_errors
import bridge.transport.fate as fate_module
from bridge.config import ConfigError, Settings
from bridge.errors import BridgeError, ErrorCode, wire_code
from bridge.transport.amqp import AmqpTransport
from bridge.transport.fate import EXPIRED, FATES, OK, Settle, fate_of, markdown_table
from bridge.transport.replies import reply_node
from tests.unit.frame_sink import FrameChannel

ROOT = Path(__file__).resolve().parents[2]
ERROR_MODULES = (bridge.errors, domain_errors, crypto_errors, client_errors, storage_errors)


def _subclasses(cls: type[BaseException]) -> Iterator[type[BaseException]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


# -- one root, drawn in one docstring ------------------------------------------------------------
def test_every_error_class_has_the_one_root() -> None:
    for module in ERROR_MODULES:
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, BaseException):
                assert issubclass(obj, BridgeError), f"{module.__name__}.{name} is not a BridgeError"
    assert issubclass(ConfigError, BridgeError)


def test_the_tree_in_the_docstring_names_every_class() -> None:
    drawing = bridge.errors.__doc__ or ""
    for cls in _subclasses(BridgeError):
        if cls.__module__.startswith("bridge."):
            assert re.search(rf"\b{cls.__name__}\b", drawing), f"{cls.__name__} is missing from bridge/errors.py"


def test_wire_code_of_anything() -> None:
    assert wire_code(domain_errors.PayloadTooLarge("x")) is ErrorCode.PAYLOAD_TOO_LARGE
    assert wire_code(storage_errors.UnknownOutcome("x")) is ErrorCode.UNAVAILABLE
    assert wire_code(crypto_errors.KeyUnavailable("x")) is ErrorCode.UNAVAILABLE
    assert wire_code(crypto_errors.TamperedCiphertext("x")) is ErrorCode.INTEGRITY_ERROR
    assert wire_code(ConfigError("x")) is ErrorCode.INTERNAL  # never a wire code of its own
    assert wire_code(RuntimeError("bug")) is ErrorCode.INTERNAL
    assert wire_code(BridgeError("x")) is ErrorCode.INTERNAL


# -- one list of codes: server classes, client classes, the document -------------------------------
def test_server_classes_cover_the_codes_both_ways() -> None:
    classes = [c for c in _subclasses(BridgeError) if c.__module__ == domain_errors.__name__]
    assert {c.code for c in classes} | {BridgeError.code} == set(ErrorCode)


def test_client_classes_are_one_per_code_both_ways() -> None:
    assert set(client_errors.WIRE_ERRORS) == set(ErrorCode)
    wire_classes = {
        c for c in _subclasses(client_errors.BridgeClientError) if not issubclass(c, client_errors.TransportError)
    }
    assert wire_classes == set(client_errors.WIRE_ERRORS.values())
    for code in ErrorCode:
        err = client_errors.error_from_reply({"code": code.value, "message": "m"})
        assert type(err) is client_errors.WIRE_ERRORS[code] and err.code == code and err.message == "m"
    unknown = client_errors.error_from_reply({"code": "from_the_future", "message": "m"})
    assert type(unknown) is client_errors.BridgeClientError and unknown.code == "from_the_future"


def test_client_transport_errors_are_not_wire_codes() -> None:
    for cls in (client_errors.TransportError, client_errors.RequestTimeout, client_errors.ConnectionLost):
        assert cls.code not in set(ErrorCode)
    assert not issubclass(client_errors.ConnectionLost, client_errors.RequestTimeout)


def test_the_document_lists_the_same_codes() -> None:
    doc = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert doc["components"]["schemas"]["ErrorCode"]["enum"] == [c.value for c in ErrorCode]


# -- one table of fates ------------------------------------------------------------------------------
def test_the_table_covers_every_outcome() -> None:
    assert set(FATES) == {OK, EXPIRED} | set(ErrorCode)
    assert fate_of("something_new", "add") == fate_of(ErrorCode.INTERNAL, "add")


def test_only_unavailable_is_retried_or_requeued() -> None:
    for outcome, rule in FATES.items():
        for fate in (rule.add, rule.rpc):
            if fate is None:
                continue
            assert (fate.retry or fate.settle is Settle.REQUEUE) == (
                outcome == ErrorCode.UNAVAILABLE and fate is rule.add
            )


def test_readme_docs_and_code_show_the_same_table() -> None:
    table = markdown_table()
    assert table in (fate_module.__doc__ or "")
    assert table in (ROOT / "README.md").read_text(encoding="utf-8")
    doc = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert table in doc["info"]["description"]


# -- the transport applies the table, for add, fetch and ack alike ------------------------------------
REPLY_TO = "amq.rabbitmq.reply-to.g1h2AAlyZXh1c0BvbmUAAF0nAAAAAAAAAAA=.Z3Vlc3Q="


class _Exchange:
    def __init__(self) -> None:
        self.published: list[Any] = []

    async def publish(self, message: Any, routing_key: str, **_: Any) -> None:
        self.published.append(message)


class _Channel(FrameChannel):
    """The reply channel: replies are written as frames on its aiormq channel, decoded here."""

    def __init__(self) -> None:
        super().__init__()
        self.default_exchange = _Exchange()

    async def basic_publish(self, body: bytes, *, routing_key: str, properties: Any, **_: Any) -> None:
        await self.default_exchange.publish(SimpleNamespace(body=body, type=properties.message_type), routing_key)


class _Message:
    def __init__(self, method: str) -> None:
        bodies = {
            "add": b'{"serviceId": "s", "value": 1}',
            "fetch": b'{"serviceId": "s", "workerId": "w"}',
            "ack": b'{"serviceId": "s", "workerId": "w", "result": 1}',
        }
        self.body = bodies[method]
        self.routing_key = method
        self.user_id = "worker-a"
        self.reply_to = REPLY_TO
        self.correlation_id = uuid.uuid4().hex
        self.headers: dict[str, Any] = {}
        self.message_id = "m-1"
        self.timestamp = None
        self.redelivered = False
        self.settled: list[Settle] = []

    @property
    def processed(self) -> bool:
        return bool(self.settled)

    async def ack(self) -> None:
        self.settled.append(Settle.ACK)

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(Settle.REQUEUE if requeue else Settle.DEAD_LETTER)

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(Settle.REQUEUE if requeue else Settle.DEAD_LETTER)


class _Metrics:
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        return None


class _Clock:
    def now_ms(self) -> int:
        return 1_800_000_000_000


class _RaisingQueue:
    metrics = _Metrics()
    clock = _Clock()

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def prepare_add(self, *_: Any, **__: Any) -> str:
        raise self.error

    async def fetch(self, *_: Any, **__: Any) -> None:
        raise self.error

    async def ack(self, *_: Any, **__: Any) -> bool:
        raise self.error


_DOMAIN: dict[str, type[Exception]] = {
    cls.code: cls
    for cls in (
        domain_errors.BadRequest,
        domain_errors.PayloadTooLarge,
        domain_errors.Unauthorized,
        domain_errors.UnknownOwner,
        domain_errors.IntegrityError,
        domain_errors.Unavailable,
    )
}


def _error_of(code: ErrorCode) -> Exception:
    return RuntimeError("a bug") if code is ErrorCode.INTERNAL else _DOMAIN[code]("test")


@pytest.mark.parametrize("method", ["add", "fetch", "ack"])
@pytest.mark.parametrize("code", list(ErrorCode))
def test_the_transport_settles_by_the_table(method: str, code: ErrorCode) -> None:
    observed: list[tuple[str, str]] = []
    transport = AmqpTransport(
        Settings(keyring=None), cast(Any, _RaisingQueue(_error_of(code))), lambda m, o, s: observed.append((m, o))
    )
    channel = _Channel()
    transport.replies.main = cast(Any, channel)
    transport.replies.proven.add(str(reply_node(REPLY_TO)))
    message = _Message(method)
    consumer = {"add": transport._on_add, "fetch": transport._on_fetch, "ack": transport._on_ack}[method]
    # No consumers are registered: an add that would be retried is settled at once.
    asyncio.run(consumer(cast(Any, message)))

    fate = fate_of(code, method)
    assert message.settled == [fate.settle]
    replies = channel.default_exchange.published
    assert len(replies) == (1 if fate.reply else 0)
    if replies:
        assert replies[0].type == "error" and f'"code":"{code.value}"'.encode() in replies[0].body
    assert observed == [(method, code.value)], "timed and observed once, with the outcome"
