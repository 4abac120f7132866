"""The queue-bridge benchmark suite: ``python -m benchmarks.run`` (``make bench``), see docs/performance.md."""
