"""Values in and out of their sealed form: serialization, keys, and what each ciphertext is bound to.

Every value is serialized once, exactly (``jsonvalue``), and sealed with its owner's key; the
clear facts stored beside a ciphertext (whether the task has a token, its trace context) are bound
into it, so rewriting or nulling them is detected when it is opened.
"""

from __future__ import annotations

import uuid
from typing import Any

from bridge.crypto import (
    BadKeyAnswer,
    KeyProvider,
    KeyUnavailable,
    OwnerKey,
    Sealed,
    TamperedCiphertext,
    UnknownKey,
    open_sealed,
    seal,
)
from bridge.crypto import UnknownOwner as NoKeysForOwner
from bridge.domain import jsonvalue
from bridge.domain.errors import (
    BadRequest,
    IntegrityError,
    KeyMissing,
    KeysUnavailable,
    OwnerKeyUnusable,
    PayloadTooLarge,
    UnknownOwner,
)
from bridge.domain.records import Payload, QueueKey


def encode(value: Any, what: str, limit: int) -> bytes:
    """Serialize a caller's value once, exactly, within the size limit (the caller's errors are
    ``bad_request`` / ``payload_too_large``, never ``internal``)."""
    try:
        data = jsonvalue.dumps(value)
    except jsonvalue.JsonError as exc:
        raise BadRequest(f"{what} {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"{what} is {len(data)} bytes as JSON; the limit is {limit}")
    return data


def split_outcome(outcome_json: bytes) -> tuple[str, bytes]:
    """``{"result":X}`` / ``{"error":X}`` as written by :func:`encode` -> (kind, X) without parsing X."""
    for kind in ("result", "error"):
        prefix = b'{"' + kind.encode() + b'":'
        if outcome_json.startswith(prefix) and outcome_json.endswith(b"}"):
            return kind, outcome_json[len(prefix) : -1]
    parsed = jsonvalue.loads(outcome_json)  # written by another encoder: parse it (exactly)
    kind = "error" if "error" in parsed else "result"
    return kind, jsonvalue.dumps(parsed[kind])


class OwnerKeys:
    """The key provider in the queue's terms: a missing key is ``unknown_owner`` when sealing
    something new, and ``KeyMissing`` (an outage, not corruption) when opening something stored."""

    def __init__(self, keys: KeyProvider) -> None:
        self.keys = keys

    async def current(self, owner: str) -> OwnerKey:
        try:
            return await self.keys.current_key(owner)
        except NoKeysForOwner:
            raise UnknownOwner(f"no encryption key is configured for owner {owner!r}") from None
        except BadKeyAnswer as exc:
            raise OwnerKeyUnusable(f"key provider unavailable: {exc}") from None
        except UnknownKey as exc:
            # The owner's current key names a key the source does not have (a key server whose
            # "current" is not replicated yet): that owner's entry is unusable, not corruption.
            # Untranslated, it was ``integrity_error``: adds dead-lettered, fetches spinning.
            raise OwnerKeyUnusable(f"key provider unavailable: the owner's current key is missing ({exc})") from None
        except KeyUnavailable as exc:
            raise KeysUnavailable(f"key provider unavailable: {exc}") from None

    async def by_id(self, owner: str, key_id: str) -> OwnerKey:
        try:
            return await self.keys.key_by_id(owner, key_id)
        except (NoKeysForOwner, UnknownKey):
            # An outage (a key server restarting, a key-ring edit that dropped a key still in use),
            # not corruption: the task stays, and is delivered once the key is back.
            raise KeyMissing(
                f"the key {key_id!r} that sealed this task is not available; the task stays queued and is "
                "delivered when the key is back (check the key-ring or key server)"
            ) from None
        except KeyUnavailable as exc:
            raise KeysUnavailable(f"key provider unavailable: {exc}") from None


def _value_binding(has_token: bool, traceparent: str | None) -> tuple[str, str]:
    return ("token" if has_token else "no-token", traceparent or "")


def _open_bound(
    key: OwnerKey, sealed: Sealed, *, service: str, task_id: str, field: str, bind: tuple[str, ...]
) -> bytes:
    """Open a sealed field bound to its row's clear facts; tasks sealed before 1.1 bound nothing.

    Falling back to the unbound form cannot be abused: a ciphertext sealed with a binding never
    opens without it, so only a task sealed by an older bridge (gone by its TTL) opens unbound."""
    try:
        return open_sealed(key, sealed, service=service, task_id=task_id, field=field, bind=bind)
    except TamperedCiphertext:
        return open_sealed(key, sealed, service=service, task_id=task_id, field=field)


def seal_task(
    key: OwnerKey,
    q: QueueKey,
    task_id: uuid.UUID,
    value_json: bytes,
    token_json: bytes | None,
    traceparent: str | None,
    now_ms: int,
) -> Payload:
    tid = str(task_id)
    # The trace context and whether there is a token are stored in clear beside the ciphertexts:
    # bound into them, so that rewriting or nulling them is detected (issue 13.8).
    bind = _value_binding(token_json is not None, traceparent)
    value = seal(key, value_json, service=q.service, task_id=tid, field="value", bind=bind)
    token = None
    if token_json is not None:
        token = seal(key, token_json, service=q.service, task_id=tid, field="token", bind=(traceparent or "",))
    return Payload(value=value, token=token, traceparent=traceparent, created_at_ms=now_ms)


def open_value(key: OwnerKey, q: QueueKey, task_id: uuid.UUID, payload: Payload) -> bytes:
    """The value as added (JSON bytes). ``IntegrityError`` if it fails authentication."""
    bind = _value_binding(payload.token is not None, payload.traceparent)
    try:
        return _open_bound(key, payload.value, service=q.service, task_id=str(task_id), field="value", bind=bind)
    except TamperedCiphertext:
        raise IntegrityError(f"task {task_id} failed authentication and was dead-lettered") from None


def open_token(key: OwnerKey, q: QueueKey, task_id: uuid.UUID, token: Sealed, traceparent: str | None) -> bytes:
    """The workflow token (JSON bytes). Raises ``TamperedCiphertext``."""
    return _open_bound(key, token, service=q.service, task_id=str(task_id), field="token", bind=(traceparent or "",))


def seal_outcome(key: OwnerKey, q: QueueKey, task_id: uuid.UUID, outcome_json: bytes) -> Sealed:
    return seal(key, outcome_json, service=q.service, task_id=str(task_id), field="result")


def open_outcome(key: OwnerKey, q: QueueKey, task_id: uuid.UUID, sealed: Sealed) -> bytes:
    """The acked outcome (JSON bytes). Raises ``TamperedCiphertext``."""
    return open_sealed(key, sealed, service=q.service, task_id=str(task_id), field="result")


def seal_error(key: OwnerKey, q: QueueKey, task_id: uuid.UUID, error_json: bytes) -> Sealed:
    """The error a worker's ``fail`` gave: kept with the lease, readable only by its owner."""
    return seal(key, error_json, service=q.service, task_id=str(task_id), field="last_error")


def open_error(key: OwnerKey, q: QueueKey, task_id: uuid.UUID, sealed: Sealed) -> bytes:
    """Raises ``TamperedCiphertext``."""
    return open_sealed(key, sealed, service=q.service, task_id=str(task_id), field="last_error")
