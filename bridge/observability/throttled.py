"""A warning that a lasting cause would repeat once per request, written at most once a period.

A broker alarm blocks the bridge's connection for as long as it lasts; a hint channel that a
timed-out call closed stays unusable until the broker reads again. Every add and every fetch meets
the same cause meanwhile: one line per request (1,278 in an 8 s alarm, measured) buries the line
that names the cause. The first occurrence is written at once; the next ones within ``every_s``
are counted and said with the next line written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledWarning:
    def __init__(
        self,
        logger: logging.Logger,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        level: int = logging.WARNING,
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self.level = level
        self._clock = clock
        self._written_at: float | None = None
        self._left_out = 0

    def warning(self, msg: str, *args: object) -> None:
        now = self._clock()
        if self._written_at is not None and now - self._written_at < self.every_s:
            self._left_out += 1
            return
        if self._left_out and self._written_at is not None:
            msg = f"{msg} (and {self._left_out} more like it in the last {now - self._written_at:.0f} s)"
        self._written_at, self._left_out = now, 0
        self.logger.log(self.level, msg, *args)
