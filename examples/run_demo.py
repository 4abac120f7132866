"""`make run`: the bridge, two workers and an engine in one process, against the local stack.

    make run                                   # = BRIDGE_KEYRING=deploy/local/state/keyring.json \
                                               #   .venv/bin/python examples/run_demo.py
    .venv/bin/python examples/run_demo.py --once   # exit after the demo instead of staying up

1. starts the bridge in-process (settings from BRIDGE_* variables, as `queue-bridge run` reads them);
2. runs two workers (examples/worker.py) and the engine (examples/engine.py) side by side: the
   engine adds QB_COUNT tasks (default 20) for owner worker-a and prints each result as it arrives;
3. then keeps the bridge and the workers running, so tasks added from another terminal are
   processed, until Ctrl-C (or, with --once, exits once the demo is done and its workers have
   stopped; the exit code is the engine's).

Defaults it fills in when unset: BRIDGE_TRUSTED_USERS=engine, BRIDGE_HTTP_PORT=8080 (a free port
instead if 8080 is taken), BRIDGE_LOG_LEVEL=WARNING, and BRIDGE_KEYRING=deploy/local/state/keyring.json
(written first if missing) when no key source is configured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [p for p in (str(HERE), str(ROOT)) if p not in sys.path]

import engine as demo_engine  # noqa: E402  (examples/engine.py)
import worker as demo_worker  # noqa: E402  (examples/worker.py)

from bridge.app import Bridge  # noqa: E402
from bridge.client.rpc import results_consumer  # noqa: E402
from bridge.config import ConfigError, Settings, configured_variables, load_settings, unknown_variables  # noqa: E402
from bridge.transport.permissions import amqp_user  # noqa: E402

OWNER = "worker-a"
ENGINE_USER = "engine"
STARTED = time.monotonic()


def say(line: str, who: str = "demo") -> None:
    print(f"[{who} +{time.monotonic() - STARTED:.1f}s] {line}", flush=True)


def with_user(url: str, user: str) -> str:
    """The bridge's AMQP URL with another user (the local stack's password = user name)."""
    p = urlparse(url)
    netloc = f"{user}:{user}@{p.hostname or '127.0.0.1'}" + (f":{p.port}" if p.port else "")
    return urlunparse(p._replace(netloc=netloc))


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def default_environment() -> None:
    # What is set in the environment or in a .env file wins (the settings read both, the
    # environment first: a default put in the environment here hid the .env's value).
    given = configured_variables(os.environ)
    for said in unknown_variables(given):
        say(f"warning: {said}")
    defaults = {
        # The bridge runs as its own least-privilege broker user (deploy/local/rabbitmq.sh).
        "BRIDGE_AMQP_URL": "amqp://queue-bridge:queue-bridge@127.0.0.1:5672/",
        "BRIDGE_TRUSTED_USERS": ENGINE_USER,
        "BRIDGE_HTTP_PORT": "8080",
        "BRIDGE_LOG_LEVEL": "WARNING",
        "BRIDGE_LOG_FORMAT": "console",
    }
    for name, value in defaults.items():
        if name not in given:
            os.environ[name] = value
    trusted = [u.strip() for u in given.get("BRIDGE_TRUSTED_USERS", ENGINE_USER).split(",")]
    if ENGINE_USER not in trusted:
        say(f"warning: BRIDGE_TRUSTED_USERS does not name {ENGINE_USER!r}: the demo's engine adds will be refused")
    if "BRIDGE_AMQP_URL" in given:
        # Its host, the local stack's users: the engine and workers log in as engine, worker-a
        # and worker-b with their names as passwords (deploy/local/rabbitmq.sh).
        say("BRIDGE_AMQP_URL is set: the demo's engine and workers log in there as the local stack's users")
    if not given.get("BRIDGE_KEYRING") and not given.get("BRIDGE_KEY_SERVER_URL"):
        path = ROOT / "deploy/local/state/keyring.json"
        if not path.exists():
            from bridge.crypto import generate_keyring, write_keyring

            path.parent.mkdir(parents=True, exist_ok=True)
            write_keyring(path, generate_keyring([ENGINE_USER, "worker-a", "worker-b", "guest"]))
            say(f"dev key-ring written to {path.relative_to(ROOT)}")
        os.environ["BRIDGE_KEYRING"] = str(path)


async def start_bridge(settings: Settings) -> Bridge:
    """Start the bridge; if its HTTP port is taken, serve health and metrics on a free port instead."""
    fallback = bool(settings.http_port) and port_in_use(settings.http_host, settings.http_port)
    while True:
        if fallback:
            say(
                f"port {settings.http_port} is in use: health and metrics go to a free port instead "
                "(BRIDGE_HTTP_PORT chooses one)"
            )
        # Bridge skips HTTP when the port is 0, so in the fallback we start its server ourselves.
        bridge = Bridge(settings.model_copy(update={"http_port": 0}) if fallback else settings)
        try:
            if fallback:
                bridge.http_port = await bridge.ops.start(settings.http_host, 0)  # port 0: the OS picks
            await bridge.start()
            return bridge
        except OSError as exc:
            await bridge.ops.stop()
            if exc.errno == errno.EADDRINUSE and not fallback:  # taken between the check and the bind
                fallback = True
                continue
            raise
        except BaseException:
            await bridge.ops.stop()
            raise


async def wait_ready(bridge: Bridge, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        checks = await bridge.ops.readiness()
        if all(checks.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"bridge not ready after {timeout:.0f}s: {checks}")
        await asyncio.sleep(0.2)


def hints(settings: Settings, http_port: int | None, service: str) -> None:
    """How to go on: add tasks from another terminal, look at the metrics."""
    amqp = settings.amqp_url.get_secret_value()
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
    qb_env = [
        f"{name}={value}"
        for name, value, default in (
            ("QB_EXCHANGE", settings.exchange, "queue-bridge"),
            ("QB_RESULTS_QUEUE", settings.results_queue, "queue-bridge.results"),
            ("QB_SERVICE", service, "demo"),
        )
        if value != default
    ]
    qb = " ".join(qb_env) + " " if qb_env else ""
    lines = ["", "The bridge and both workers keep running; results are printed here. From another terminal:"]
    if _cli_has("add"):
        bridge_env = f"BRIDGE_EXCHANGE={settings.exchange} " if settings.exchange != "queue-bridge" else ""
        lines.append(
            f'  add a task:   {bridge_env}.venv/bin/queue-bridge add {service} \'{{"text": "hi there"}}\' '
            f"""--token '{{"from": "cli"}}' --owner {OWNER} --amqp-url {with_user(amqp, ENGINE_USER)}"""
        )
        lines.append("                (without --token a task gets no result message)")
    lines += [
        f"  add 3 tasks and wait for their results:   {qb}QB_COUNT=3 .venv/bin/python examples/engine.py",
        f"  add 5 tasks a second until Ctrl-C:         {qb}QB_COUNT=0 QB_RATE=5 .venv/bin/python examples/engine.py",
    ]
    if http_port:
        lines.append(f"  metrics:      http://{host}:{http_port}/metrics   (health: /health/ready, /health/live)")
    lines += ["Ctrl-C stops everything.", ""]
    print("\n".join(lines), flush=True)


def _cli_has(command: str) -> bool:
    """Whether this checkout's `queue-bridge` CLI has the command."""
    try:
        from bridge.cli import app

        return any((c.name or getattr(c.callback, "__name__", "")) == command for c in app.registered_commands)
    except Exception:
        return False


async def print_results(url: str, exchange: str) -> None:
    """Print every result the bridge publishes, from a private queue (the durable one is the engine's)."""
    async with results_consumer(url, exchange=exchange) as results:
        while True:
            body = await results.get()
            outcome = (
                f"error {demo_engine.short(body['error'])}"
                if "error" in body
                else demo_engine.short(body.get("result"))
            )
            token = f" (token {demo_engine.short(body.get('token'))})" if body.get("token") is not None else ""
            say(f"result of task {body.get('taskId')}{token}: {outcome}", "results")


async def demo(once: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    default_environment()
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from bridge.observability.logging import configure_logging

    configure_logging(settings)
    if not settings.results_queue:
        print("the demo engine reads the results queue: BRIDGE_RESULTS_QUEUE must not be empty", file=sys.stderr)
        return 2
    count = int(os.environ.get("QB_COUNT") or "20")
    service = os.environ.get("QB_SERVICE") or "demo"
    amqp = settings.amqp_url.get_secret_value()

    say(
        f"starting the bridge (RabbitMQ {urlparse(amqp).hostname}:{urlparse(amqp).port or 5672}, "
        f"Cassandra {','.join(settings.cassandra_hosts)}:{settings.cassandra_port}, "
        f"keyspace {settings.cassandra_keyspace})"
    )
    try:
        bridge = await start_bridge(settings)
        await wait_ready(bridge)
    except Exception as exc:
        say(f"the bridge did not start: {type(exc).__name__}: {exc}")
        if settings.keyring is not None and not settings.keyring.exists():
            say("no key-ring there: `make keyring` writes the dev one (or unset BRIDGE_KEYRING)")
        else:
            say("is the local stack up? `make stack-up` (or `make stack-status`)")
        return 1
    say(f"bridge ready (http :{bridge.http_port})" if bridge.http_port else "bridge ready (http off)")

    workers_stop = asyncio.Event()
    workers = [
        asyncio.create_task(
            demo_worker.main(
                with_user(amqp, OWNER),
                service=service,
                exchange=settings.exchange,
                # Unique across processes: two workers with one id would share one lease.
                worker_id=f"{label}-{socket.gethostname()}-{os.getpid()}",
                max_tasks=0,
                stop=workers_stop,
                log=lambda line, w=label: say(line, w),
            ),
            name=label,
        )
        for label in ("worker-1", "worker-2")
    ]
    rc = 1
    try:
        say(f"2 workers (user {OWNER}) and the engine (user {ENGINE_USER}): {count} tasks, service {service!r}")
        engine_task = asyncio.create_task(
            demo_engine.main(
                with_user(amqp, ENGINE_USER),
                owner=OWNER,
                service=service,
                exchange=settings.exchange,
                results_queue=settings.results_queue,
                count=count,
                timeout=float(os.environ.get("QB_TIMEOUT") or "60"),
                stop=stop,
                log=lambda line: say(line, "engine"),
                # The bridge's own user publishes the results: the one of BRIDGE_AMQP_URL (a .env
                # may name another than the local stack's queue-bridge; its results were dropped).
                bridge_user=amqp_user(amqp),
            )
        )
        rc = await engine_task
        say("demo finished" if rc == 0 else f"demo failed (engine exit code {rc})")
        if not once and not stop.is_set():
            hints(settings, bridge.http_port, service)
            # A private tap on the results exchange needs a user that may declare queues: the
            # local stack's administrator (engines and workers may not, by design).
            tap = asyncio.create_task(print_results(with_user(amqp, "guest"), settings.results_exchange))
            await stop.wait()
            tap.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tap
            rc = 0
    finally:
        say("stopping")
        workers_stop.set()
        # Together, for a worker's stop grace and a little more: a stopping worker first asks the
        # bridge for a task its given-up long-poll may have claimed (up to 5 s); one after the
        # other, the second worker's ask was cut by a cancel.
        pending = [task for task in workers if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=WORKERS_STOP_S)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await bridge.stop()
        say("bye")
    return rc


WORKERS_STOP_S = 25.0  # Worker.run's stop_grace (5 s) and two request timeouts (10 s each): its documented bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--once", action="store_true", help="exit after the demo instead of keeping the bridge up")
    args = parser.parse_args()
    sys.exit(asyncio.run(demo(args.once)))


if __name__ == "__main__":
    main()
