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
    for invalid CQL (``internal``), every add was dead-lettered meanwhile (found by review)."""


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
# Answers name the exception's type; the text goes to the log, once every 10 s at most.
_detail = ThrottledWarning(logging.getLogger("bridge.storage"))


def kind_of(exc: BaseException) -> str:
    """``exc``'s type name, for an answer; its whole text logged (throttled) for the operator."""
    _detail.warning("cassandra request failed: %s: %s", type(exc).__name__, exc)
    return type(exc).__name__
