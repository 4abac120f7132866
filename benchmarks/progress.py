"""Progress on stderr while a run goes: phase headers and a live counter per workload."""

from __future__ import annotations

import asyncio
import sys
import time
from types import TracebackType
from typing import TextIO

_T0 = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - _T0


def say(message: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    out.write(f"[{elapsed():6.1f}s] {message}\n")
    out.flush()


class Progress:
    """``async with Progress("W-cycle", total=20000) as p: ... p.advance()`` prints a live counter.

    On a terminal it redraws one line twice a second; otherwise it prints a line every 5 seconds.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "ops", stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.errors = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._task: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._drawn = False

    def advance(self, n: int = 1) -> None:
        self.done += n

    def error(self, n: int = 1) -> None:
        self.errors += n

    def _line(self) -> str:
        secs = max(time.monotonic() - self._started, 1e-9)
        rate = self.done / secs
        total = f"/{self.total:,}" if self.total else ""
        eta = ""
        if self.total and rate > 0 and self.done < self.total:
            eta = f"  eta {(self.total - self.done) / rate:4.0f}s"
        errs = f"  errors {self.errors}" if self.errors else ""
        return f"[{elapsed():6.1f}s]   {self.label}: {self.done:,}{total} {self.unit}  {rate:7.0f}/s{eta}{errs}"

    async def _draw(self) -> None:
        interval = 0.5 if self.tty else 5.0
        while True:
            await asyncio.sleep(interval)
            if self.tty:
                self.stream.write("\r\x1b[2K" + self._line())
                self._drawn = True
            else:
                self.stream.write(self._line() + "\n")
            self.stream.flush()

    async def __aenter__(self) -> Progress:
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._draw())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[2K")
        self.stream.write(self._line() + (" (stopped)" if exc_type else "") + "\n")
        self.stream.flush()
