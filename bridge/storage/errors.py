"""Storage failures, as the domain sees them: ``Unavailable`` (safe to retry, answered ``unavailable``).

The Cassandra adapter raises these from its driver's errors; nothing above the adapter needs to
know them apart from ``Unavailable``.
"""

import logging

from bridge.domain.errors import BridgeError, MaybeApplied, NotSent, Unavailable
from bridge.observability.throttled import ThrottledWarning


class StorageError(Unavailable):
    """Base class for storage failures."""


class StorageUnavailable(StorageError):
    """Cassandra cannot be reached or timed out: the caller should answer `unavailable` or retry."""


class StorageNotSent(StorageUnavailable, NotSent):
    """No host could take the request: it was never sent, so it was certainly not applied."""


class SchemaMissing(StorageNotSent):
    """The keyspace or a table is gone (a `DROP` by mistake, a restore under way): Cassandra refused
    the statement before any replica acted. An outage until the schema is back, not a bug: taken
    for invalid CQL (``internal``), every add was dead-lettered meanwhile (found by review).
    ``detail``: the driver's words, for the bridge's own judgement (a node not serving a new table
    yet, ``schema.once_served``) and its log; never in a reply."""

    detail: str = ""


def names_missing_schema(message: str) -> bool:
    """Whether Cassandra's refusal says the keyspace or the table does not exist ("unconfigured
    table x", "keyspace x does not exist", "table x does not exist")."""
    text = message.lower()
    return "unconfigured table" in text or "does not exist" in text


class UnknownOutcome(StorageError, MaybeApplied):
    """A lightweight transaction timed out: it may or may not have been applied (CASSANDRA-9328).

    Resolved inside the adapter by a SERIAL read; it only escapes when that read fails too."""


class InvalidQuery(BridgeError):
    """The node refused the CQL itself (invalid, an undefined column, a table that already exists):
    a bug, or a schema change still being applied; never an outage, so never ``Unavailable``
    (answered ``internal``)."""


# The driver's text names replicas' addresses, consistency levels, server exceptions: the
# operator's to read, not the tenants' (an ``unavailable`` answer carried it to every caller).
# Answers name the exception's type; the text goes to the log, once every 10 s at most for each
# type: one throttle for all, a storm of write timeouts hid a rare error of its own (a read over
# too many tombstones naming its table) for as long as the storm lasted (found by review).
_details: dict[str, ThrottledWarning] = {}
DETAIL_TYPES_KEPT = 64


def kind_of(exc: BaseException) -> str:
    """``exc``'s type name, for an answer; its whole text logged (throttled) for the operator."""
    kind = type(exc).__name__
    detail = _details.get(kind)
    if detail is None:
        if len(_details) >= DETAIL_TYPES_KEPT:
            _details.pop(next(iter(_details)))
        detail = _details[kind] = ThrottledWarning(logging.getLogger("bridge.storage"))
    detail.warning("cassandra request failed: %s: %s", kind, exc)
    return kind


def not_authorized(exc: BaseException) -> StorageNotSent:
    """Cassandra refused a statement as not authorized. Not the caller's mistake, nor a bug: the
    authorizer checks before anything is applied, and while the replicas of ``system_auth`` are
    out of reach it refuses every statement so ("Unable to perform authorization of permissions").
    Taken for an invalid query (``internal``), every add of the fleet was dead-lettered and every
    request failed for good during such an outage (found by review, 2026-12-07); a grant revoked
    by an operator is the operator's to fix, and is retried meanwhile like an outage."""
    refused = StorageNotSent(
        f"cassandra refused the statement as not authorized ({kind_of(exc)}: a permission the bridge's role "
        "lacks, or system_auth out of reach)"
    )
    refused.not_authorized = True  # type: ignore[attr-defined]  # (schema changes: fatal, see execute_raw)
    return refused


def schema_missing(exc: BaseException) -> SchemaMissing:
    """The keyspace or a table is missing: the driver's words (keyspace and table names) logged for
    the operator, not sent to every tenant in the reply (found by review, 2026-12-07)."""
    missing = SchemaMissing(f"cassandra: the keyspace or a table is missing ({kind_of(exc)})")
    missing.detail = str(exc)
    return missing


def refused_as_not_authorized(exc: BaseException) -> bool:
    """A statement Cassandra refused as not authorized (``not_authorized``)."""
    return bool(getattr(exc, "not_authorized", False))
