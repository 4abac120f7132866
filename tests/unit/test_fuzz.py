"""Fuzzing (hypothesis) of what an attacker controls: request bodies and headers, and ciphertexts.

Properties:
- whatever the body, headers and properties of a request, the transport settles it exactly once
  (ack or reject, never left pending, never requeued) and any reply is a JSON object with
  ``result`` or ``error``; it never raises out of the consumer callback (issue 13.1);
- the JSON codec gives back any JSON value exactly (integers of any size included);
- a mutated ciphertext, nonce or key id never opens and never raises anything but
  ``TamperedCiphertext``.
"""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.config import Settings
from bridge.crypto import OwnerKey, Sealed, TamperedCiphertext, open_sealed, seal
from bridge.domain import jsonvalue
from bridge.domain.models import AckRequest, AddCommand, Delivery, FetchRequest
from bridge.transport.amqp import AmqpTransport
from bridge.transport.replies import reply_node
from tests.unit.frame_sink import FrameChannel

REPLY_TO = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5NTAyNjUzAABO1gAAAANrDuuh.kbNQVv2O5+7CPZGSVNDAzg=="

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
header_values = st.one_of(
    st.none(),
    st.text(max_size=300),
    st.binary(max_size=64),
    st.integers(),
    st.booleans(),
    st.lists(st.text(), max_size=3),
)


class _Exchange:
    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def publish(self, message: Any, routing_key: str, mandatory: bool = False) -> None:
        self.published.append(message.body)


class _Channel(FrameChannel):
    """The reply channel: replies are written as frames on its aiormq channel, decoded here."""

    def __init__(self) -> None:
        super().__init__()
        self.default_exchange = _Exchange()

    async def basic_publish(self, body: bytes, *, routing_key: str, properties: Any, **_: Any) -> None:
        await self.default_exchange.publish(SimpleNamespace(body=body, type=properties.message_type), routing_key)


class _Message:
    def __init__(self, body: bytes, routing_key: str, headers: dict[str, Any], user_id: Any, reply_to: Any) -> None:
        self.body = body
        self.routing_key = routing_key
        self.headers = headers
        self.user_id = user_id
        self.reply_to = reply_to
        self.correlation_id = "c"
        self.message_id = None
        self.redelivered = False
        self.timestamp = None
        self.settled: list[str] = []

    @property
    def processed(self) -> bool:
        return bool(self.settled)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append("requeue" if requeue else "reject")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append("requeue" if requeue else "reject")


class _Clock:
    def now_ms(self) -> int:
        return 1_800_000_000_000


class _Metrics:
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        return None


class _Queue:
    """Answers like the real queue for well-formed requests; raises like it for others."""

    clock = _Clock()
    metrics = _Metrics()

    async def prepare_add(self, owner: str, cmd: AddCommand, *, traceparent: str | None) -> AddCommand:
        jsonvalue.dumps(cmd.value)  # the real queue serializes (and may refuse) the value
        return cmd

    async def store_add(
        self, pending: AddCommand, *, message_id: str | None, first_copy: bool = False, replaces: object = None
    ) -> str:
        return str(uuid.uuid4())

    async def fetch(self, owner: str, req: FetchRequest, **_: Any) -> Delivery | None:
        return Delivery(str(uuid.uuid4()), b'{"x":1}', 1, 1, 1_800_000_060_000, None)

    async def ack(self, owner: str, req: AckRequest, *, sent_before_ms: int | None = None) -> bool:
        jsonvalue.dumps(req.outcome)
        return True


def _transport() -> tuple[AmqpTransport, _Channel]:
    transport = AmqpTransport(Settings(keyring=None, trusted_users=["engine"]), cast(Any, _Queue()))
    channel = _Channel()
    transport._reply_channel = cast(Any, channel)
    transport.replies.main = cast(Any, channel)
    transport.replies.proven.add(str(reply_node(REPLY_TO)))
    return transport, channel


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["add", "fetch", "ack", "other"]),
    body=st.one_of(
        st.binary(max_size=200),
        json_values.map(jsonvalue.dumps),
        st.fixed_dictionaries(
            {"serviceId": st.text(max_size=10), "workerId": st.text(max_size=10)},
            optional={
                "value": json_values,
                "token": json_values,
                "result": json_values,
                "error": json_values,
                "taskId": json_values,
                "epoch": json_values,
                "timeToRecover": json_values,
            },
        ).map(jsonvalue.dumps),
    ),
    headers=st.dictionaries(
        st.sampled_from(["x-owner", "x-deadline", "traceparent", "x-idempotency-key", "other"]),
        header_values,
        max_size=3,
    ),
    user_id=st.one_of(st.none(), st.sampled_from(["worker-a", "engine"])),
    reply_to=st.one_of(st.none(), st.just(REPLY_TO), st.text(max_size=40)),
)
def test_every_request_is_settled_once_and_answered_in_json(
    method: str, body: bytes, headers: dict[str, Any], user_id: Any, reply_to: Any
) -> None:
    transport, channel = _transport()
    message = _Message(body, method, headers, user_id, reply_to)
    handler = {"add": transport._on_add, "fetch": transport._on_fetch, "ack": transport._on_ack}.get(
        method, transport._on_unrouted
    )
    asyncio.run(transport._guarded(handler)(cast(Any, message)))
    assert message.settled in (["ack"], ["reject"]), message.settled
    for reply in channel.default_exchange.published:
        parsed = orjson.loads(reply)
        assert isinstance(parsed, dict) and ("result" in parsed or "error" in parsed)
        if "error" in parsed:
            assert parsed["error"]["code"] != "internal", parsed


@settings(max_examples=300, deadline=None)
@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**200), max_value=2**200)
        | st.text()
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=30,
    )
)
def test_json_values_come_back_exactly(value: Any) -> None:
    assert jsonvalue.loads(jsonvalue.dumps(value)) == value


KEY = OwnerKey(owner="o", key_id="k1", secret=bytes(range(32)))
SEALED = seal(KEY, b'{"secret": 1}', service="s", task_id="t", field="value", bind=("token", ""))


@settings(max_examples=500, deadline=None)
@given(
    nonce=st.one_of(st.just(SEALED.nonce), st.binary(max_size=16)),
    ciphertext=st.one_of(st.binary(max_size=64), st.just(SEALED.ciphertext).map(bytearray)),
    flip=st.integers(min_value=0, max_value=8 * 64),
    key_id=st.one_of(st.just("k1"), st.text(max_size=5)),
)
def test_a_mutated_ciphertext_never_opens(nonce: bytes, ciphertext: Any, flip: int, key_id: str) -> None:
    data = bytearray(ciphertext)
    if data:
        data[(flip // 8) % len(data)] ^= 1 << (flip % 8)
    sealed = Sealed(key_id, bytes(nonce), bytes(data))
    with pytest.raises(TamperedCiphertext):
        open_sealed(KEY, sealed, service="s", task_id="t", field="value", bind=("token", ""))
