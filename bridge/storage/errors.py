"""Storage failures as the domain sees them."""


class StorageError(Exception):
    """Base class for storage failures."""


class StorageUnavailable(StorageError):
    """Cassandra cannot be reached or timed out: the caller should answer `unavailable` or retry."""


class UnknownOutcome(StorageError):
    """A lightweight transaction timed out: it may or may not have been applied (CASSANDRA-9328)."""
