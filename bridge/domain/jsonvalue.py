"""JSON in and out of the bridge: values come back exactly as they were added.

orjson is fast but lossy at the edges that matter for a store of other people's data: it reads an
integer beyond 64 bits as a float (``2**64 + 1`` would come back as ``1.8446744073709552e+19``)
and refuses to write one. Such rare inputs take the standard library's exact path instead; every
other value stays on orjson's. It also writes a float NaN or Infinity as ``null`` without a word:
those are refused (:class:`JsonError`), as the reader refuses them. Decrypted values are never
parsed again: they are JSON already and go into replies as :class:`orjson.Fragment` (spliced in
as they are).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import sys
from typing import Any

import orjson

# A run of 19+ digits that is an integer literal (not part of a fraction or an exponent): the only
# inputs orjson may read inexactly. False positives (digits inside strings) only cost the slow path.
_BIG_INT = re.compile(rb"(?<![\d.eE])-?\d{19,}(?![\d.eE])")
MAX_DEPTH = 254  # orjson's limit for writing; deeper input is refused when read


class JsonError(ValueError):
    """The input is not JSON the bridge can store and give back exactly (a caller's error)."""


_BOM = b"\xef\xbb\xbf"


def loads(data: bytes) -> Any:
    if data.startswith(_BOM):
        # Refused on both paths: orjson refuses one, Python's reader took it (a body with a long
        # integer in it was accepted, the same body without refused).
        raise JsonError("not valid JSON: it begins with a byte order mark (RFC 8259: none before JSON text)")
    if _BIG_INT.search(data) is None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise JsonError(_unreadable(exc)) from None
    try:
        # Python's reader takes NaN and Infinity, and reads 1e400 as infinity: none is JSON, and
        # orjson would write each back as null (orjson's own reader refuses them).
        return json.loads(data, parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise JsonError(_unreadable(exc)) from None


def _unreadable(exc: Exception) -> str:
    """What is wrong with a body that could not be read, said for the caller: a compressed or
    binary body was "str is not valid UTF-8: surrogates not allowed", and an integer too long for
    Python's reader came with advice to call sys.set_int_max_str_digits()."""
    said = str(exc)
    if "UTF-8" in said or isinstance(exc, UnicodeDecodeError):
        return "not valid JSON: it is not UTF-8 text (JSON in UTF-8, uncompressed: no content-encoding is supported)"
    if "int_max_str_digits" in said or "integer string conversion" in said:
        return f"a JSON number the bridge cannot read: an integer of more than {sys.get_int_max_str_digits()} digits"
    return f"not valid JSON: {said}"


def _not_json(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        # Its length, never its digits: the message goes into the reply and the log, and a value's
        # content stays out of both.
        raise JsonError(f"a number of {len(text)} characters is too large for a JSON number the bridge can give back")
    return value


def dumps(value: Any) -> bytes:
    """Compact JSON; integers of any size written exactly. A float NaN or Infinity anywhere in
    ``value`` is refused (:class:`JsonError`), never written as ``null``."""
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        if "exceeds 64-bit range" not in str(exc):
            why = f" (nesting is limited to {MAX_DEPTH} levels)" if "Recursion limit" in str(exc) else ""
            raise JsonError(f"cannot be written as JSON: {exc}{why}") from None
    else:
        # orjson writes NaN and Infinity as null: only output holding a null can hide one, so the
        # value is looked through only then (a null in a string costs a needless look, no more).
        if b"null" in data and _holds_a_non_finite_float(value):
            raise JsonError("cannot be written as JSON: NaN and Infinity are not JSON numbers (they would go as null)")
        return data
    try:
        return _exact_dumps(value)  # allow_nan=False: refuses NaN and Infinity itself
    except (ValueError, TypeError, RecursionError) as exc:
        raise JsonError(f"cannot be written as JSON: {exc}") from None


def _holds_a_non_finite_float(value: Any) -> bool:
    """Whether orjson wrote a NaN or an Infinity of ``value`` as null: a float, or one inside what
    orjson writes as an array or an object (lists, tuples, dicts, dataclasses, enum members)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, enum.Enum):
            stack.append(item.value)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
    return False


def _exact_dumps(value: Any) -> bytes:
    depth_check(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def depth_check(value: Any, limit: int = MAX_DEPTH) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                raise JsonError(f"nested deeper than {limit} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def fragment(data: bytes) -> orjson.Fragment:
    """JSON bytes to splice into a document being written, without parsing them."""
    return orjson.Fragment(data)
