"""Storage failures, as the domain sees them: ``Unavailable`` (safe to retry, answered ``unavailable``).

The Cassandra adapter raises these from its driver's errors; nothing above the adapter needs to
know them apart from ``Unavailable``.
"""

from bridge.domain.errors import BridgeError, MaybeApplied, NotSent, Unavailable


class StorageError(Unavailable):
    """Base class for storage failures."""


class StorageUnavailable(StorageError):
    """Cassandra cannot be reached or timed out: the caller should answer `unavailable` or retry."""


class StorageNotSent(StorageUnavailable, NotSent):
    """No host could take the request: it was never sent, so it was certainly not applied."""


class UnknownOutcome(StorageError, MaybeApplied):
    """A lightweight transaction timed out: it may or may not have been applied (CASSANDRA-9328).

    Resolved inside the adapter by a SERIAL read; it only escapes when that read fails too."""


class InvalidQuery(BridgeError):
    """The node refused the CQL itself (invalid, an undefined column, a table that already exists):
    a bug, or a schema change still being applied; never an outage, so never ``Unavailable``
    (answered ``internal``)."""
