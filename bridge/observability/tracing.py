"""W3C trace context (``traceparent``) carried through the queue: validate it, and derive a child.

The bridge does not create OpenTelemetry spans itself; it carries the trace on, so that the
fetch reply and the result message belong to the trace of the add that created the task.
Pure functions, no global state (https://www.w3.org/TR/trace-context/#traceparent-header).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any

HEADER = "traceparent"

_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# version-traceid-parentid-flags, lowercase hex only (the spec says to ignore anything else).
_V00 = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# A later version: the same first four fields; anything after them must start with "-".
_FUTURE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def _parse(value: str) -> tuple[str, str, str] | None:
    """(trace_id, parent_id, flags) of a valid traceparent, else None."""
    value = value.strip()
    m = _V00.match(value)
    if m is not None:
        trace_id, parent_id, flags = m.groups()
    else:
        f = _FUTURE.match(value)
        if f is None or f.group(1) in ("00", "ff"):  # 00 must match exactly; ff is forbidden
            return None
        _, trace_id, parent_id, flags, _ = f.groups()
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, flags


def _header_value(headers: Mapping[str, Any]) -> Any:
    if HEADER in headers:
        return headers[HEADER]
    for key, value in headers.items():  # AMQP header names are case sensitive; HTTP ones are not
        if isinstance(key, str) and key.lower() == HEADER:
            return value
    return None


def extract_traceparent(headers: Mapping[str, Any] | None) -> str | None:
    """The ``traceparent`` header if it is a valid W3C trace context, re-encoded as version 00.

    Accepts ``str`` or ``bytes`` values (AMQP libraries deliver either). Returns None when the
    header is absent, malformed, upper-case, version ``ff``, or has an all-zero trace or parent id.
    """
    if not headers:
        return None
    raw = _header_value(headers)
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(raw, str) or len(raw) > 512:
        return None
    parsed = _parse(raw)
    if parsed is None:
        return None
    trace_id, parent_id, flags = parsed
    return f"00-{trace_id}-{parent_id}-{flags}"


def _new_span_id() -> str:
    while True:
        span_id = secrets.token_hex(8)
        if span_id != _ZERO_SPAN:
            return span_id


def child_traceparent(parent: str | None) -> str | None:
    """A traceparent in the same trace with a fresh random parent id (same flags), or None.

    None when ``parent`` is None or not a valid traceparent: the bridge never starts a trace.
    """
    if parent is None:
        return None
    parsed = _parse(parent)
    if parsed is None:
        return None
    trace_id, _, flags = parsed
    return f"00-{trace_id}-{_new_span_id()}-{flags}"
