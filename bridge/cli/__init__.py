"""The ``queue-bridge`` command line (typer), also ``python -m bridge``.

Exit codes: 0 success; 1 an operation failed (a server unreachable, an error answered by the
bridge, a file that cannot be written); 2 bad usage or arguments (invalid JSON, invalid
configuration); 3 an answer that is not all there is (``PARTIAL_EXIT``: purge stopped short,
parked with more parked than listed, queue-stats with queues it could not count). Expected
failures print one clear message on stderr, never a traceback.

Commands by module: :mod:`~bridge.cli.server` (run, permissions, config, schema),
:mod:`~bridge.cli.stats`, :mod:`~bridge.cli.requests` (add, fetch, ack, extend, fail, cancel, purge,
queue-stats, parked, redrive, discard),
:mod:`~bridge.cli.keyring` (keyring generate, rotate), :mod:`~bridge.cli.gateway` (gateway-key);
shared pieces in :mod:`~bridge.cli.base`.
"""

from __future__ import annotations

import sys

from bridge.cli import gateway, keyring, requests, server, stats  # noqa: F401  (they register their commands)
from bridge.cli.base import app

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
