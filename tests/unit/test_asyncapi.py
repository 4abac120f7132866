"""The AsyncAPI wire contract (docs/asyncapi.yaml) checked against the implementation.

Structural checks of the document itself (version, channels, local ``$ref``s, operations), then
the contract against the code: request schemas against the pydantic models, error codes against
``bridge.domain.errors``, names and topology against ``Settings`` and ``AmqpTransport``, and the
messages the transport really publishes (replies, results, dead-lettering) against the schemas,
for every routing key: add, fetch and ack, and the lifecycle methods of 1.4 (one queue). No
broker is needed: the transport runs against small in-memory fakes, and the engine's
``delivery_limit`` result comes from the real domain on the in-memory store.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aio_pika
import orjson
import pytest
import yaml
from pamqp.commands import Basic
from pydantic import BaseModel

from bridge.config import ENV_PREFIX, Settings
from bridge.crypto import KeyringFileProvider, generate_keyring, write_keyring
from bridge.domain.clock import ManualClock
from bridge.domain.errors import BridgeError, PayloadTooLarge, Unavailable
from bridge.domain.lifecycle import (
    PARK_DELIVERY_LIMIT,
    PARK_FAILED,
    Extended,
    Failed,
    ParkedPage,
    ParkedTask,
    RedriveRound,
)
from bridge.domain.models import (
    AckRequest,
    AckWithNextRequest,
    AddCommand,
    CancelRequest,
    Delivery,
    DiscardRequest,
    ExtendRequest,
    FailRequest,
    FetchRequest,
    ParkedRequest,
    QueueRequest,
    RedriveRequest,
    StatsRequest,
    parse,
)
from bridge.domain.queue import ResultMessage
from bridge.domain.relay import completed_at_ms
from bridge.domain.stats import ServiceStats
from bridge.domain.timeline import timeuuid_from_ms
from bridge.errors import ErrorCode
from bridge.storage.memory import MemoryTaskStore
from bridge.transport.amqp import METHODS, AmqpTransport
from bridge.transport.replies import reply_node
from bridge.transport.results import ResultPublisher
from bridge.transport.topology import LIFECYCLE_METHODS, LIFECYCLE_QUEUE, ROUTING_KEYS
from tests.queue_harness import MARGIN_MS, OWNER, TTL_S, Harness
from tests.unit.frame_sink import FrameChannel

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"

# channel key -> (request message key, pydantic model, reply message key)
REQUESTS: dict[str, tuple[str, type[BaseModel], str]] = {
    "add": ("addRequest", AddCommand, "addReply"),
    "fetch": ("fetchRequest", FetchRequest, "fetchReply"),
    "ack": ("ackRequest", AckWithNextRequest, "ackReply"),
    # 1.4, the worker lifecycle: routing keys of the one queue ``<prefix>.lifecycle``.
    "extend": ("extendRequest", ExtendRequest, "extendReply"),
    "fail": ("failRequest", FailRequest, "failReply"),
    "cancel": ("cancelRequest", CancelRequest, "cancelReply"),
    "purge": ("purgeRequest", QueueRequest, "purgeReply"),
    "stats": ("statsRequest", StatsRequest, "statsReply"),
    "parked": ("parkedRequest", ParkedRequest, "parkedReply"),
    "redrive": ("redriveRequest", RedriveRequest, "redriveReply"),
    "discard": ("discardRequest", DiscardRequest, "discardReply"),
}
# operation id -> (action, channel key)
OPERATIONS = {
    "sendAdd": ("send", "add"),
    "sendFetch": ("send", "fetch"),
    "sendAck": ("send", "ack"),
    "sendExtend": ("send", "extend"),
    "sendFail": ("send", "fail"),
    "sendCancel": ("send", "cancel"),
    "sendPurge": ("send", "purge"),
    "sendStats": ("send", "stats"),
    "sendParked": ("send", "parked"),
    "sendRedrive": ("send", "redrive"),
    "sendDiscard": ("send", "discard"),
    "sendResult": ("send", "results"),
    "sendDeadLetter": ("send", "deadLetter"),
}
TASK_ID = "6a1b7c2e-9d3f-11ef-8a2b-0242ac120002"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# -- document helpers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    with DOC_PATH.open(encoding="utf-8") as fh:
        loaded = yaml.safe_load(fh)
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The defaults: no BRIDGE_* variables, no .env file."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node: Any = doc
    for raw in ref[2:].split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and key in node, f"unresolvable $ref {ref!r} (at {key!r})"
        node = node[key]
    return node


def deref(doc: dict[str, Any], node: Any) -> Any:
    seen = 0
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(doc, node["$ref"])
        seen += 1
        assert seen < 20, "reference cycle"
    return node


def all_refs(node: Any, path: str = "#") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield path, value
            else:
                yield from all_refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from all_refs(value, f"{path}/{i}")


def message(doc: dict[str, Any], key: str) -> dict[str, Any]:
    msg = deref(doc, doc["components"]["messages"][key])
    assert isinstance(msg, dict)
    return msg


def header_pointer(location: str) -> str:
    prefix = "$message.header#/"
    assert location.startswith(prefix), location
    return location[len(prefix) :]


# -- a small validator for the JSON Schema subset the document uses ----------------------------
_JSON_TYPES: dict[str, Any] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}
_KNOWN_KEYWORDS = {
    "$ref", "type", "const", "enum", "required", "properties", "additionalProperties", "oneOf", "not",
    "items", "minItems", "maxItems", "minimum", "maximum", "minLength", "maxLength", "pattern", "format", "default",
    "description", "title", "examples",
}  # fmt: skip
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def errors_of(doc: dict[str, Any], schema: Any, value: Any, where: str = "$", closed: bool | None = None) -> list[str]:
    """``closed``: objects take no property they do not list. The document's replies are open to
    clients (a later version may add a field: they ignore what they do not know), but the bridge
    must send nothing undocumented: a schema that does not say ``additionalProperties: true`` (as
    every request's does) is checked closed, with all it holds."""
    schema = deref(doc, schema)
    assert isinstance(schema, dict), f"{where}: schema is not an object"
    if closed is None:
        closed = schema.get("additionalProperties") is not True
    unknown = set(schema) - _KNOWN_KEYWORDS
    assert not unknown, f"{where}: the test's validator does not know {unknown}; extend it"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_JSON_TYPES[t](value) for t in types):
            return [f"{where}: {value!r} is not of type {types}"]
    out: list[str] = []
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        out.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        out += _string_errors(schema, value, where)
    if _JSON_TYPES["number"](value):
        out += _number_errors(schema, value, where)
    return (
        out
        + _container_errors(doc, schema, value, where, closed)
        + _combinator_errors(doc, schema, value, where, closed)
    )


def _string_errors(schema: dict[str, Any], value: str, where: str) -> list[str]:
    out: list[str] = []
    if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
        out.append(f"{where}: length {len(value)} out of bounds")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
    if schema.get("format") == "date-time" and not _DATE_TIME.match(value):
        out.append(f"{where}: {value!r} is not a date-time")
    if schema.get("format") == "uuid":
        try:
            uuid.UUID(value)
        except ValueError:
            out.append(f"{where}: {value!r} is not a uuid")
    return out


def _number_errors(schema: dict[str, Any], value: float, where: str) -> list[str]:
    out: list[str] = []
    if "minimum" in schema and value < schema["minimum"]:
        out.append(f"{where}: {value!r} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        out.append(f"{where}: {value!r} > {schema['maximum']}")
    return out


def _container_errors(doc: dict[str, Any], schema: dict[str, Any], value: Any, where: str, closed: bool) -> list[str]:
    out: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{where}: missing {name!r}" for name in schema.get("required", []) if name not in value]
        for name, item in value.items():
            if name in props:
                out += errors_of(doc, props[name], item, f"{where}.{name}", closed)
            elif schema.get("additionalProperties") is False or (
                closed and props and "additionalProperties" not in schema
            ):
                out.append(f"{where}: unexpected property {name!r}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            out.append(f"{where}: {len(value)} items, out of bounds")
        for i, item in enumerate(value if "items" in schema else []):
            out += errors_of(doc, schema["items"], item, f"{where}[{i}]", closed)
    return out


def _combinator_errors(doc: dict[str, Any], schema: dict[str, Any], value: Any, where: str, closed: bool) -> list[str]:
    out: list[str] = []
    if "oneOf" in schema:
        matching = sum(1 for branch in schema["oneOf"] if not errors_of(doc, branch, value, where, closed))
        if matching != 1:
            out.append(f"{where}: {value!r} matches {matching} of the oneOf branches, not exactly one")
    if "not" in schema and not errors_of(doc, schema["not"], value, where, closed):
        out.append(f"{where}: {value!r} must not match {schema['not']!r}")
    return out


def assert_valid(doc: dict[str, Any], schema: Any, value: Any, what: str) -> None:
    problems = errors_of(doc, schema, value)
    assert not problems, f"{what}: " + "; ".join(problems)


def test_validator_rejects_what_it_should(doc: dict[str, Any]) -> None:
    payload = doc["components"]["schemas"]["FetchRequestPayload"]
    assert errors_of(doc, payload, {"serviceId": "a\x01", "workerId": "w"})
    assert errors_of(doc, payload, {"serviceId": "a", "workerId": "w", "timeToRecover": 99})
    assert errors_of(doc, payload, {"serviceId": "a"})
    result = doc["components"]["schemas"]["ResultPayload"]
    both = {"token": 1, "serviceId": "s", "taskId": TASK_ID, "result": 1, "error": 2}
    assert errors_of(doc, result, both)
    assert errors_of(doc, result, {"token": None, "serviceId": "s", "taskId": TASK_ID, "result": 1})
    # 1.4: the keywords and combinations the lifecycle schemas use.
    schemas = doc["components"]["schemas"]
    add = schemas["AddRequestPayload"]
    assert errors_of(doc, add, {"serviceId": "s", "value": 1, "delayMs": 5, "notBefore": "2026-12-02T10:00:00Z"})
    assert not errors_of(doc, add, {"serviceId": "s", "value": 1, "delayMs": None, "notBefore": "2026-12-02T10:00Z"})
    assert errors_of(doc, add, {"serviceId": "s", "value": 1, "maxDeliveries": 1001})
    assert errors_of(doc, add, {"serviceId": "s", "value": 1, "priority": 4})
    redrive = schemas["RedriveRequestPayload"]
    assert errors_of(doc, redrive, {"serviceId": "s"})
    assert errors_of(doc, redrive, {"serviceId": "s", "taskIds": [TASK_ID], "all": True})
    assert errors_of(doc, redrive, {"serviceId": "s", "taskIds": None, "all": False})
    assert errors_of(doc, redrive, {"serviceId": "s", "taskIds": [TASK_ID] * 1001})
    assert not errors_of(doc, redrive, {"serviceId": "s", "taskIds": None, "all": True})
    # 1.9: the bound and where to go on, with all: true only.
    going_on = {"serviceId": "s", "all": True, "parkedBefore": "2026-12-02T10:00:00Z", "after": TASK_ID}
    assert not errors_of(doc, redrive, going_on)
    assert errors_of(doc, redrive, {**going_on, "parkedBefore": 1764669600000})
    assert errors_of(doc, redrive, {"serviceId": "s", "taskIds": [TASK_ID], "parkedBefore": "2026-12-02T10:00:00Z"})
    assert errors_of(doc, redrive, {"serviceId": "s", "taskIds": [TASK_ID], "after": TASK_ID})
    discard = schemas["DiscardRequestPayload"]
    assert errors_of(doc, discard, {"serviceId": "s", "taskIds": []})
    assert errors_of(doc, discard, {"serviceId": "s", "taskIds": ["not-a-uuid"]})
    assert errors_of(doc, schemas["ExtendReplyPayload"], {"result": True})
    # A task whose value is null matches the "a task" branch alone, whether replies are read
    # closed (the bridge's own check) or open (a client's: a later version may add fields).
    null_task = {
        "result": None,
        "task": {"id": TASK_ID, "epoch": 1, "deliveries": 1, "leaseExpiresAt": "2025-01-01T12:00:00.000Z"},
    }
    for closed in (True, False):
        assert not errors_of(doc, schemas["FetchReplyPayload"], null_task, closed=closed)
        assert not errors_of(doc, schemas["FetchReplyPayload"], {"result": None}, closed=closed)
    # Replies are open to clients (1.10), but the bridge must send no field the document lacks.
    assert not errors_of(doc, schemas["CancelReplyPayload"], {"result": True})
    assert errors_of(doc, schemas["CancelReplyPayload"], {"result": True, "undocumented": 1})
    assert errors_of(doc, schemas["FailReplyPayload"], {"result": False, "task": {}})


# -- the document's structure ------------------------------------------------------------------
def test_asyncapi_version_is_3(doc: dict[str, Any]) -> None:
    assert str(doc["asyncapi"]).startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    server = doc["servers"]["rabbitmq"]
    assert server["protocol"] == "amqp"
    assert server["protocolVersion"] == "0-9-1"


def test_channels_exist(doc: dict[str, Any]) -> None:
    channels = doc["channels"]
    for key in ("add", "fetch", "ack", *LIFECYCLE_METHODS, "results", "deadLetter", "reply"):
        assert key in channels, f"channel {key!r} is missing"
    assert len(REQUESTS) == len(ROUTING_KEYS)
    assert {channels[m]["address"] for m in REQUESTS} == set(ROUTING_KEYS), "one channel per routing key"
    assert set(METHODS) | set(LIFECYCLE_METHODS) == set(ROUTING_KEYS)
    assert channels["reply"]["address"] is None, "the reply queue is known only at run time"


def test_every_local_ref_resolves(doc: dict[str, Any]) -> None:
    refs = list(all_refs(doc))
    assert refs
    for where, ref in refs:
        assert isinstance(ref, str), where
        resolve(doc, ref)


def test_operations_reference_their_channels_and_messages(doc: dict[str, Any]) -> None:
    assert set(doc["operations"]) == set(OPERATIONS)
    for op_id, op in doc["operations"].items():
        action, channel_key = OPERATIONS[op_id]
        assert op["action"] == action, op_id
        assert op["channel"]["$ref"] == f"#/channels/{channel_key}", op_id
        channel = resolve(doc, op["channel"]["$ref"])
        assert op["messages"], op_id
        for ref in op["messages"]:
            assert ref["$ref"].startswith(f"#/channels/{channel_key}/messages/"), f"{op_id}: {ref}"
            assert deref(doc, ref) is deref(doc, channel["messages"][ref["$ref"].rsplit("/", 1)[1]])
        if "reply" in op:
            reply = op["reply"]
            assert reply["channel"]["$ref"] == "#/channels/reply", op_id
            reply_channel = resolve(doc, reply["channel"]["$ref"])
            for ref in reply["messages"]:
                assert ref["$ref"].startswith("#/channels/reply/messages/"), f"{op_id}: {ref}"
                assert ref["$ref"].rsplit("/", 1)[1] in reply_channel["messages"]
            assert reply_channel["address"] is not None or "address" in reply, f"{op_id}: no reply address"


def test_rpc_operations_reply_with_result_or_error(doc: dict[str, Any]) -> None:
    for channel_key, (_, _, reply_key) in REQUESTS.items():
        op = doc["operations"][f"send{channel_key.capitalize()}"]
        replies = {ref["$ref"].rsplit("/", 1)[1] for ref in op["reply"]["messages"]}
        assert replies == {reply_key, "errorReply"}


def test_runtime_expressions_point_at_defined_properties(doc: dict[str, Any]) -> None:
    """``correlation-id`` and ``reply-to`` are AMQP properties: the runtime expressions (which can
    only say ``$message.header``) point into each message's ``x-amqp-properties``, and never at an
    entry of its headers table."""
    for key in doc["components"]["messages"]:
        msg = message(doc, key)
        if "correlationId" in msg:
            location = deref(doc, msg["correlationId"])["location"]
            assert location == "$message.header#/correlation-id"
            assert header_pointer(location) in deref(doc, msg["x-amqp-properties"])["properties"], key
            assert header_pointer(location) not in deref(doc, msg["headers"])["properties"], key
    for channel_key, (request_key, _, _) in REQUESTS.items():
        op = doc["operations"][f"send{channel_key.capitalize()}"]
        location = op["reply"]["address"]["location"]
        assert location == "$message.header#/reply-to"
        properties = deref(doc, message(doc, request_key)["x-amqp-properties"])
        assert header_pointer(location) in properties["properties"], request_key
    for name, param in doc["channels"]["results"]["parameters"].items():
        assert param["location"] == f"$message.payload#/{name}"
        assert name in deref(doc, message(doc, "result")["payload"])["properties"]


def test_amqp_bindings_are_version_0_3_0(doc: dict[str, Any]) -> None:
    def amqp_bindings(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            if isinstance(node.get("bindings"), dict) and "amqp" in node["bindings"]:
                yield node["bindings"]["amqp"]
            for value in node.values():
                yield from amqp_bindings(value)
        elif isinstance(node, list):
            for value in node:
                yield from amqp_bindings(value)

    bindings = list(amqp_bindings(doc))
    assert len(bindings) >= len(doc["channels"])
    assert all(b["bindingVersion"] == "0.3.0" for b in bindings)
    assert all("bindings" in channel for channel in doc["channels"].values())
    for op in doc["operations"].values():
        assert "replyTo" not in op.get("bindings", {}).get("amqp", {}), "0.3.0 has no replyTo: use reply"


def test_every_message_has_valid_examples(doc: dict[str, Any]) -> None:
    for key in doc["components"]["messages"]:
        msg = message(doc, key)
        assert msg.get("examples"), f"message {key!r} has no example"
        for example in msg["examples"]:
            assert "payload" in example, key
            assert_valid(doc, msg["payload"], example["payload"], f"{key} example {example.get('name')}")
            if "headers" in example:
                assert_valid(doc, msg["headers"], example["headers"], f"{key} example headers")
            # AsyncAPI 3.0's Message Example Object has these fields and no extensions.
            assert set(example) <= {"name", "summary", "headers", "payload"}, f"{key}: {set(example)}"
        if "x-amqp-properties" in msg:
            properties = deref(doc, msg["x-amqp-properties"])
            assert properties.get("examples"), f"{key}: its AMQP properties have no example"
            for example in properties["examples"]:
                assert_valid(doc, properties, example, f"{key} example properties")


# AMQP 0-9-1 basic properties, spelled as the specification (amqp0-9-1.xml) does.
AMQP_PROPERTIES = {
    "content-type", "content-encoding", "headers", "delivery-mode", "priority", "correlation-id", "reply-to",
    "expiration", "message-id", "timestamp", "type", "user-id", "app-id",
}  # fmt: skip


def _spellings(name: str) -> set[str]:
    """A property name as clients spell it: ``reply-to``, ``reply_to``, ``replyTo``."""
    head, *rest = name.split("-")
    return {name, name.replace("-", "_"), head + "".join(word.capitalize() for word in rest)}


def test_properties_and_application_headers_are_apart(doc: dict[str, Any]) -> None:
    """A message's ``headers`` are entries of the AMQP headers table only; its AMQP properties are
    its ``x-amqp-properties``, spelled as AMQP 0-9-1 does (a client that put ``user_id`` in the
    headers table was refused as unauthorized)."""
    every_spelling = set().union(*(_spellings(name) for name in AMQP_PROPERTIES))
    for key in doc["components"]["messages"]:
        msg = message(doc, key)
        if "headers" in msg:
            headers = set(deref(doc, msg["headers"]).get("properties", {}))
            assert not headers & every_spelling, f"{key}: AMQP properties listed as headers: {headers & every_spelling}"
        if "x-amqp-properties" in msg:
            properties = deref(doc, msg["x-amqp-properties"])
            assert set(properties["properties"]) <= AMQP_PROPERTIES - {"headers"}, key
        elif key not in ("deadLetter", "unroutedRequest"):  # those keep the original's
            raise AssertionError(f"{key}: no x-amqp-properties")
        for example in msg.get("examples", []):
            assert not set(example.get("headers", {})) & every_spelling, f"{key} example {example.get('name')}"
    for op_id, (_, channel_key) in OPERATIONS.items():
        if channel_key in REQUESTS:
            request = message(doc, REQUESTS[channel_key][0])
            assert "user-id" in deref(doc, request["x-amqp-properties"])["required"], op_id


def test_request_examples_publish_with_direct_reply_to(doc: dict[str, Any]) -> None:
    """A client publishes ``reply-to: amq.rabbitmq.reply-to``; the longer form is what RabbitMQ
    rewrites it to, which a client must never send itself."""
    seen = 0
    for request_key, _, _ in REQUESTS.values():
        for example in deref(doc, message(doc, request_key)["x-amqp-properties"])["examples"]:
            reply_to = example.get("reply-to")
            if reply_to is not None:
                assert reply_to == "amq.rabbitmq.reply-to", f"{request_key}: {reply_to}"
                seen += 1
    assert seen >= len(REQUESTS)


# -- the contract against the code -------------------------------------------------------------
def _json_constraints(prop: dict[str, Any]) -> dict[str, Any]:
    """Types and constraints of a property, with pydantic's ``anyOf`` flattened."""
    branches = prop.get("anyOf", [prop])
    types: set[str] = set()
    merged: dict[str, Any] = {}
    for branch in branches:
        branch_type = branch.get("type", [])
        types |= set(branch_type if isinstance(branch_type, list) else [branch_type])
        if "$ref" in branch:  # pydantic's nested model (an ack's ``next``): a JSON object
            types.add("object")
        bounds = ("minLength", "maxLength", "pattern", "minimum", "maximum", "minItems", "maxItems")
        merged |= {k: branch[k] for k in bounds if k in branch}
    return {"types": types, **merged}


@pytest.mark.parametrize("channel_key", list(REQUESTS))
def test_request_schema_matches_model(doc: dict[str, Any], channel_key: str) -> None:
    message_key, model, _ = REQUESTS[channel_key]
    schema = deref(doc, message(doc, message_key)["payload"])
    wire_names = {field.alias or name for name, field in model.model_fields.items()}
    required = {field.alias or name for name, field in model.model_fields.items() if field.is_required()}
    assert set(schema["properties"]) == wire_names
    assert set(schema.get("required", [])) == required
    assert schema.get("additionalProperties", True) is (model.model_config.get("extra") != "forbid")
    generated = model.model_json_schema(by_alias=True)["properties"]
    for name, prop in generated.items():
        documented = deref(doc, schema["properties"][name])
        assert _json_constraints(deref(doc, documented)) == _json_constraints(prop), f"{message_key}.{name}"


def test_time_to_recover_default_matches_settings(doc: dict[str, Any], settings: Settings) -> None:
    ttr = doc["components"]["schemas"]["FetchRequestPayload"]["properties"]["timeToRecover"]
    assert ttr["default"] == settings.default_time_to_recover_ms


@pytest.mark.parametrize("channel_key", list(REQUESTS))
def test_request_examples_are_accepted_by_the_models(doc: dict[str, Any], channel_key: str) -> None:
    message_key, model, _ = REQUESTS[channel_key]
    for example in message(doc, message_key)["examples"]:
        parse(model, example["payload"])


def _subclasses(cls: type[BridgeError]) -> Iterator[type[BridgeError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_error_codes_match_the_domain(doc: dict[str, Any]) -> None:
    domain = {cls.code for cls in _subclasses(BridgeError) if cls.__module__ == "bridge.domain.errors"}
    assert set(doc["components"]["schemas"]["ErrorCode"]["enum"]) == set(ErrorCode) == domain | {BridgeError.code}


def _transport(settings: Settings, queue: Any = None) -> AmqpTransport:
    return AmqpTransport(settings, cast(Any, queue))


def test_names_match_settings_defaults(doc: dict[str, Any], settings: Settings) -> None:
    transport = _transport(settings)
    channels = doc["channels"]
    for method in METHODS:
        assert channels[method]["address"] == method
        assert channels[method]["bindings"]["amqp"]["exchange"]["name"] == settings.exchange
        assert transport.queue_name(method) in channels[method]["description"]
    for method in LIFECYCLE_METHODS:
        assert channels[method]["address"] == method
        assert channels[method]["bindings"]["amqp"]["exchange"]["name"] == settings.exchange
        assert f"`{transport.queue_name(LIFECYCLE_QUEUE)}`" in channels[method]["description"]
    assert channels["results"]["bindings"]["amqp"]["exchange"]["name"] == settings.results_exchange
    dead = channels["deadLetter"]
    assert dead["address"] == dead["bindings"]["amqp"]["queue"]["name"] == transport.dead_letter_queue
    assert transport.dead_letter_exchange in dead["description"]
    unrouted = channels["unrouted"]
    assert unrouted["address"] == unrouted["bindings"]["amqp"]["queue"]["name"] == transport.queue_name("unrouted")


# -- the topology the transport declares ---------------------------------------------------------
class _Exchange:
    def __init__(self, name: str) -> None:
        self.name = name


class _Queue:
    def __init__(self, name: str, bindings: set[tuple[str, str, str | None]]) -> None:
        self.name = name
        self._bindings = bindings

    async def bind(self, exchange: _Exchange | str, routing_key: str | None = None, **_: Any) -> None:
        name = exchange if isinstance(exchange, str) else exchange.name  # aio_pika takes either
        self._bindings.add((name, self.name, routing_key))


class _TopologyChannel:
    def __init__(self) -> None:
        self.exchanges: dict[str, dict[str, Any]] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.bindings: set[tuple[str, str, str | None]] = set()

    async def declare_exchange(
        self, name: str, kind: Any, *, durable: bool = False, arguments: dict[str, Any] | None = None, **_: Any
    ) -> _Exchange:
        self.exchanges[name] = {"type": getattr(kind, "value", kind), "durable": durable, "arguments": arguments or {}}
        return _Exchange(name)

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = False,
        arguments: dict[str, Any] | None = None,
        passive: bool = False,
        **_: Any,
    ) -> _Queue:
        if not passive:
            self.queues[name] = {"durable": durable, "arguments": arguments or {}}
        return _Queue(name, self.bindings)

    is_closed = False

    async def close(self) -> None:
        return None


class _TopologyConnection:
    def __init__(self, channel: _TopologyChannel) -> None:
        self._channel = channel

    async def channel(self, **_: Any) -> _TopologyChannel:
        return self._channel


def test_topology_matches_what_the_transport_declares(doc: dict[str, Any], settings: Settings) -> None:
    transport = _transport(settings)
    channel = _TopologyChannel()
    transport._consume_channel = cast(Any, channel)
    transport._publish_channel = cast(Any, channel)
    transport.connection = cast(Any, _TopologyConnection(channel))
    asyncio.run(transport._declare_topology())

    topology = doc["x-topology"]
    exchanges = {
        e["name"]: {"type": e["type"], "durable": e["durable"], "arguments": e.get("arguments", {})}
        for e in topology["exchanges"]
    }
    queues = {q["name"]: {"durable": q["durable"], "arguments": q.get("arguments", {})} for q in topology["queues"]}
    bindings = {(b["exchange"], b["queue"], b.get("routingKey")) for b in topology["bindings"]}
    assert exchanges == channel.exchanges
    assert queues == channel.queues
    assert bindings == channel.bindings

    # The channel bindings say the same as the declared topology.
    for key, ch in doc["channels"].items():
        amqp = ch["bindings"]["amqp"]
        if amqp["is"] == "queue":
            assert channel.queues[amqp["queue"]["name"]]["durable"] is amqp["queue"]["durable"], key
        elif amqp["exchange"]["type"] != "default":
            declared = channel.exchanges[amqp["exchange"]["name"]]
            assert (declared["type"], declared["durable"]) == (amqp["exchange"]["type"], amqp["exchange"]["durable"])
    for method in METHODS:
        assert (settings.exchange, transport.queue_name(method), method) in channel.bindings
    # 1.4: the lifecycle methods share one queue, bound by each routing key.
    lifecycle = transport.queue_name(LIFECYCLE_QUEUE)
    assert lifecycle == queues_named(doc, "lifecycle")
    assert channel.queues[lifecycle]["arguments"] == {"x-dead-letter-exchange": transport.dead_letter_exchange}
    for method in LIFECYCLE_METHODS:
        assert (settings.exchange, lifecycle, method) in channel.bindings
    assert {b for b in channel.bindings if b[1] == lifecycle} == {
        (settings.exchange, lifecycle, m) for m in LIFECYCLE_METHODS
    }
    assert {rk for _, _, rk in channel.bindings if rk in ROUTING_KEYS} == set(ROUTING_KEYS), "every key is bound"


def queues_named(doc: dict[str, Any], suffix: str) -> str:
    (name,) = [q["name"] for q in doc["x-topology"]["queues"] if q["name"].endswith(f".{suffix}")]
    return str(name)


# -- what the transport publishes ----------------------------------------------------------------
class _Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[aio_pika.Message, str]] = []

    async def publish(self, message: aio_pika.Message, routing_key: str, **_: Any) -> None:
        self.published.append((message, routing_key))


class _PublishChannel(FrameChannel):
    """The result channel (aio-pika's publish) and the reply channel, whose frames the bridge
    writes as bytes (decoded here with pamqp): both recorded alike."""

    def __init__(self) -> None:
        super().__init__()
        self.default_exchange = _Recorder()

    async def basic_publish(
        self, body: bytes, *, routing_key: str, properties: Basic.Properties, exchange: str = "", **_: Any
    ) -> None:
        assert exchange == "", "replies go through the default exchange"
        p = properties
        message = aio_pika.Message(
            body,
            content_type=p.content_type,
            content_encoding=p.content_encoding,
            delivery_mode=p.delivery_mode,
            priority=p.priority,
            correlation_id=p.correlation_id,
            reply_to=p.reply_to,
            message_id=p.message_id,
            type=p.message_type,
            user_id=p.user_id,
            app_id=p.app_id,
            headers=p.headers,
        )
        self.default_exchange.published.append((message, routing_key))


REPLY_TO = "amq.rabbitmq.reply-to.g1h2AAlyZXh1c0BvbmUAAF0nAAAAAAAAAAA=.Z3Vlc3Q="  # as the broker rewrites it


class _Incoming:
    """Just enough of an aio_pika incoming message for the handlers."""

    def __init__(
        self,
        body: Any,
        *,
        routing_key: str,
        user_id: str | None = "worker-a",
        reply_to: str | None = REPLY_TO,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> None:
        self.body = body if isinstance(body, bytes) else orjson.dumps(body)
        self.routing_key = routing_key
        self.redelivered = False
        self.user_id = user_id
        self.reply_to = reply_to
        self.correlation_id: str | None = uuid.uuid4().hex
        self.headers = headers or {}
        self.message_id = message_id
        self.timestamp = None
        self.settled: list[tuple[str, bool]] = []

    @property
    def processed(self) -> bool:
        return bool(self.settled)

    async def ack(self) -> None:
        self.settled.append(("ack", False))

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(("reject", requeue))

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(("nack", requeue))


class _WorkQueue:
    def __init__(self) -> None:
        self.clock = ManualClock(1_700_000_000_000)  # the replies' x-now
        self.error: Exception | None = None
        self.delivery: Delivery | None = None
        self.acked = True
        self.answer: Any = None  # what a lifecycle method of the domain returns (1.4)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []  # and what it was asked

    async def prepare_add(self, owner: str, cmd: AddCommand, *, traceparent: str | None) -> AddCommand:
        if self.error is not None:
            raise self.error
        return cmd

    async def store_add(
        self,
        pending: AddCommand,
        *,
        message_id: str | None,
        first_copy: bool = False,
        replaces: object = None,
    ) -> str:
        return TASK_ID

    async def fetch(self, owner: str, req: FetchRequest, **_: Any) -> Delivery | None:
        if self.error is not None:
            raise self.error
        return self.delivery

    async def ack(self, owner: str, req: AckRequest, *, sent_before_ms: int | None = None) -> bool:
        if self.error is not None:
            raise self.error
        return self.acked

    # -- 1.4: the lifecycle --
    def _lifecycle(self, method: str, *args: Any) -> Any:
        if self.error is not None:
            raise self.error
        self.calls.append((method, args))
        return self.answer

    async def extend(self, owner: str, req: ExtendRequest) -> Extended | None:
        return cast(Extended | None, self._lifecycle("extend", req))

    async def fail(self, owner: str, req: FailRequest) -> Failed | None:
        return cast(Failed | None, self._lifecycle("fail", req))

    async def cancel(self, owner: str, service: str, task_id: uuid.UUID, *, request_id: str | None = None) -> bool:
        return bool(self._lifecycle("cancel", service, task_id))

    async def purge(self, owner: str, service: str) -> tuple[int, bool]:
        return cast(tuple[int, bool], self._lifecycle("purge", service))

    async def stats(self, owner: str, service: str | None, *, partial: bool = False) -> list[ServiceStats]:
        return cast(list[ServiceStats], self._lifecycle("stats", service))

    async def parked(self, owner: str, service: str, limit: int) -> list[ParkedTask]:
        return cast(list[ParkedTask], self._lifecycle("parked", service, limit))

    async def parked_page(self, owner: str, service: str, limit: int, after: uuid.UUID | None = None) -> ParkedPage:
        answer = self._lifecycle("parked", service, limit, after)
        return answer if isinstance(answer, ParkedPage) else ParkedPage(cast(list[ParkedTask], answer), None)

    async def redrive(self, owner: str, service: str, task_ids: list[uuid.UUID] | None) -> int:
        return int(self._lifecycle("redrive", service, task_ids))

    async def redrive_all(
        self, owner: str, service: str, parked_before_ms: int | None = None, after: uuid.UUID | None = None
    ) -> RedriveRound:
        return cast(RedriveRound, self._lifecycle("redrive", service, parked_before_ms, after))

    async def discard(self, owner: str, service: str, task_ids: list[uuid.UUID]) -> int:
        return int(self._lifecycle("discard", service, task_ids))


def _handle(settings: Settings, queue: _WorkQueue, request: _Incoming) -> list[tuple[aio_pika.Message, str]]:
    transport = _transport(settings, queue)
    channel = _PublishChannel()
    transport._publish_channel = cast(Any, channel)
    transport._reply_channel = cast(Any, channel)
    transport.replies.main = cast(Any, channel)
    transport.replies.proven.add(str(reply_node(REPLY_TO)))  # as if seen accepted before
    handler = {"add": transport._on_add, "fetch": transport._on_fetch, "ack": transport._on_ack}.get(
        request.routing_key, transport._on_unrouted
    )
    if request.routing_key in LIFECYCLE_METHODS:
        handler = transport._on_lifecycle  # the lifecycle queue's one consumer, dispatching by routing key
    asyncio.run(handler(cast(Any, request)))
    return channel.default_exchange.published


def amqp_properties(msg: aio_pika.Message) -> dict[str, Any]:
    """The AMQP 0-9-1 properties a message is published with, spelled as the specification does.

    ``message-id`` is left out when the bridge sets none: its AMQP library (aiormq) gives every
    message published without one a random id, on the wire, which this fake does not run."""
    props = {
        "content-type": msg.content_type,
        "content-encoding": msg.content_encoding,
        "delivery-mode": None if msg.delivery_mode is None else int(msg.delivery_mode),
        "priority": msg.priority or None,
        "correlation-id": msg.correlation_id,
        "reply-to": msg.reply_to,
        "expiration": msg.expiration,
        "message-id": msg.message_id,
        "timestamp": msg.timestamp,
        "type": msg.type,
        "user-id": msg.user_id,
        "app-id": msg.app_id,
    }
    return {name: value for name, value in props.items() if value is not None}


def _assert_reply(
    doc: dict[str, Any], published: list[tuple[aio_pika.Message, str]], request: _Incoming, message_key: str
) -> dict[str, Any]:
    assert len(published) == 1
    msg, routing_key = published[0]
    spec = message(doc, message_key)
    assert routing_key == request.reply_to, "replies go to reply_to on the default exchange"
    assert msg.correlation_id == request.correlation_id
    assert msg.content_type == spec["contentType"]
    assert msg.type == spec["bindings"]["amqp"]["messageType"]
    assert_valid(doc, spec["headers"], dict(msg.headers or {}), f"{message_key} headers")
    properties = amqp_properties(msg)
    assert_valid(doc, spec["x-amqp-properties"], properties, f"{message_key} properties")
    documented = deref(doc, spec["x-amqp-properties"])["properties"]
    assert set(properties) == set(documented) - {"correlation-id"} | (
        {"correlation-id"} if request.correlation_id else set()
    ), "every documented reply property is set"
    body = orjson.loads(msg.body)
    assert_valid(doc, spec["payload"], body, f"{message_key} payload")
    assert isinstance(body, dict)
    return body


def test_add_reply_matches_the_document(doc: dict[str, Any], settings: Settings) -> None:
    request = _Incoming(
        {"serviceId": "billing", "value": {"n": 1}, "token": {"p": 1}},
        routing_key="add",
        user_id="engine",
        headers={"x-owner": "worker-a", "traceparent": TRACEPARENT},
        message_id="m-1",
    )
    body = _assert_reply(doc, _handle(settings, _WorkQueue(), request), request, "addReply")
    assert body["task"]["id"] == TASK_ID
    assert "notBefore" not in body["task"], "only delayed tasks say when they are due"
    assert request.settled == [("ack", False)]


def _uuid_ms(task_id: str) -> int:
    """The time of a version 1 UUID, in milliseconds since the Unix epoch."""
    return (uuid.UUID(task_id).time - 0x01B21DD213814000) // 10_000


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.mark.parametrize("delay", [{"delayMs": 60_000}, {"notBefore": "2026-12-02T10:00:00+01:00"}, {"delayMs": 0}])
def test_delayed_add_reply_says_when_the_task_is_due(
    doc: dict[str, Any], settings: Settings, delay: dict[str, Any]
) -> None:
    request = _Incoming({"serviceId": "billing", "value": 1, **delay}, routing_key="add", message_id="m-2")
    body = _assert_reply(doc, _handle(settings, _WorkQueue(), request), request, "addReply")
    # A delayed task's id is its due time: the reply says it in the document's date-time form.
    assert body == {"result": True, "task": {"id": TASK_ID, "notBefore": _iso(_uuid_ms(TASK_ID))}}
    assert request.settled == [("ack", False)]


def test_fetch_replies_match_the_document(doc: dict[str, Any], settings: Settings) -> None:
    queue = _WorkQueue()
    queue.delivery = Delivery(TASK_ID, b"null", 2, 2, 1_735_732_800_123, TRACEPARENT)
    request = _Incoming({"serviceId": "billing", "workerId": "w-1", "timeToRecover": 100}, routing_key="fetch")
    published = _handle(settings, queue, request)
    body = _assert_reply(doc, published, request, "fetchReply")
    assert body == {
        "result": None,
        "task": {
            "id": TASK_ID,
            "epoch": 2,
            "deliveries": 2,
            "leaseExpiresAt": "2025-01-01T12:00:00.123Z",
            "hasToken": False,
        },
    }
    # The reply continues the engine's trace: same trace id, a new span id.
    sent = (published[0][0].headers or {}).get("traceparent")
    assert sent.split("-")[1] == TRACEPARENT.split("-")[1]
    assert sent != TRACEPARENT
    queue.delivery = None
    request = _Incoming({"serviceId": "billing", "workerId": "w-1"}, routing_key="fetch")
    assert _assert_reply(doc, _handle(settings, queue, request), request, "fetchReply") == {"result": None}


@pytest.mark.parametrize("acked", [True, False])
def test_ack_reply_matches_the_document(doc: dict[str, Any], settings: Settings, acked: bool) -> None:
    queue = _WorkQueue()
    queue.acked = acked
    request = _Incoming({"serviceId": "billing", "workerId": "w-1", "result": 0}, routing_key="ack")
    assert _assert_reply(doc, _handle(settings, queue, request), request, "ackReply") == {"result": acked}


def test_ack_with_next_replies_match_the_document(doc: dict[str, Any], settings: Settings) -> None:
    """1.6: the next task as a fetch reply beside the ack's answer, with its trace; or the fetch's error."""
    queue = _WorkQueue()
    queue.acked = True
    queue.delivery = Delivery(TASK_ID, b'{"n":1}', 1, 1, 1_735_732_800_123, TRACEPARENT)
    body = {"serviceId": "billing", "workerId": "w-1", "result": 0, "next": {"fresh": True, "timeToRecover": 1000}}
    request = _Incoming(body, routing_key="ack")
    published = _handle(settings, queue, request)
    reply = _assert_reply(doc, published, request, "ackReply")
    assert reply["result"] is True and reply["next"]["result"] == {"n": 1}
    assert reply["next"]["task"]["id"] == TASK_ID
    sent = (published[0][0].headers or {}).get("traceparent")
    assert sent.split("-")[1] == TRACEPARENT.split("-")[1]
    queue.delivery = None
    request = _Incoming(body, routing_key="ack")
    assert _assert_reply(doc, _handle(settings, queue, request), request, "ackReply") == {
        "result": True,
        "next": {"result": None},
    }

    class _FetchFails(_WorkQueue):
        async def fetch(self, owner: str, req: FetchRequest, **_: Any) -> Delivery | None:
            raise Unavailable("cassandra unavailable")

    failing = _FetchFails()
    failing.acked = True
    request = _Incoming(body, routing_key="ack")
    reply = _assert_reply(doc, _handle(settings, failing, request), request, "ackReply")
    assert reply["result"] is True and reply["next"]["error"]["code"] == "unavailable"
    assert request.settled == [("ack", False)]  # the ack is done: settled, never requeued


TASK_UUID = uuid.UUID(TASK_ID)
OTHER_ID = "7b2c8d3f-9d3f-11ef-8a2b-0242ac120002"
AT_MS = 1_735_732_800_123
AT = "2025-01-01T12:00:00.123Z"
W = {"serviceId": "billing", "workerId": "w-1"}


# method, request body, what the domain answers, the reply the worker gets
LIFECYCLE_REPLIES: list[tuple[str, dict[str, Any], Any, dict[str, Any]]] = [
    (
        "extend",
        {**W, "taskId": TASK_ID, "epoch": 2, "timeToRecover": 1000},
        Extended(TASK_UUID, 2, AT_MS),
        {"result": True, "task": {"id": TASK_ID, "epoch": 2, "leaseExpiresAt": AT}},
    ),
    ("extend", W, None, {"result": False}),
    (
        "fail",
        {**W, "taskId": TASK_ID, "epoch": 3, "error": {"why": "timeout"}, "retryInMs": 500},
        Failed(TASK_UUID, 3, False, AT_MS),
        {"result": True, "task": {"id": TASK_ID, "deliveries": 3, "parked": False, "retryAt": AT}},
    ),
    (
        "fail",
        W,
        Failed(TASK_UUID, 10, True, None),
        {"result": True, "task": {"id": TASK_ID, "deliveries": 10, "parked": True, "retryAt": None}},
    ),
    ("fail", W, None, {"result": False}),
    ("cancel", {"serviceId": "billing", "taskId": TASK_ID}, True, {"result": True}),
    ("cancel", {"serviceId": "billing", "taskId": TASK_ID}, False, {"result": False}),
    ("purge", {"serviceId": "billing"}, (5, True), {"result": {"purged": 5, "more": True}}),
    ("purge", {"serviceId": "billing"}, (0, False), {"result": {"purged": 0, "more": False}}),
    (
        "stats",
        {},
        [ServiceStats("billing", 1, 2, 3, 4, 1500), ServiceStats("mail", 0, 0, 0, 0, None)],
        {
            "result": {
                "services": [
                    {
                        "serviceId": "billing",
                        "ready": 1,
                        "inFlight": 2,
                        "delayed": 3,
                        "parked": 4,
                        "oldestReadyAgeMs": 1500,
                    },
                    {
                        "serviceId": "mail",
                        "ready": 0,
                        "inFlight": 0,
                        "delayed": 0,
                        "parked": 0,
                        "oldestReadyAgeMs": None,
                    },
                ]
            }
        },
    ),
    ("stats", {"serviceId": "billing"}, [], {"result": {"services": []}}),
    (
        "parked",
        {"serviceId": "billing", "limit": 2},
        [
            ParkedTask(TASK_UUID, 3, PARK_FAILED, AT_MS, True, b'{"why":"timeout"}'),
            ParkedTask(uuid.UUID(OTHER_ID), 10, PARK_DELIVERY_LIMIT, AT_MS, False, None),
        ],
        {
            "result": {
                "tasks": [
                    {
                        "id": TASK_ID,
                        "deliveries": 3,
                        "reason": "failed",
                        "lastError": {"why": "timeout"},
                        "parkedAt": AT,
                        "addedAt": _iso(_uuid_ms(TASK_ID)),
                        "hasToken": True,
                    },
                    {
                        "id": OTHER_ID,
                        "deliveries": 10,
                        "reason": "delivery_limit",
                        "lastError": None,
                        "parkedAt": AT,
                        "addedAt": _iso(_uuid_ms(OTHER_ID)),
                        "hasToken": False,
                    },
                ],
                "after": None,
            }
        },
    ),
    (
        "parked",
        {"serviceId": "billing", "limit": 1, "after": OTHER_ID},
        ParkedPage([ParkedTask(TASK_UUID, 1, PARK_FAILED, AT_MS, False, None)], TASK_UUID),
        {
            "result": {
                "tasks": [
                    {
                        "id": TASK_ID,
                        "deliveries": 1,
                        "reason": "failed",
                        "lastError": None,
                        "parkedAt": AT,
                        "addedAt": _iso(_uuid_ms(TASK_ID)),
                        "hasToken": False,
                    }
                ],
                "after": TASK_ID,
            }
        },
    ),
    (
        "redrive",
        {"serviceId": "billing", "all": True},
        RedriveRound(2, AT_MS, None),
        {"result": {"redriven": 2, "parkedBefore": AT}},
    ),
    (
        "redrive",
        {"serviceId": "billing", "all": True, "parkedBefore": AT, "after": OTHER_ID},
        RedriveRound(1000, AT_MS, TASK_UUID),
        {"result": {"redriven": 1000, "parkedBefore": AT, "after": TASK_ID}},
    ),
    ("redrive", {"serviceId": "billing", "taskIds": [TASK_ID, OTHER_ID]}, 1, {"result": {"redriven": 1}}),
    ("discard", {"serviceId": "billing", "taskIds": [TASK_ID]}, 1, {"result": {"discarded": 1}}),
]


def test_every_lifecycle_method_has_reply_cases() -> None:
    assert {case[0] for case in LIFECYCLE_REPLIES} == set(LIFECYCLE_METHODS)


@pytest.mark.parametrize(("method", "request_body", "answer", "expected"), LIFECYCLE_REPLIES)
def test_lifecycle_replies_match_the_document(
    doc: dict[str, Any], settings: Settings, method: str, request_body: dict[str, Any], answer: Any, expected: Any
) -> None:
    queue = _WorkQueue()
    queue.answer = answer
    request = _Incoming(request_body, routing_key=method)
    body = _assert_reply(doc, _handle(settings, queue, request), request, REQUESTS[method][2])
    assert body == expected
    assert [name for name, _ in queue.calls] == [method], "dispatched by routing key on the lifecycle queue"
    assert request.settled == [("ack", False)]


def _first_example(doc: dict[str, Any], method: str) -> dict[str, Any]:
    payload = message(doc, REQUESTS[method][0])["examples"][0]["payload"]
    assert isinstance(payload, dict)
    return payload


@pytest.mark.parametrize("method", LIFECYCLE_METHODS)
def test_lifecycle_methods_follow_the_rpc_fates(doc: dict[str, Any], settings: Settings, method: str) -> None:
    """The documented fates (the fetch/ack column) hold for the lifecycle methods, with the
    document's own example as the request."""
    queue = _WorkQueue()
    queue.error = Unavailable("storage unavailable: test")
    request = _Incoming(_first_example(doc, method), routing_key=method)
    body = _assert_reply(doc, _handle(settings, queue, request), request, "errorReply")
    assert body["error"]["code"] == "unavailable"
    assert request.settled == [("ack", False)], "answered and acked: the caller retries"

    queue.error = RuntimeError("boom")
    request = _Incoming(_first_example(doc, method), routing_key=method)
    body = _assert_reply(doc, _handle(settings, queue, request), request, "errorReply")
    assert body["error"]["code"] == "internal"
    # A redrive's delivery is acknowledged before it paces (the document's redrive channel): an
    # error after that is answered only, as a waiting fetch's is.
    assert request.settled == ([("ack", False)] if method == "redrive" else [("reject", False)])

    request = _Incoming(_first_example(doc, method), routing_key=method, reply_to=None)
    assert _handle(settings, _WorkQueue(), request) == [], "an RPC without reply_to cannot be answered"
    assert request.settled == [("reject", False)]


@pytest.mark.parametrize(
    ("request_kw", "code"),
    [
        ({"body": b"not json", "routing_key": "add"}, "bad_request"),
        ({"body": [1], "routing_key": "fetch"}, "bad_request"),
        ({"body": {"serviceId": "billing"}, "routing_key": "fetch"}, "bad_request"),
        ({"body": {"serviceId": "s", "workerId": "w", "timeToRecover": 99}, "routing_key": "fetch"}, "bad_request"),
        ({"body": {"serviceId": "s", "workerId": "w"}, "routing_key": "ack", "user_id": None}, "unauthorized"),
        ({"body": {"serviceId": "s", "value": 1}, "routing_key": "add", "headers": {"x-owner": "b"}}, "unauthorized"),
        ({"body": {"serviceId": "s", "workerId": "w"}, "routing_key": "fecth"}, "bad_request"),
        (
            {"body": {"serviceId": "s", "value": 1}, "routing_key": "add", "headers": {"x-owner": b"\xff\xfe"}},
            "bad_request",
        ),
        (
            {"body": {"serviceId": "s", "workerId": "w"}, "routing_key": "fetch", "headers": {"x-owner": "o" * 70_000}},
            "bad_request",
        ),
        (
            {"body": {"serviceId": "s", "workerId": "w"}, "routing_key": "fetch", "headers": {"x-deadline": "soon"}},
            "bad_request",
        ),
        ({"body": {"serviceId": "s", "workerId": "w", "taskId": 7}, "routing_key": "ack"}, "bad_request"),
        ({"body": b'{"serviceId": "s", "value": NaN}', "routing_key": "add"}, "bad_request"),
        # 1.4
        (
            {
                "body": {"serviceId": "s", "value": 1, "delayMs": 1, "notBefore": "2026-12-02T10:00:00Z"},
                "routing_key": "add",
            },
            "bad_request",
        ),
        (
            {"body": {"serviceId": "s", "value": 1, "notBefore": "2026-12-02T10:00:00"}, "routing_key": "add"},
            "bad_request",
        ),
        ({"body": {"serviceId": "s", "value": 1, "delayMs": -1}, "routing_key": "add"}, "bad_request"),
        ({"body": {"serviceId": "s", "value": 1, "maxDeliveries": 1001}, "routing_key": "add"}, "bad_request"),
        ({"body": {"serviceId": "s", "value": 1, "priority": 4}, "routing_key": "add"}, "bad_request"),
        ({"body": {"serviceId": "s", "value": 1, "priority": "1"}, "routing_key": "add"}, "bad_request"),
        ({"body": {"serviceId": "s"}, "routing_key": "extend"}, "bad_request"),
        ({"body": {"serviceId": "s", "workerId": "w", "timeToRecover": 99}, "routing_key": "extend"}, "bad_request"),
        ({"body": {"serviceId": "s", "workerId": "w", "retryInMs": 86_400_001}, "routing_key": "fail"}, "bad_request"),
        ({"body": {"serviceId": "s", "workerId": "w", "taskId": 7}, "routing_key": "fail"}, "bad_request"),
        ({"body": {"serviceId": "s", "taskId": "not-a-uuid"}, "routing_key": "cancel"}, "bad_request"),
        ({"body": {"serviceId": "s"}, "routing_key": "cancel"}, "bad_request"),
        ({"body": {}, "routing_key": "purge"}, "bad_request"),
        ({"body": {"serviceId": ""}, "routing_key": "stats"}, "bad_request"),
        ({"body": {"serviceId": "s", "limit": 1001}, "routing_key": "parked"}, "bad_request"),
        ({"body": {"serviceId": "s"}, "routing_key": "redrive"}, "bad_request"),
        ({"body": {"serviceId": "s", "taskIds": [TASK_ID], "all": True}, "routing_key": "redrive"}, "bad_request"),
        ({"body": {"serviceId": "s", "taskIds": []}, "routing_key": "discard"}, "bad_request"),
        ({"body": {"serviceId": "s", "workerId": "w"}, "routing_key": "fail", "user_id": None}, "unauthorized"),
    ],
)
def test_bad_input_is_answered_then_dead_lettered(
    doc: dict[str, Any], settings: Settings, request_kw: dict[str, Any], code: str
) -> None:
    request = _Incoming(**request_kw)
    body = _assert_reply(doc, _handle(settings, _WorkQueue(), request), request, "errorReply")
    assert body["error"]["code"] == code
    assert request.settled == [("reject", False)], "rejected without requeue: RabbitMQ dead-letters it"


def test_rpc_without_reply_to_is_dead_lettered_silently(settings: Settings) -> None:
    request = _Incoming({"serviceId": "s", "workerId": "w"}, routing_key="fetch", reply_to=None)
    assert _handle(settings, _WorkQueue(), request) == []
    assert request.settled == [("reject", False)]


@pytest.mark.parametrize("method", ["fetch", "ack"])
def test_unavailable_rpc_is_answered_and_not_dead_lettered(
    doc: dict[str, Any], settings: Settings, method: str
) -> None:
    queue = _WorkQueue()
    queue.error = Unavailable("storage unavailable: test")
    request = _Incoming({"serviceId": "s", "workerId": "w"}, routing_key=method)
    body = _assert_reply(doc, _handle(settings, queue, request), request, "errorReply")
    assert body["error"]["code"] == "unavailable"
    assert request.settled == [("ack", False)]


def test_unavailable_add_is_requeued_without_a_reply(settings: Settings) -> None:
    queue = _WorkQueue()
    queue.error = Unavailable("storage unavailable: test")
    request = _Incoming({"serviceId": "s", "value": 1}, routing_key="add", message_id="m-1")
    # No consumers are registered on this transport, so the add is handed back at once
    # instead of being retried for ADD_RETRY_BUDGET_S first.
    assert _handle(settings, queue, request) == [], "no reply yet: the add's one reply comes when it is over"
    assert request.settled == [("nack", True)], "requeued, never dead-lettered"


def test_unexpected_rpc_failure_is_internal_and_dead_lettered(doc: dict[str, Any], settings: Settings) -> None:
    queue = _WorkQueue()
    queue.error = RuntimeError("boom")
    request = _Incoming({"serviceId": "s", "workerId": "w"}, routing_key="ack")
    body = _assert_reply(doc, _handle(settings, queue, request), request, "errorReply")
    assert body["error"]["code"] == "internal"
    assert request.settled == [("reject", False)], "kept in the dead-letter queue for inspection"


@pytest.mark.parametrize("method", ["add", "ack"])
def test_payload_too_large_is_dead_lettered_for_add_and_ack_alike(
    doc: dict[str, Any], settings: Settings, method: str
) -> None:
    queue = _WorkQueue()
    queue.error = PayloadTooLarge("the outcome is too large")
    body = {"serviceId": "s", "value": 1} if method == "add" else {"serviceId": "s", "workerId": "w", "result": 1}
    request = _Incoming(body, routing_key=method)
    reply = _assert_reply(doc, _handle(settings, queue, request), request, "errorReply")
    assert reply["error"]["code"] == "payload_too_large"
    assert request.settled == [("reject", False)]


@pytest.mark.parametrize(
    ("outcome", "traceparent"),
    [({"result": 0}, TRACEPARENT), ({"result": None}, None), ({"error": {"msg": "no"}}, None)],
)
def test_result_message_matches_the_document(
    doc: dict[str, Any], settings: Settings, outcome: dict[str, Any], traceparent: str | None
) -> None:
    results = ResultPublisher(settings)
    exchange = _Recorder()
    results.attach(cast(Any, exchange))
    completion = str(uuid.uuid4())
    ((kind, value),) = outcome.items()
    result = ResultMessage(
        "worker-a", "billing", TASK_ID, completion, b'{"p":1}', kind, orjson.dumps(value), traceparent
    )
    asyncio.run(results.publish_result(result))

    assert len(exchange.published) == 1
    msg, routing_key = exchange.published[0]
    spec = message(doc, "result")
    body = orjson.loads(msg.body)
    assert_valid(doc, spec["payload"], body, "result payload")
    assert body == {"token": {"p": 1}, "serviceId": "billing", "taskId": TASK_ID, **outcome}
    assert routing_key == body["serviceId"], "routing key = serviceId"
    assert_valid(doc, spec["headers"], dict(msg.headers or {}), "result headers")
    properties = amqp_properties(msg)
    assert_valid(doc, spec["x-amqp-properties"], properties, "result properties")
    assert set(properties) == set(deref(doc, spec["x-amqp-properties"])["properties"]), "every one of them is set"
    assert msg.message_id == f"{TASK_ID}:{completion}"
    assert (msg.headers or {}).get("x-owner") == "worker-a"
    sent = (msg.headers or {}).get("traceparent")
    if traceparent is None:
        assert sent is None
    else:
        assert sent.split("-")[1] == traceparent.split("-")[1]
    assert msg.content_type == spec["contentType"]
    assert msg.type == spec["bindings"]["amqp"]["messageType"]
    assert msg.delivery_mode == doc["operations"]["sendResult"]["bindings"]["amqp"]["deliveryMode"]


# -- 1.4: the engine's delivery_limit result, from the real domain --------------------------------
def _parked_results(tmp_path: Path, reason: str) -> list[ResultMessage]:
    """A task with a token and ``maxDeliveries: 1`` parked for ``reason`` on the in-memory store;
    what the result relay sends the engine."""
    path = tmp_path / "keyring.json"
    write_keyring(path, generate_keyring([OWNER]))
    clock = ManualClock(1_700_000_000_000)
    h = Harness(MemoryTaskStore(clock.now_ms, TTL_S), KeyringFileProvider(path), clock, prefix="")

    async def scenario() -> None:
        body = {"serviceId": h.service, "value": 1, "token": {"p": 1}, "maxDeliveries": 1}
        task_id = await h.queue.add(OWNER, parse(AddCommand, body), message_id=None, traceparent=None)
        delivery = await h.fetch("w-1", ttr_ms=100)
        assert delivery is not None and delivery.task_id == task_id
        if reason == PARK_FAILED:
            req = {**W, "serviceId": h.service, "taskId": task_id, "epoch": delivery.epoch, "error": {"why": "x"}}
            failed = await h.queue.fail(OWNER, parse(FailRequest, req))
            assert failed is not None and failed.parked and failed.retry_at_ms is None
        else:
            for _ in range(20):  # the lease runs out, the scheduler meets it: its last delivery
                await h.advance(100 + MARGIN_MS)
        await h.queue.drain_background(5.0)
        parked = await h.queue.parked(OWNER, h.service, 10)
        assert [(str(t.task_id), t.reason) for t in parked] == [(task_id, reason)]

    asyncio.run(scenario())
    return h.sink.messages


@pytest.mark.parametrize("reason", [PARK_DELIVERY_LIMIT, PARK_FAILED])
def test_delivery_limit_result_matches_the_document(
    doc: dict[str, Any], settings: Settings, tmp_path: Path, reason: str
) -> None:
    (result,) = _parked_results(tmp_path, reason)  # once per park
    results = ResultPublisher(settings)
    exchange = _Recorder()
    results.attach(cast(Any, exchange))
    asyncio.run(results.publish_result(result))

    ((msg, routing_key),) = exchange.published
    spec = message(doc, "result")
    body = orjson.loads(msg.body)
    assert_valid(doc, spec["payload"], body, "delivery_limit result payload")
    assert_valid(doc, doc["components"]["schemas"]["DeliveryLimitError"], body["error"], "delivery_limit error")
    assert body["error"]["code"] == PARK_DELIVERY_LIMIT, "whichever the reason of the park"
    assert body["error"]["deliveries"] == 1
    assert body["token"] == {"p": 1} and "result" not in body
    assert routing_key == body["serviceId"]
    assert_valid(doc, spec["headers"], dict(msg.headers or {}), "delivery_limit result headers")
    assert_valid(doc, spec["x-amqp-properties"], amqp_properties(msg), "delivery_limit result properties")
    assert msg.message_id is not None and msg.message_id.startswith(f"{body['taskId']}:"), "names the park"


# -- replies without a correlation-id (documented, not refused: old clients keep working) ---------
def test_a_request_without_correlation_id_is_answered_without_one(doc: dict[str, Any], settings: Settings) -> None:
    request = _Incoming({"serviceId": "billing", "workerId": "w-1"}, routing_key="fetch")
    request.correlation_id = None
    ((msg, _),) = _handle(settings, _WorkQueue(), request)
    assert msg.correlation_id is None, "nothing to echo: the caller cannot match this reply"
    assert orjson.loads(msg.body) == {"result": None}
    assert_valid(doc, message(doc, "fetchReply")["x-amqp-properties"], amqp_properties(msg), "reply properties")
    assert request.settled == [("ack", False)], "executed and answered like any other"
    correlation = deref(doc, doc["components"]["schemas"]["RpcRequestProperties"])
    assert "correlation-id" not in correlation["required"], "documented as it behaves: not checked"


# -- completedAt: from the stored completion, the same on every re-publication --------------------
def test_completed_at_is_published_as_documented(doc: dict[str, Any], settings: Settings) -> None:
    results = ResultPublisher(settings)
    exchange = _Recorder()
    results.attach(cast(Any, exchange))
    completion = timeuuid_from_ms(AT_MS)
    assert completed_at_ms(completion) == AT_MS, "a time-based completion id carries its time"
    assert completed_at_ms(uuid.uuid4()) is None, "a random one says nothing"
    message_ = ResultMessage(
        "worker-a", "billing", TASK_ID, str(completion), b"1", "result", b"2", None, completed_at_ms(completion)
    )
    asyncio.run(results.publish_result(message_))
    asyncio.run(results.publish_result(message_))  # a re-publication
    bodies = [orjson.loads(msg.body) for msg, _ in exchange.published]
    expected = {"token": 1, "serviceId": "billing", "taskId": TASK_ID, "result": 2, "completedAt": AT}
    assert bodies == [expected, expected]
    spec = message(doc, "result")
    assert_valid(doc, spec["payload"], bodies[0], "result payload with completedAt")
    assert exchange.published[0][0].message_id == f"{TASK_ID}:{completion}"


def _acked_results(tmp_path: Path) -> tuple[list[ResultMessage], int]:
    """A task with a token acked on the in-memory store, then its outbox entry re-published as the
    result relay does after a crash: the results sent, and the clock at the ack."""
    path = tmp_path / "keyring.json"
    write_keyring(path, generate_keyring([OWNER]))
    clock = ManualClock(1_700_000_000_000)
    h = Harness(MemoryTaskStore(clock.now_ms, TTL_S), KeyringFileProvider(path), clock, prefix="")

    async def scenario() -> int:
        await h.add(1, token={"p": 1})
        delivery = await h.fetch("w-1")
        assert delivery is not None
        acked_at = clock.now_ms()
        assert await h.ack("w-1", delivery, result="done")
        await h.queue.drain_background(5.0)
        clock.advance(60_000)
        store = cast(MemoryTaskStore, h.store)
        (entry,) = [e for rows in store.outbox_rows.values() for e in rows.values()]
        await h.queue.publish(entry)  # the relay's re-publication
        return acked_at

    acked_at = asyncio.run(scenario())
    return h.sink.messages, acked_at


def test_a_republished_result_keeps_its_completion(tmp_path: Path) -> None:
    first, again = _acked_results(tmp_path)[0]
    assert (first.completion_id, first.completed_at_ms) == (again.completion_id, again.completed_at_ms)


def test_results_say_when_the_ack_was_decided(tmp_path: Path) -> None:
    (first, again), acked_at = _acked_results(tmp_path)
    assert first.completed_at_ms == again.completed_at_ms == acked_at


# -- the RabbitMQ permissions in the document are what `queue-bridge permissions` prints ----------
def test_permission_lines_are_what_the_cli_prints(
    doc: dict[str, Any], settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from bridge.cli import app

    monkeypatch.chdir(tmp_path)  # no .env file: the default names
    args = ["permissions", "--bridge-user", "queue-bridge", "--engine", "engine", "--worker", "worker-a"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    printed = out.output.strip().splitlines()
    description = doc["info"]["description"]
    section = description[description.index("## RabbitMQ permissions") :]
    block = section[section.index("```sh\n") + len("```sh\n") :]
    documented = block[: block.index("```")].strip().splitlines()
    assert documented == printed
    assert [line.split()[4] for line in printed if line.startswith("rabbitmqctl")] == [
        "queue-bridge",
        "engine",
        "worker-a",
    ]


# -- the recovery delay: one figure, from the settings, in every document that states it ---------
def test_the_recovery_delay_is_stated_alike_everywhere(doc: dict[str, Any], settings: Settings) -> None:
    root = DOC_PATH.parents[1]
    margin, tick = settings.clock_skew_margin, settings.scheduler_interval
    bound = f"at most {round((margin + tick) * 1000)} ms after the deadline"
    texts = {
        "docs/asyncapi.yaml": " ".join(doc["info"]["description"].split()),
        "README.md": " ".join((root / "README.md").read_text(encoding="utf-8").split()),
        "docs/performance.md": " ".join((root / "docs" / "performance.md").read_text(encoding="utf-8").split()),
    }
    for name, text in texts.items():
        assert f"`BRIDGE_CLOCK_SKEW_MARGIN` ({margin * 1000:g} ms) after its deadline" in text, name
        assert f"(`BRIDGE_SCHEDULER_INTERVAL`, {tick:g} s)" in text, name
        assert bound in text, name
