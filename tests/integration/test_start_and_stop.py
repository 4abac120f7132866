"""Starting and stopping the bridge: settings refused at start, and what a stop (SIGTERM) owes to
the requests and counts it has in hand (real servers)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.config import ConfigError, load_settings
from tests.conftest import service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_sigterm_during_a_counts_flush_loses_no_queue_count(make_bridge, engine, monkeypatch):
    """stop() cancelled the queue-count flush task first. A flush in progress has already swapped
    the pending deltas out of QueueCounts; cancelled between two counter writes, the deltas it had
    not written yet were neither written nor put back (19 of 20 queues showed ready 0). The
    flusher now ends on its own after one more flush, which stop() waits for."""
    b = await make_bridge()
    services = [service_id() for _ in range(20)]
    await asyncio.gather(*(engine.add(svc, i) for i, svc in enumerate(services)))

    # Pass-through: no delay, it only tells the test that a flush is writing (SIGTERM arrives then).
    flushing = asyncio.Event()
    real = b.store.add_counts

    async def add_counts(*args: Any) -> None:
        flushing.set()
        await real(*args)

    monkeypatch.setattr(b.store, "add_counts", add_counts)
    await asyncio.wait_for(flushing.wait(), 5.0)
    await b.stop()  # what SIGTERM does (run_forever -> Bridge.stop)

    await make_bridge()  # another bridge answers stats
    stats = {s.service_id: s for s in await engine.stats()}
    wrong = {svc: (stats[svc].ready if svc in stats else None) for svc in services}
    wrong = {svc: ready for svc, ready in wrong.items() if ready != 1}
    assert not wrong, f"{len(wrong)} of {len(services)} queues with one ready task say ready={wrong}"


async def test_a_long_poll_starting_as_the_bridge_stops_is_answered_at_once(make_bridge, workers, monkeypatch):
    """hints.close() answers the fetches that wait *now*. A waiting fetch between its take()'s
    `_closed` check and its registration as a waiter (the basic.get round trip) registers after
    close() and waited its whole waitMs: stop() gave up after BRIDGE_SHUTDOWN_GRACE and closed the
    connection under it, and the worker got no reply at all. The wait now checks for a stop first."""
    b = await make_bridge(shutdown_grace=3.0)
    svc = service_id()
    w = await workers(svc, "w", timeout=30)

    # Pass-through: tells the test that the fetch is about to wait (SIGTERM arrives then).
    entering = asyncio.Event()
    real = b.hints.take

    async def take(q: Any, wait_ms: int) -> Any:
        if wait_ms > 0:
            entering.set()
        return await real(q, wait_ms)

    monkeypatch.setattr(b.hints, "take", take)
    waiting = asyncio.create_task(w.fetch(wait_ms=20_000))
    await asyncio.wait_for(entering.wait(), 10.0)
    stopping = time.monotonic()
    stop = asyncio.create_task(b.stop())
    try:
        got = await asyncio.wait_for(asyncio.shield(waiting), 2.5)
    except TimeoutError:
        got = "no answer"
    await stop
    took = time.monotonic() - stopping
    waiting.cancel()
    assert got is None, f"the waiting fetch got {got!r} ({took:.1f}s for stop)"


def test_clock_skew_margin_that_can_never_be_met_is_refused_at_start():
    """BRIDGE_CLOCK_SKEW_MARGIN was accepted from 0 (config.py ``ge=0``), but a bridge grants leases
    only while its clock's uncertainty (half a round trip + 0.5 ms of now()'s resolution, always
    > 0.5 ms) is within half the margin: with any margin up to 1 ms it never does. Such a bridge
    starts, never becomes ready and never consumes fetches, instead of failing at start with a
    message naming the variable (README: "Invalid values stop the bridge at start")."""
    for value in ("0", "0.001"):
        with pytest.raises(ConfigError, match="BRIDGE_CLOCK_SKEW_MARGIN"):
            load_settings(_env_file=None, clock_skew_margin=value, keyring="/dev/null")


def _run(env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "bridge", "run"],
        env={**base, "BRIDGE_HTTP_PORT": "0", "BRIDGE_CASSANDRA_PORT": "1", **env},
        cwd=tmp,  # no .env of the repository
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("case", "env"),
    [
        ("no key source", {}),
        ("keyring file missing", {"BRIDGE_KEYRING": "{tmp}/missing.json"}),
        ("keyring file not JSON", {"BRIDGE_KEYRING": "{tmp}/bad.json"}),
        ("keyring variable empty", {"BRIDGE_KEYRING": ""}),
    ],
)
def test_run_with_an_unusable_key_source_fails_as_a_configuration_error(case, env, tmp_path):
    """README: "Exactly one of BRIDGE_KEYRING and BRIDGE_KEY_SERVER_URL must be set" and "Invalid
    values stop the bridge at start with a message naming the variable"; the CLI promises exit 2
    for an invalid configuration and "never a traceback". `run` without a key source, or with a
    key-ring that cannot be read, died in Bridge.__init__ (app.py build_key_provider /
    KeyringFileProvider) with a ValueError/OSError traceback and exit code 1; BRIDGE_KEYRING=""
    was even taken as the path "." (IsADirectoryError)."""
    (tmp_path / "bad.json").write_text('{"owners": {')
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    proc = _run(env, tmp_path)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, f"{case}: traceback\n{out[-600:]}"
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{out[-600:]}"
    assert "BRIDGE_KEYRING" in out, f"{case}: the message does not name the variable\n{out[-600:]}"


@pytest.mark.parametrize(
    "url",
    ["http://keys.example.internal:8080/", "http://svc:secret@keys.example.internal/"],
    ids=["plain", "basic-auth"],
)
def test_run_refuses_a_remote_key_server_over_plain_http(url, tmp_path):
    """A key server's answers are the owners' keys, in clear: over plain http:// to another host
    anyone on the path read every key, and anyone answering on it chose the key new tasks were
    sealed with. Refused unless the operator allows it (a mesh's mTLS), like a token over http
    was; the password of the URL is not printed. Found by the security review, 2026-12-05."""
    proc = _run({"BRIDGE_KEY_SERVER_URL": url}, tmp_path)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-600:]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out[-600:]}"
    assert "BRIDGE_KEY_SERVER_URL" in out and "https" in out, out[-600:]
    assert "secret" not in out


def test_an_empty_key_server_url_is_not_a_second_key_source(tmp_path):
    """BRIDGE_KEY_SERVER_URL="" (a template or ConfigMap that leaves it blank) next to a key-ring:
    the settings refused it as "set BRIDGE_KEYRING or BRIDGE_KEY_SERVER_URL, not both" (config.py
    _one_key_source compares with None). "" is now unset, as for BRIDGE_RESULTS_QUEUE."""
    from bridge.crypto import generate_keyring, write_keyring

    path = tmp_path / "k.json"
    write_keyring(path, generate_keyring(["a"]))
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "config"],
        env={"PATH": os.environ.get("PATH", ""), "BRIDGE_KEYRING": str(path), "BRIDGE_KEY_SERVER_URL": ""},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


async def test_a_bridge_stops_within_its_grace_while_the_broker_refuses_its_reconnection(bridge_env, servers):
    """The broker closed the bridge's connections and refuses them back (here its user was deleted;
    the same while RabbitMQ is down): stopping waited on each consumer's cancel, which waits for
    the robust channel to be restored, for ever (a SIGTERM ran into the orchestrator's SIGKILL)."""
    import subprocess
    import time
    import uuid

    from bridge.app import Bridge
    from tests.conftest import BRIDGE_USER, settings_from

    def rabbitmqctl(*args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True).stdout

    user = f"qb-gone-{uuid.uuid4().hex[:6]}"
    lines = (await asyncio.to_thread(rabbitmqctl, "list_user_permissions", BRIDGE_USER)).splitlines()
    vhost, *permissions = next(line.split("\t") for line in lines if line.startswith("/\t"))
    await asyncio.to_thread(rabbitmqctl, "add_user", user, user)
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, user, *permissions)
        grace = 2.0
        b = Bridge(settings_from(bridge_env, amqp_url=servers.amqp_url(user), shutdown_grace=grace))
        await b.start()
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_user", user)  # closes its connections
    await wait_for(lambda: not b.transport.is_ready(), 10, what="the bridge's connection closed by the broker")
    start = time.monotonic()
    await asyncio.wait_for(b.stop(), 40)
    took = time.monotonic() - start
    assert took < 3 * grace + 3, f"stopping took {took:.1f}s with a {grace}s grace"


async def test_a_redrive_still_running_when_the_grace_ends_is_answered_unavailable(make_bridge, engine, workers):
    """A redrive paces itself (BRIDGE_REDRIVE_RATE) and is acknowledged as it starts: the broker
    will not deliver it again. A stop whose grace ended before it did closed the connections with
    it still running: it went on until the store's close failed it, its reply went nowhere, and
    its caller waited out its whole timeout for a request half done (found by review,
    2026-12-08). It is cut at the grace's end and answered ``unavailable``: its caller sends it
    again (a redrive is idempotent), and every task is back, or still parked, never lost."""
    from bridge.client import UnavailableError
    from tests.integration.test_redrive_all import park_each_once

    b = await make_bridge(redrive_rate=2.0, shutdown_grace=0.5)
    svc = service_id()
    ids = await park_each_once(engine, workers, svc, 8)  # 4 s of redrive at 2 a second
    redriving = asyncio.create_task(engine.redrive(svc, ids, redrive_rate=2.0))

    async def some_back() -> bool:
        return len(await engine.parked(svc)) < len(ids)

    await wait_for(some_back, 10, what="the redrive under way")
    stopped_at = time.monotonic()
    await make_bridge.stop(b)
    with pytest.raises(UnavailableError, match="the bridge is stopping"):
        await asyncio.wait_for(redriving, 30)
    answered_after = time.monotonic() - stopped_at
    # The grace (0.5 s) and the cut's answer: not the client's whole wait (4 s of pacing + 10 s).
    assert answered_after < 6.0, f"the cut redrive was answered {answered_after:.1f} s after the stop began"
    await make_bridge()  # another bridge: the redrive sent again puts back the rest
    left = [t.id for t in await engine.parked(svc)]
    assert left, "the redrive was not cut: every task went back before the stop"
    assert await engine.redrive(svc, left, redrive_rate=2.0) == len(left)
    assert await engine.parked(svc) == []


async def test_a_discard_still_running_when_the_grace_ends_is_answered_unavailable(
    make_bridge, engine, workers, monkeypatch
):
    """A discard is one compare-and-set a task, acknowledged once it outlasts its brief hold: a
    store slow at them made it outlast the stop's grace, and the stop closed the connections with
    it running (its reply lost, its caller waiting out its timeout). It ends between two tasks,
    never inside a write, and is answered ``unavailable``: sent again, it discards the rest."""
    from bridge.client import UnavailableError
    from tests.integration.test_redrive_all import park_each_once

    b = await make_bridge(shutdown_grace=0.5)
    svc = service_id()
    ids = await park_each_once(engine, workers, svc, 6)
    real_cancel = b.store.cancel
    writing = asyncio.Event()

    async def slow_cancel(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        await asyncio.sleep(1.0)  # a slow store: six tasks take six seconds
        return await real_cancel(*args, **kwargs)

    monkeypatch.setattr(b.store, "cancel", slow_cancel)
    discarding = asyncio.create_task(engine.discard(svc, ids))
    await asyncio.wait_for(writing.wait(), 15)
    await make_bridge.stop(b)
    with pytest.raises(UnavailableError, match="the bridge is stopping"):
        await asyncio.wait_for(discarding, 30)
    await make_bridge()
    left = [t.id for t in await engine.parked(svc)]
    assert left, "the discard was not cut: every task went before the stop"
    assert await engine.discard(svc, left) == len(left)
    assert await engine.parked(svc) == []
