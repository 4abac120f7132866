"""The gateway's OpenAPI 3.1 document, generated from the request models (the AMQP handlers' own),
the reply models (:mod:`bridge.gateway.replies`) and the endpoint table.

Served at ``GET /openapi.json``; a copy is committed as ``docs/openapi.json`` (a unit test keeps it
equal to this). Regenerate it with ``python -m bridge.gateway.openapi > docs/openapi.json``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import BaseModel

from bridge.gateway import replies
from bridge.gateway.endpoints import ENDPOINTS, OPENAPI_PATH, STATS_ALL, STATS_ALL_PATH, Endpoint

CONTRACT_VERSION = "1.11.0"  # docs/asyncapi.yaml info.version: the gateway mirrors that contract
REF = "#/components/schemas/{model}"

DESCRIPTION = """\
The queue-bridge wire contract (docs/asyncapi.yaml) over HTTP: one endpoint per AMQP method, the
same request bodies (without `serviceId`, which comes from the path; a body `serviceId` that differs
from the path's is bad_request), the same limits, the same reply bodies.

Every path but this document and the operator console's page (`GET /console`, which holds no
data) needs `Authorization: Bearer qb_<id>_<secret>` (an API key of
BRIDGE_GATEWAY_KEYS_FILE, made with `queue-bridge gateway-key`). A trusted key may act for any
owner with `X-Owner`; other keys only for their own owner (403 otherwise).

Errors answer `{"error": {"code", "message"}}` with the contract's code; the status says the same
for HTTP: bad_request 400 (404 no such path, 405 wrong method, 408 a body not received within
BRIDGE_HTTP_READ_TIMEOUT, 415 not JSON), unauthorized 401
(no or invalid credentials) or 403 (valid key, not allowed), unknown_owner 403,
payload_too_large 413, integrity_error 422, unavailable 503 (retry; Retry-After), internal 500.
A key with BRIDGE_GATEWAY_MAX_IN_FLIGHT_PER_KEY requests in flight is answered 503 (Retry-After)
until one ends; so is a purge, stats, parked, discard or redrive past the bridge's bound on those
(shared with AMQP: 32 at once, 64 redrives), nothing of it done. JSON answers say
`Cache-Control: no-store` and `X-Content-Type-Options: nosniff`.

A request whose client hangs up is still carried out to its end (an add, an ack, a redrive...):
retry it with the same Idempotency-Key (add, cancel) or the same taskId and epoch (ack, extend, fail). A
fetch (long-poll or not) whose client hangs up stops waiting and claims nothing more; if its claim was
already under way, the reply is lost but the task stays leased to that workerId until its
timeToRecover runs out, or until the worker's next fetch without `fresh`, which hands it the same
task again.
"""

ERRORS: dict[str, str] = {
    "400": "bad_request: malformed JSON, wrong types, missing fields, a bad header",
    "401": "unauthorized: no credentials, malformed ones, an unknown key or a wrong secret",
    "403": "unauthorized (a key that is not trusted sent another owner in X-Owner) or unknown_owner",
    "408": "bad_request: the body was not received within BRIDGE_HTTP_READ_TIMEOUT",
    "413": "payload_too_large: the body, or the value or result in it, is over the limit",
    "415": "bad_request: the body is not application/json",
    "422": "integrity_error: stored data failed authentication",
    "500": "internal: a bug (see the bridge log)",
    "503": "unavailable: Cassandra or the key provider is down, the bridge is stopping, the key has "
    "too many requests in flight, or the bridge runs its most long lifecycle requests; retry",
}

SERVICE_ID_NOTE = "Optional here: it comes from the path. A value different from the path's is bad_request."


class _Components:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def add(self, name: str, schema: dict[str, Any]) -> dict[str, str]:
        schema = copy.deepcopy(schema)
        self.schemas.update(schema.pop("$defs", {}))
        self.schemas[name] = schema
        return {"$ref": REF.format(model=name)}

    def reply(self, model: type[BaseModel]) -> dict[str, str]:
        return self.add(model.__name__, model.model_json_schema(by_alias=True, ref_template=REF))

    def body(self, model: type[BaseModel]) -> dict[str, str]:
        """The AMQP request model as an HTTP body: ``serviceId`` optional (the path's)."""
        schema = model.model_json_schema(by_alias=True, ref_template=REF, mode="validation")
        required = [f for f in schema.get("required", []) if f != "serviceId"]
        if required:
            schema["required"] = required
        else:
            schema.pop("required", None)
        props = schema.get("properties", {})
        if "serviceId" in props:
            props["serviceId"] = {**props["serviceId"], "description": SERVICE_ID_NOTE}
        _task_ids_are_uuids(props)
        return self.add(model.__name__, schema)


def _task_ids_are_uuids(props: dict[str, Any]) -> None:
    """Task ids are UUIDs (the models check it after reading a string): say so in the schema."""
    for node in (props.get("taskId"), (props.get("taskIds") or {}).get("items")):
        for option in [node, *(node or {}).get("anyOf", [])]:
            if isinstance(option, dict) and option.get("type") == "string":
                option.setdefault("format", "uuid")
    for option in (props.get("taskIds") or {}).get("anyOf", []):
        if isinstance(option, dict) and option.get("type") == "array":
            _task_ids_are_uuids({"taskIds": option})


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": schema}


def _service_param() -> dict[str, Any]:
    schema = copy.deepcopy(ENDPOINTS[0].model.model_json_schema(by_alias=True)["properties"]["serviceId"])
    schema.pop("title", None)
    return {
        "name": "serviceId",
        "in": "path",
        "required": True,
        "description": "The service (queue).",
        "schema": schema,
    }


X_OWNER = _header(
    "X-Owner",
    "Act for this owner (trusted keys only; another key may only name its own owner); empty: the key's own"
    " owner. AMQP: x-owner.",
    {"type": "string", "maxLength": 255, "pattern": "^[^\\x00-\\x1f\\x7f]*$"},
)
IDEMPOTENCY_KEY = _header(
    "Idempotency-Key",
    "Makes the add idempotent: the same key adds one task, whose id every repeat answers (printable"
    " characters, UTF-8; empty: no key). AMQP: x-idempotency-key.",
    {"type": "string", "maxLength": 255, "pattern": "^[^\\x00-\\x1f\\x7f]*$"},
)
CANCEL_KEY = _header(
    "Idempotency-Key",
    "Names this cancel: sent again with the same key (its reply lost), it answers true again as the"
    " first did; without a key, a copy answers false (the task is cancelled already). AMQP: the"
    " message-id, else the correlation-id.",
    {"type": "string", "maxLength": 255, "pattern": "^[^\\x00-\\x1f\\x7f]*$"},
)
PARTIAL = {
    "name": "partial",
    "in": "query",
    "required": False,
    "description": "(1.10) true: answer the queues whose counts can be read now and name the others in"
    " `unavailable`; else one queue that cannot be read makes the request 503, retried as any.",
    "schema": {"type": "boolean", "default": False},
}
TRACEPARENT = _header(
    "traceparent",
    "W3C trace context, kept with the task; the fetch that hands it out answers a child of it.",
    {"type": "string"},
)


def _operation(ep: Endpoint, components: _Components, errors: dict[str, Any], *, with_body: bool) -> dict[str, Any]:
    params = [X_OWNER]
    if with_body:
        params = [_service_param(), *params]
    if ep.method == "add":
        params += [IDEMPOTENCY_KEY, TRACEPARENT]
    if ep.method == "cancel":
        params += [CANCEL_KEY]
    if not with_body:  # GET /api/queue/stats
        params += [PARTIAL]
    op: dict[str, Any] = {
        "operationId": ep.method if with_body else "statsAll",
        "summary": ep.summary,
        "description": f"The `{ep.method}` request of the wire contract (AMQP routing key `{ep.method}`).",
        "tags": ["queue"],
        "parameters": params,
    }
    if with_body:
        op["requestBody"] = {
            "required": True,
            "description": "The AMQP request body without serviceId (an empty body is {}).",
            "content": {"application/json": {"schema": components.body(ep.model)}},
        }
    ok = _json(components.reply(ep.reply), "The reply, as on AMQP.")
    if ep.method == "fetch":
        ok["headers"] = {
            "traceparent": {"description": "A child of the add's trace context.", "schema": {"type": "string"}}
        }
    op["responses"] = {"200": ok, **errors}
    return op


def document() -> dict[str, Any]:
    components = _Components()
    error_ref = components.reply(replies.ErrorReply)
    errors: dict[str, Any] = {status: _json(error_ref, text) for status, text in ERRORS.items()}
    errors["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    errors["503"]["headers"] = {"Retry-After": {"description": "Seconds.", "schema": {"type": "integer"}}}
    paths: dict[str, Any] = {}
    for ep in ENDPOINTS:
        paths[ep.path] = {"post": _operation(ep, components, errors, with_body=True)}
    stats_errors = {k: v for k, v in errors.items() if k not in ("408", "413", "415")}
    paths[STATS_ALL_PATH] = {"get": _operation(STATS_ALL, components, stats_errors, with_body=False)}
    paths[OPENAPI_PATH] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document (public: no credentials needed)",
            "tags": ["meta"],
            "security": [],
            "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "queue-bridge HTTP gateway", "version": CONTRACT_VERSION, "description": DESCRIPTION},
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.schemas.items())),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "qb_<id>_<secret>",
                    "description": "An API key of BRIDGE_GATEWAY_KEYS_FILE (`queue-bridge gateway-key` makes one).",
                }
            },
        },
    }


def dumps(doc: dict[str, Any]) -> bytes:
    """The document as committed in docs/openapi.json: indented, keys in order, a final newline."""
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


if __name__ == "__main__":
    import sys

    sys.stdout.buffer.write(dumps(document()))
