"""The workflow-engine side of the demo: add tasks, then collect their results.

    python examples/engine.py                 # 10 tasks for owner worker-a, service "demo"
    QB_COUNT=0 QB_RATE=5 python examples/engine.py   # add 5 tasks a second until Ctrl-C

Each task is ``{"n": i, "text": ...}``, added with a token ``{"processId": ..., "n": i}`` (the bridge
hands the token back, unchanged, with the result) and a message_id (so a retried add is not a
second task). Results arrive on the bridge's durable results queue, which this script consumes
with manual acks: one line per result, exit 0 once every task has its result, 1 on timeout.

Results whose token names another processId (an earlier run, another engine) are acked and
skipped: this is a demo, a real engine would look the process up instead.

Environment (all optional):
  QB_AMQP_URL        amqp://engine:engine@127.0.0.1:5672/ (a user the bridge trusts to name owners)
  QB_OWNER           worker-a     the owner the tasks are added for (x-owner header)
  QB_SERVICE         demo         serviceId
  QB_EXCHANGE        queue-bridge the bridge's exchange (BRIDGE_EXCHANGE)
  QB_RESULTS_QUEUE   queue-bridge.results (BRIDGE_RESULTS_QUEUE)
  QB_BRIDGE_USER     queue-bridge the bridge's broker user: a result is taken only from it (user_id)
  QB_COUNT           10           tasks to add; 0 = keep adding at QB_RATE until stopped
  QB_RATE            2            tasks per second when QB_COUNT=0
  QB_TIMEOUT         120          seconds to wait for all results (and for the bridge to appear)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from bridge.client import BridgeClientError, Engine, TransportError, UnavailableError

DEFAULT_URL = "amqp://engine:engine@127.0.0.1:5672/"


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def short(value: Any, limit: int = 100) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def wait_for_bridge(
    url: str, exchange: str, queue: str | None, deadline: float, log: Callable[[str], None]
) -> AbstractRobustConnection:
    """Connect to RabbitMQ and wait until the bridge has declared its exchange (and results queue)."""
    said = False
    while True:
        connection: AbstractRobustConnection | None = None
        try:
            connection = await aio_pika.connect_robust(url)
            channel = await connection.channel()
            await channel.get_exchange(exchange, ensure=True)  # passive: does it exist?
            if queue is not None:
                await channel.get_queue(queue, ensure=True)
            await channel.close()
            return connection
        except (aio_pika.exceptions.AMQPError, OSError) as exc:
            if connection is not None:
                await connection.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"bridge not found: {type(exc).__name__}: {exc}") from None
            if not said:
                log(f"waiting for the bridge (exchange {exchange!r}{f', queue {queue!r}' if queue else ''}) ...")
                said = True
            await asyncio.sleep(1.0)


async def _add(engine: Engine, service: str, n: int, process_id: str, deadline: float) -> str:
    """Add task n; retry on transport errors (no reply, lost connection) and unavailability with the same
    message_id (idempotent)."""
    while True:
        try:
            task_id = await engine.add(
                service,
                {"n": n, "text": f"hello from task {n}"},
                token={"processId": process_id, "n": n},
                message_id=f"{process_id}-{n}",
            )
            return str(task_id)
        except (TransportError, UnavailableError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


class _Collector:
    """Records the results of this run's tasks (n -> result body) as they arrive on the results queue."""

    def __init__(
        self,
        process_id: str,
        count: int,
        results: dict[int, dict[str, Any]],
        say: Callable[[str], None],
        bridge_user: str = "queue-bridge",
    ) -> None:
        self.process_id = process_id
        self.bridge_user = bridge_user
        self.forged = 0
        self.count = count
        self.results = results
        self.say = say
        self.seen: set[str] = set()  # result message ids: a result may be delivered twice, count it once
        self.skipped = 0
        self.errors = 0
        self.all_done = asyncio.Event()
        self.progress = asyncio.Event()  # set on every new result

    async def on_result(self, message: AbstractIncomingMessage) -> None:
        try:
            self._record(message)
        finally:
            await message.ack()  # manual ack, after the result is recorded

    def _record(self, message: AbstractIncomingMessage) -> None:
        if message.user_id != self.bridge_user:
            # The broker checks user_id against the publishing connection's user: a message from
            # anyone else who may publish to the results exchange is no result (docs/security.md).
            if self.forged == 0:
                self.say(f"dropping a message on the results queue not from the bridge (user_id {message.user_id!r})")
            self.forged += 1
            return
        body = orjson.loads(message.body)
        token = body.get("token") or {}
        n = token.get("n") if isinstance(token, dict) else None
        if not isinstance(token, dict) or token.get("processId") != self.process_id or not isinstance(n, int):
            if self.skipped == 0:
                self.say("skipping results of tasks this run did not add (earlier runs, other engines)")
            self.skipped += 1
        elif message.message_id not in self.seen and n not in self.results:
            self.seen.add(message.message_id or "")
            self.results[n] = body
            if "error" in body:
                self.errors += 1
                self.say(f"result for task {n}: error {short(body['error'])}")
            else:
                self.say(f"result for task {n}: {short(body.get('result'))}")
            self.progress.set()
            if self.count and len(self.results) >= self.count:
                self.all_done.set()


async def _add_tasks(
    engine: Engine,
    service: str,
    process_id: str,
    count: int,
    rate: float,
    stop: asyncio.Event,
    deadline: float,
    say: Callable[[str], None],
) -> int:
    """Add ``count`` tasks (0: one every 1/rate s until ``stop``); returns how many were added."""
    n = 0
    while not stop.is_set() and (count == 0 or n < count):
        n += 1
        task_id = await _add(engine, service, n, process_id, deadline if count else float("inf"))
        say(f"added task {n} (id {task_id})")
        if count == 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0 / rate)
    return n


async def _finish_endless(collector: _Collector, n: int) -> int:
    """Stopped: give the tasks in flight a moment to report back."""
    results, say = collector.results, collector.say
    outstanding = n - len(results)
    if outstanding:
        say(f"stopping: waiting up to 5s for {outstanding} outstanding results")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while len(results) < n:
                    collector.progress.clear()
                    await collector.progress.wait()
    say(f"added {n} tasks, got {len(results)} results ({collector.errors} errors)")
    return 0


async def _wait_for_results(collector: _Collector, stop: asyncio.Event, started: float, deadline: float) -> int:
    """Wait until every result arrived (0), ``stop`` is set (130) or the deadline passes (1)."""
    count, say = collector.count, collector.say
    waiter = asyncio.create_task(collector.all_done.wait())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait(
            {waiter, stopper}, timeout=max(0.0, deadline - time.monotonic()), return_when="FIRST_COMPLETED"
        )
    finally:
        waiter.cancel()
        stopper.cancel()
    elapsed = time.monotonic() - started
    if collector.all_done.is_set():
        say(f"all {count} results arrived in {elapsed:.1f}s ({collector.errors} errors)")
        return 0
    missing = sorted(set(range(1, count + 1)) - set(collector.results))
    if stop.is_set():
        say(f"stopped with {len(missing)} results outstanding")
        return 130
    say(f"timed out after {elapsed:.0f}s: {len(missing)} of {count} results missing (tasks {missing[:10]})")
    return 1


async def main(
    url: str | None = None,
    *,
    owner: str | None = None,
    service: str | None = None,
    exchange: str | None = None,
    results_queue: str | None = None,
    count: int | None = None,
    rate: float | None = None,
    timeout: float | None = None,
    stop: asyncio.Event | None = None,
    results: dict[int, dict[str, Any]] | None = None,
    log: Callable[[str], None] | None = None,
    bridge_user: str | None = None,
) -> int:
    """Add ``count`` tasks and wait for their results. Arguments left None come from QB_* variables.

    ``results`` (if given) is filled with n -> result message body. Returns 0 when every result
    arrived, 1 on timeout or a failed add, 130 when ``stop`` was set first (0 when count is 0).
    """
    url = url or _env("QB_AMQP_URL", DEFAULT_URL)
    owner = owner or _env("QB_OWNER", "worker-a")
    service = service or _env("QB_SERVICE", "demo")
    exchange = exchange or _env("QB_EXCHANGE", "queue-bridge")
    results_queue = results_queue or _env("QB_RESULTS_QUEUE", "queue-bridge.results")
    bridge_user = bridge_user or _env("QB_BRIDGE_USER", "queue-bridge")
    count = int(_env("QB_COUNT", "10")) if count is None else count
    rate = float(_env("QB_RATE", "2")) if rate is None else rate
    timeout = float(_env("QB_TIMEOUT", "120")) if timeout is None else timeout
    stop = stop or asyncio.Event()
    results = {} if results is None else results
    say: Callable[[str], None] = log or (lambda line: print(line, flush=True))

    process_id = uuid.uuid4().hex[:12]
    started = time.monotonic()
    deadline = started + timeout
    collector = _Collector(process_id, count, results, say, bridge_user)

    try:
        connection = await wait_for_bridge(url, exchange, results_queue, deadline, say)
    except TimeoutError as exc:
        say(str(exc))
        return 1
    try:
        # Consume first, so no result is missed; the queue is durable, so none is lost either.
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.get_queue(results_queue, ensure=False)
        await queue.consume(collector.on_result)

        async with Engine(url, owner=owner, exchange=exchange) as engine:
            say(
                f"adding {count if count else 'endless'} tasks for owner {owner}, service {service!r}"
                + ("" if count else f" at {rate:g}/s (Ctrl-C stops)")
            )
            n = await _add_tasks(engine, service, process_id, count, rate, stop, deadline, say)
        if count == 0:
            return await _finish_endless(collector, n)
        return await _wait_for_results(collector, stop, started, deadline)
    except BridgeClientError as exc:
        say(f"the bridge refused a request: {exc.code}: {exc.message}")
        return 1
    finally:
        if collector.skipped:
            say(f"skipped {collector.skipped} results of other runs")
        await connection.close()


def cli() -> None:
    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop=stop)

    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    cli()
