"""``python -m benchmarks.cpuprofile OUT.prof``: ``bridge run`` under cProfile timed by ``time.thread_time``.

``python -m cProfile -m bridge run`` times with the wall clock, so a coroutine that waits for the
GIL (cassandra-driver's I/O thread holds it often) or for a CPU (2 shared cores) is charged with
that wait. Timing the event-loop thread's CPU instead shows where that thread spends its cycles.
The benchmark runner uses this with ``--profile DIR --profile-clock cpu``.
"""

from __future__ import annotations

import cProfile
import sys
import time


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["bridge", "run"]
    from bridge.cli import main as bridge_main

    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        bridge_main()
    except SystemExit:
        pass
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
