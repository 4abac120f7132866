"""The ``queue-bridge`` commands that need no server (help, config, schema --print, keyring, bad
arguments), run as real subprocesses. The ones that talk to RabbitMQ and Cassandra are in
tests/integration/test_cli.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from bridge.crypto import generate_keyring, write_keyring
from bridge.crypto.keyring_file import KeyringFileProvider, load_keyring
from bridge.transport.errors import BrokerUnreachable, amqp_where
from tests.cli import cli, cli_many, no_traceback, ok
from tests.conftest import ROOT

pytestmark = pytest.mark.anyio

OWNER = "worker-a"


@pytest.fixture
def offline_env(tmp_path: Path) -> dict[str, str]:
    """A complete BRIDGE_* environment whose servers are ports nobody listens on (1)."""
    keyring = tmp_path / "keyring.json"
    write_keyring(keyring, generate_keyring([OWNER, "engine"]))
    return {
        "BRIDGE_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
        "BRIDGE_CASSANDRA_HOSTS": "127.0.0.1",
        "BRIDGE_CASSANDRA_PORT": "1",
        "BRIDGE_CASSANDRA_KEYSPACE": "qb_offline",
        "BRIDGE_KEYRING": str(keyring),
        "BRIDGE_EXCHANGE": "qb-offline",
        "BRIDGE_TRUSTED_USERS": "engine",
        "BRIDGE_HTTP_PORT": "0",
        "BRIDGE_LOG_FORMAT": "json",
    }


async def test_config_masks_secrets_and_schema_prints_cql(offline_env: dict[str, str]) -> None:
    config, schema = await cli_many(
        (("config",), {"BRIDGE_KEY_SERVER_TOKEN": "s3cr3t"}),
        (("schema", "--print"), {}),
        env=offline_env,
    )
    out = ok(config)
    assert "s3cr3t" not in out
    doc = json.loads(out)
    assert doc["BRIDGE_KEY_SERVER_TOKEN"] == "**********"
    assert doc["BRIDGE_EXCHANGE"] == offline_env["BRIDGE_EXCHANGE"]
    assert "guest:guest" not in out  # the AMQP URL is a secret too

    cql = ok(schema)
    keyspace = offline_env["BRIDGE_CASSANDRA_KEYSPACE"]
    assert f"CREATE KEYSPACE IF NOT EXISTS {keyspace}" in cql
    for table in ("ready", "leases", "cursors", "outbox"):
        assert f"CREATE TABLE IF NOT EXISTS {keyspace}.{table} (" in cql


COMMANDS = [
    (),
    ("run",),
    ("config",),
    ("schema",),
    ("stats",),
    ("add",),
    ("fetch",),
    ("ack",),
    ("keyring",),
    ("keyring", "generate"),
    ("keyring", "rotate"),
]


async def test_help_of_every_command(offline_env: dict[str, str]) -> None:
    procs = await cli_many(*(((*cmd, "--help"), {}) for cmd in COMMANDS), env=offline_env)
    for cmd, proc in zip(COMMANDS, procs, strict=True):
        out = ok(proc)
        assert "Usage:" in out, (cmd, out)
    top = procs[0].stdout
    for name in ("run", "config", "schema", "stats", "add", "fetch", "ack", "keyring"):
        assert name in top


async def test_bad_arguments_and_unreachable_cassandra(offline_env: dict[str, str]) -> None:
    bad_value, bad_result, both, unreachable = await cli_many(
        (("add", "svc", "{not json"), {}),
        (("ack", "svc", "--worker", "w", "--result", "[1,"), {}),
        (("ack", "svc", "--worker", "w", "--result", "1", "--error", "2"), {}),
        (
            ("stats", "svc", "--owner", OWNER),
            {"BRIDGE_CASSANDRA_PORT": "1", "BRIDGE_CASSANDRA_TIMEOUT": "1"},
        ),
        env=offline_env,
    )
    for proc, words in ((bad_value, "VALUE_JSON"), (bad_result, "--result"), (both, "not both")):
        assert proc.returncode == 2, proc
        assert words in proc.stderr
        no_traceback(proc)
    assert "not valid JSON" in bad_value.stderr and "not valid JSON" in bad_result.stderr

    assert unreachable.returncode == 1, unreachable
    assert "cannot connect to Cassandra at " in unreachable.stderr and ":1:" in unreachable.stderr
    assert unreachable.stdout == ""
    no_traceback(unreachable)


async def test_schema_and_run_with_cassandra_unreachable_say_so_in_one_line(offline_env: dict[str, str]) -> None:
    """Exit code 1 and one line naming the server, as ``stats`` answers the same failure.

    Defect: ``schema`` let the driver's NoHostAvailable escape as a rich traceback, and ``run``
    (the bridge at start) its StorageUnavailable, both exit code 1 with a screenful of frames."""
    unreachable = {"BRIDGE_CASSANDRA_PORT": "1", "BRIDGE_CASSANDRA_TIMEOUT": "1"}
    procs = await cli_many((("schema",), unreachable), (("run",), unreachable), env=offline_env)
    for proc in procs:
        assert proc.returncode == 1, proc
        no_traceback(proc)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith("error: cannot connect to Cassandra at 127.0.0.1:1: "), proc
    assert "schema ready" not in procs[0].stdout


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line an expected failure of ``run`` prints on stderr (``error: ...``, or a
    configuration error naming its ``BRIDGE_*`` variable), and no traceback."""
    no_traceback(proc)
    # Not the bridge's JSON log lines, some of which name a setting (the clock's, at start).
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    errors = [line for line in lines if line.startswith("error: ") or "BRIDGE_" in line]
    assert len(errors) == 1, proc.stderr[-1500:]
    return errors[0]


# ``queue-bridge run`` with Cassandra stubbed out (connect, schema, prepare are no-ops), everything
# else real: the start goes on to the real AMQP connection (the same output comes from a real run
# against a reachable Cassandra).
RUN_WITHOUT_CASSANDRA = textwrap.dedent(
    """
    import bridge.app
    from bridge.storage.acsylla_session import AcsyllaSession
    from bridge.storage.repository import CassandraTaskStore

    async def _noop(*args, **kwargs):
        return None

    async def _host_time(*args, **kwargs):
        import time
        return int(time.time() * 1000)

    AcsyllaSession.connect = _noop
    CassandraTaskStore.prepare = _noop
    CassandraTaskStore.server_time_ms = _host_time  # the clock is read before RabbitMQ is tried
    bridge.app.ensure_schema = _noop

    import sys
    from bridge.cli import main
    sys.argv = ["queue-bridge", "run"]
    main()
    """
)


async def test_run_with_rabbitmq_out_of_reach_at_start_says_so_in_one_line(offline_env: dict[str, str]) -> None:
    """Exit code 1 and one line naming RabbitMQ's host:port, as for Cassandra out of reach.

    Defect: the bridge started before RabbitMQ's AMQP listener accepts connections (the race
    docker-compose.yml's ``restart: on-failure`` counts on), or a wrong host/port in
    BRIDGE_AMQP_URL, made ``run`` exit 1 with aiormq's AMQPConnectionError as a rich traceback of
    about 150 lines, printed again at every restart: ``run`` mapped only Cassandra's failures.
    Bridge.start now raises BrokerUnreachable for what the broker or the network refuses (also a
    login refused, a declaration refused), and ``run`` prints its one line."""
    env = {**os.environ, **offline_env, "BRIDGE_AMQP_URL": "amqp://queue-bridge:s3cr3t-pw@127.0.0.1:1/"}
    env["COLUMNS"] = "200"
    with anyio.fail_after(30):
        done = await anyio.run_process([sys.executable, "-c", RUN_WITHOUT_CASSANDRA], env=env, cwd=ROOT, check=False)
    proc = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())
    assert proc.returncode == 1, proc
    line = one_error_line(proc)
    assert line.startswith("error: cannot connect to RabbitMQ at 127.0.0.1:1: "), line
    assert "s3cr3t-pw" not in proc.stderr + proc.stdout


def test_broker_unreachable_names_host_and_port_never_the_password() -> None:
    """The line ``run`` prints when RabbitMQ refuses the start: host:port (the scheme's default
    port when the URL has none), the cause's type, its password masked should the cause quote the
    URL, and a user's name kept even when it is also its password."""
    where, secret = amqp_where("amqps://bridge:p%40ss@mq.example:5671/vh")
    assert (where, secret) == ("mq.example:5671", "p%40ss")
    assert amqp_where("amqp://[::1]/")[0] == "[::1]:5672"
    cause = ConnectionRefusedError("amqps://bridge:p%40ss@mq.example:5671/vh refused")
    message = str(BrokerUnreachable(where, cause, secret=secret))
    assert message == (
        "cannot connect to RabbitMQ at mq.example:5671: ConnectionRefusedError:"
        " amqps://bridge:**********@mq.example:5671/vh refused"
    )
    refused = str(BrokerUnreachable("h:5672", PermissionError("access refused for user 'engine'"), secret="engine"))
    assert refused.endswith("user 'engine'")


async def test_run_with_its_http_port_taken_says_so_in_one_line(offline_env: dict[str, str]) -> None:
    """Exit code 2 (invalid configuration) and one line naming BRIDGE_HTTP_PORT and the address.

    Defect: deploy/kubernetes/deployment.yaml runs the bridge as a sidecar, its BRIDGE_HTTP_PORT
    (8080, many images' port) in the Pod's network namespace with the worker container: a port
    taken made ``run`` exit 1 with an OSError ("address already in use") rich traceback, naming
    neither BRIDGE_HTTP_PORT nor what to change (the gateway's port, BRIDGE_GATEWAY_PORT, alike)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # nosec B104: the bridge's default BRIDGE_HTTP_HOST
        taken.listen()
        port = taken.getsockname()[1]
        proc = await cli("run", env=offline_env, extra={"BRIDGE_HTTP_PORT": str(port)})
    assert proc.returncode == 2, proc
    line = one_error_line(proc)
    assert line.startswith(f"BRIDGE_HTTP_PORT: cannot listen on 0.0.0.0:{port}: "), line


async def test_keyring_generate_and_rotate(offline_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "ring.json"
    ok(await cli("keyring", "generate", str(path), "--owner", "alpha", "--owner", "beta", env=offline_env))
    assert path.stat().st_mode & 0o777 == 0o600
    before = json.loads(path.read_text())
    assert set(before["owners"]) == {"alpha", "beta"}

    refused, rotated = await cli_many(
        (("keyring", "generate", str(path), "--owner", "gamma"), {}),
        (("keyring", "rotate", str(path), "--owner", "alpha"), {}),
        env=offline_env,
    )
    # generate never overwrites without --force (it ran alongside the rotation, so only its answer is checked)
    assert refused.returncode == 1 and "--force" in refused.stderr
    no_traceback(refused)
    out = ok(rotated)

    after = json.loads(path.read_text())
    assert set(after["owners"]) == {"alpha", "beta"}
    alpha_before, alpha_after = before["owners"]["alpha"], after["owners"]["alpha"]
    assert alpha_after["current"] != alpha_before["current"]
    assert alpha_after["current"] in out
    assert set(alpha_before["keys"]) < set(alpha_after["keys"])  # old keys are kept
    assert after["owners"]["beta"] == before["owners"]["beta"]
    load_keyring(path)  # valid

    provider = KeyringFileProvider(path)
    assert (await provider.current_key("alpha")).key_id == alpha_after["current"]
    assert (await provider.key_by_id("alpha", alpha_before["current"])).secret


async def test_a_connection_closing_as_it_opens_is_a_one_line_failure() -> None:
    """aiormq raises a plain RuntimeError ("<Connection> closed"), StopAsyncIteration (a handshake
    that met EOF) for a connection that closed as it opened: they escaped the CLI as a traceback
    (found by review, 2026-12-06). Said as a connection failure, as OSError and AMQPError are."""
    from bridge.cli.base import Failure
    from bridge.cli.requests import _with_client

    class Closing:
        url = "amqp://u:secret@mq.example:5672/"
        urls = [url]
        exchange_name = "x"
        connect_timeout = 1.0

        def __init__(self, cause: BaseException) -> None:
            self.cause = cause

        async def open(self) -> None:
            raise self.cause

        async def close(self) -> None:
            pass

    async def use(client: object) -> None:
        raise AssertionError("not reached")

    for cause in (RuntimeError("<Connection> closed"), StopAsyncIteration()):
        with pytest.raises(Failure, match=re.escape("cannot connect to RabbitMQ at amqp://u@mq.example:5672/: ")):
            await _with_client(Closing(cause), 1.0, use)  # type: ignore[arg-type,type-var]


async def test_an_empty_idempotency_id_is_refused_before_anything_is_sent(offline_env: dict[str, str]) -> None:
    """``--message-id ""`` (a script's unset variable) sent no key at all (the client makes a random
    one), and the advice after a lost reply, "run it again with --message-id ''", added the task
    twice; an empty ``--request-id`` made a re-run of cancel answer false for a task the first
    request cancelled (found by review, 2026-12-07). Refused, exit 2, before connecting."""
    add, cancel = await cli_many(
        (("add", "svc", '"v"', "--message-id", ""), {}),
        (("cancel", "svc", "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "--request-id", " "), {}),
        env=offline_env,
    )
    for proc, option in ((add, "--message-id"), (cancel, "--request-id")):
        assert proc.returncode == 2 and option in proc.stderr, proc
        assert "cannot connect" not in proc.stderr, proc


async def test_generate_force_over_a_broken_file_keeps_the_last_good_backup(
    offline_env: dict[str, str], tmp_path: Path
) -> None:
    """A key-ring file left empty (a disk full mid-write, a `>` slip), then `generate --force`:
    the empty file was copied over keys.json.bak, the last good copy of every owner's keys, and the
    new key-ring left every queued task unreadable with no way back (found by review, 2026-12-07)."""
    path = tmp_path / "keys.json"
    ok(await cli("keyring", "generate", str(path), "--owner", "alpha", env=offline_env))
    ok(await cli("keyring", "rotate", str(path), "--owner", "alpha", env=offline_env))  # .bak: the first ring
    good = json.loads((tmp_path / "keys.json.bak").read_text())
    path.write_text("")  # the slip
    ok(await cli("keyring", "generate", str(path), "--owner", "alpha", "--force", env=offline_env))
    assert json.loads((tmp_path / "keys.json.bak").read_text()) == good, "the last good key-ring was overwritten"
    # Nor are the replaced bytes lost (a key-ring cut short still holds the newest keys).
    assert (tmp_path / "keys.json.bak.invalid").read_text() == ""
    cut = path.read_text()[:-5]  # a newer ring cut short: its keys are in no other file
    path.write_text(cut)
    ok(await cli("keyring", "generate", str(path), "--owner", "alpha", "--destroy-existing-keys", env=offline_env))
    assert (tmp_path / "keys.json.bak.invalid").read_text() == cut
    assert json.loads((tmp_path / "keys.json.bak").read_text()) == good
    # Over a key-ring, the backup is that key-ring, as before.
    current = json.loads(path.read_text())
    ok(await cli("keyring", "rotate", str(path), "--owner", "alpha", env=offline_env))
    assert json.loads((tmp_path / "keys.json.bak").read_text()) == current


async def test_a_staged_rotation_prints_a_promote_line_quoted_for_the_shell(
    offline_env: dict[str, str], tmp_path: Path
) -> None:
    """The promote line printed after `rotate --stage` was plain text: an owner or path with a space
    (or a `;`) pasted into a shell promoted nothing, or ran something else (found by review)."""
    import shlex

    path = tmp_path / "key ring.json"
    owner = "team a; rm -rf x"
    ok(await cli("keyring", "generate", str(path), "--owner", owner, env=offline_env))
    out = ok(await cli("keyring", "rotate", str(path), "--owner", owner, "--stage", env=offline_env))
    line = out[out.index("queue-bridge keyring promote") :].strip()
    argv = shlex.split(line)
    assert argv[:4] == ["queue-bridge", "keyring", "promote", str(path)] and argv[4:6] == ["--owner", owner], argv
