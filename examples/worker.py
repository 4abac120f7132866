"""An external worker for the demo: fetch tasks, do the work, ack a result (or fail the task).

    python examples/worker.py                     # as worker-a, service "demo", until Ctrl-C
    QB_MAX_TASKS=5 python examples/worker.py      # stop after 5 tasks

The work: upper-case the task's text after a short, random pause. Every 7th task (by its "n")
fails on purpose, with ``task.ack_error({"message": ...})``, to show how an error result reaches the
engine. The owner of the tasks this worker sees is its AMQP user (worker-a by default).

It serves with ``Worker.run``. SIGTERM / SIGINT stop it gracefully: a task in hand is finished and
acked first; a worker waiting for work gives up its long-poll at once, then (``stop_grace``, 5 s at
most) hands on only a task that long-poll may still have claimed for it, so that no task stays
leased to a stopped worker (see README, "Worker.run").

Environment (all optional):
  QB_AMQP_URL     amqp://worker-a:worker-a@127.0.0.1:5672/
  QB_SERVICE      demo          serviceId to fetch from
  QB_EXCHANGE     queue-bridge  the bridge's exchange (BRIDGE_EXCHANGE)
  QB_WORKER_ID    <hostname>-<pid>
  QB_MAX_TASKS    0             stop after this many tasks; 0 = run until stopped
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson

from bridge.client import BridgeClientError, Task, TransportError, UnavailableError, Worker

DEFAULT_URL = "amqp://worker-a:worker-a@127.0.0.1:5672/"


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


async def wait_for_bridge(url: str, exchange: str, deadline: float, log: Callable[[str], None]) -> None:
    """Wait until RabbitMQ answers and the bridge has declared its exchange."""
    said = False
    while True:
        try:
            connection = await aio_pika.connect(url)
            try:
                channel = await connection.channel()
                await channel.get_exchange(exchange, ensure=True)  # passive: does it exist?
                return
            finally:
                await connection.close()
        except (aio_pika.exceptions.AMQPError, OSError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"bridge not found: {type(exc).__name__}: {exc}") from None
            if not said:
                log(f"waiting for the bridge (exchange {exchange!r}) ...")
                said = True
            await asyncio.sleep(1.0)


def short(value: Any, limit: int = 80) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def process(value: Any, work_time: tuple[float, float]) -> tuple[float, dict[str, Any]]:
    """The 'business logic': how long to pretend to work, and the result."""
    text = str(value.get("text", "")) if isinstance(value, dict) else str(value)
    return random.uniform(*work_time), {"text": text.upper(), "length": len(text)}


async def _settle(task: Task, *, result: Any = None, error: Any = None, attempts: int = 5) -> bool | None:
    """Ack the task with its result or its business error; a lost reply or connection is retried, which the bridge
    answers idempotently: at least ``attempts`` times, and for as long as the lease lasts (given up after 2.5 s, a
    broker restart made the worker exit, the work done lost). What the ack answered; None when no answer came before
    the lease ended (the task may be another worker's then, and the next fetch hands it back if nobody took it)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await (task.ack_error(error) if error is not None else task.ack(result))
        except (TransportError, UnavailableError):
            # A lease end this client cannot read never expires: bounded by attempts then.
            if attempt >= attempts and (task.lease_expired or attempt >= 100 * attempts):
                return None
            # Full jitter, doubling up to 5 s: a fleet's workers that lost the broker at the same
            # moment do not all retry at the same moments.
            await asyncio.sleep(random.uniform(0, min(5.0, 0.2 * 2 ** min(attempt, 16))))  # nosec B311


async def main(
    url: str | None = None,
    *,
    service: str | None = None,
    exchange: str | None = None,
    worker_id: str | None = None,
    max_tasks: int | None = None,
    stop: asyncio.Event | None = None,
    fail_every: int = 7,
    work_time: tuple[float, float] = (0.05, 0.3),
    wait_timeout: float = 120.0,
    log: Callable[[str], None] | None = None,
) -> int:
    """Work until ``stop`` is set or ``max_tasks`` are done. Arguments left None come from QB_* variables."""
    url = url or _env("QB_AMQP_URL", DEFAULT_URL)
    service = service or _env("QB_SERVICE", "demo")
    exchange = exchange or _env("QB_EXCHANGE", "queue-bridge")
    worker_id = worker_id or _env("QB_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}")
    max_tasks = int(_env("QB_MAX_TASKS", "0")) if max_tasks is None else max_tasks
    stop = stop or asyncio.Event()
    say: Callable[[str], None] = log or (lambda line: print(f"[{worker_id}] {line}", flush=True))

    try:
        await wait_for_bridge(url, exchange, time.monotonic() + wait_timeout, say)
    except TimeoutError as exc:
        say(str(exc))
        return 1

    done = 0
    stopping = asyncio.Event()  # run's own stop: ``stop`` (a signal), or max_tasks reached here

    async def handle(task: Task) -> Any:
        """One task: the result (Worker.run acks it, sent again after no answer); a business error
        is acked by the handler itself (``task.ack_error``), which run leaves as it is."""
        nonlocal done
        # The demo engine numbers its tasks ("n"); tasks added otherwise are named by their id.
        number = task.value.get("n") if isinstance(task.value, dict) else None
        n = number if isinstance(number, int) else done + 1
        name = f"task {number}" if isinstance(number, int) else f"task {task.id}"
        if task.deliveries > 1:
            name += f" (delivery {task.deliveries})"
        pause, result = process(task.value, work_time)
        await asyncio.sleep(pause)
        done += 1
        if max_tasks and done >= max_tasks:
            stopping.set()  # this task is acked, no next one taken
        if fail_every and n % fail_every == 0:
            why = f"every {fail_every}th task{'' if isinstance(number, int) else ' of this worker'} fails"
            error = {"message": f"{name} failed on purpose ({why})"}
            ok = await _settle(task, error=error)
            say(f"{name}: failed on purpose")
            if ok is None:  # never answered: run sends the business error again (raised or returned alike)
                raise RuntimeError(f"{name}: its business error got no answer")
            if not ok:
                say(f"{name}: the bridge did not take the ack (lease lost: the task went to another worker)")
            return None
        shown = repr(task.value["text"]) if isinstance(task.value, dict) and "text" in task.value else None
        say(f"{name}: {shown or short(task.value)} -> {result['text']!r}")
        return {**result, "worker": worker_id}

    async def relay_stop() -> None:
        await stop.wait()
        stopping.set()

    relaying = asyncio.create_task(relay_stop())
    try:
        async with Worker(url, service=service, worker_id=worker_id, exchange=exchange) as worker:
            say(f"fetching tasks of service {service!r}" + (f" (at most {max_tasks})" if max_tasks else ""))
            # Not ``async for`` cancelled at stop: a long-poll given up then may still claim a task
            # at the bridge, which stayed leased to this stopped worker for its whole lease. run's
            # stop closes that request's reply-to and hands on only what it claimed (its drain).
            await worker.run(handle, stop=stopping)
            if worker.lost:
                say(f"{worker.lost} result(s) not taken by the bridge (lease lost: the task went to another worker)")
    except BridgeClientError as exc:
        say(f"the bridge refused a request: {exc.code}: {exc.message}")
        return 1
    finally:
        relaying.cancel()
    say(f"stopped after {done} tasks")
    return 0


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
