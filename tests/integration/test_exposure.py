"""What the bridge logs and prints: no task values, tokens or passwords, and tracebacks that help.

Each test failed before its fix; the docstrings say what was wrong."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest

from bridge.client.errors import BridgeClientError
from bridge.observability.logging import configure_logging
from tests.conftest import service_id, settings_from

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

VALUE_CANARY = "value-canary-7f3a"
TOKEN_CANARY = "token-canary-91be"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def log_format(bridge_env):
    """Configure the bridge's logging as ``queue-bridge run`` does, in the format asked for."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def configure(fmt: str) -> None:
        configure_logging(settings_from(bridge_env, log_format=fmt, log_level="INFO"))

    yield configure
    root.handlers[:], level = saved
    root.setLevel(level)


def a_store_bug(bridge: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any bug under an add (here: the store raises something that is no BridgeError): the bridge
    answers ``internal`` and logs the error with its traceback, as it does for every bug."""
    store = bridge.queue.ctx.store

    async def store_task(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected bug in store_task")

    monkeypatch.setattr(store, "store_task", store_task)


async def test_console_logs_of_a_request_that_hit_a_bug_hold_no_values_or_tokens(
    log_format, bridge, engine, capsys, monkeypatch
):
    """logging.py promises "never values or keys" and docs/security.md "logs carry ids, never
    values, tokens, results or keys". With BRIDGE_LOG_FORMAT=console (or auto on a terminal) the
    ConsoleRenderer formats exceptions with rich (a runtime dependency through typer) and its
    default show_locals=True: the traceback of any internal error prints every frame's locals,
    here the add's plaintext value and token."""
    log_format("console")
    a_store_bug(bridge, monkeypatch)
    with pytest.raises(BridgeClientError) as err:
        await engine.add(service_id(), {"secret": VALUE_CANARY}, token={"t": TOKEN_CANARY})
    assert err.value.code == "internal"
    err_text = ANSI.sub("", capsys.readouterr().err)
    assert "injected bug in store_task" in err_text, "the internal error is logged"
    assert VALUE_CANARY not in err_text, "the task's value is in the log (a traceback local)"
    assert TOKEN_CANARY not in err_text, "the task's token is in the log (a traceback local)"


async def test_json_logs_of_an_internal_error_carry_its_traceback(log_format, bridge, engine, capsys, monkeypatch):
    """Production logs (JSON) are where an ``internal`` error is to be looked up ("internal error;
    the request was dead-lettered, see the bridge log"). The JSON pipeline has no
    format_exc_info/dict_tracebacks processor, so the record's exc_info tuple reaches the
    JSONRenderer as it is and is written as three reprs: no stack, no file, no line."""
    log_format("json")
    a_store_bug(bridge, monkeypatch)
    with pytest.raises(BridgeClientError) as err:
        await engine.add(service_id(), 1)
    assert err.value.code == "internal"
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    failed = [e for e in events if e.get("event") == "add failed unexpectedly"]
    assert failed, [e.get("event") for e in events]
    logged = json.dumps(failed[0])
    assert "<traceback object at" not in logged, f"exc_info written as reprs: {failed[0].get('exc_info')}"
    assert "store_task" in logged and "Traceback" in logged, f"no traceback in the log: {failed[0]}"


async def test_config_masks_the_key_server_urls_password():
    """``queue-bridge config`` promises "secrets masked": BRIDGE_AMQP_URL is masked whole because its
    password is in it, but BRIDGE_KEY_SERVER_URL (a plain str) is printed as it is, credentials and
    all. A key server behind basic auth is reached with exactly such a URL (aiohttp sends the
    URL's user:password as an Authorization header), and whoever holds those credentials can read
    every owner's encryption key."""
    from tests.cli import cli, ok

    out = ok(
        await cli(
            "config",
            env={
                "BRIDGE_KEYRING": "",
                "BRIDGE_KEY_SERVER_URL": "https://qb-reader:kS-p4ssw0rd@keys.example:8443/v1",
                "BRIDGE_AMQP_URL": "amqp://queue-bridge:amqp-p4ssw0rd@rabbit.example:5672/",
            },
        )
    )
    assert "amqp-p4ssw0rd" not in out
    assert "kS-p4ssw0rd" not in out, json.loads(out)["BRIDGE_KEY_SERVER_URL"]


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"BRIDGE_KEY_SERVER_URL": "keys.internal:8443"}, id="no-scheme"),
        pytest.param(
            {"BRIDGE_KEY_SERVER_URL": "http://keys.internal:8080", "BRIDGE_KEY_SERVER_TOKEN": "t0k"},
            id="token-over-plain-http",
        ),
    ],
)
def test_run_with_an_unusable_key_server_url_fails_as_a_configuration_error(env, tmp_path):
    """The same promise test_start_and_stop.py checks for BRIDGE_KEYRING ("Invalid values stop the
    bridge at start with a message naming the variable", exit 2, never a traceback) is not kept
    for BRIDGE_KEY_SERVER_URL: HttpKeyProvider's ValueError escapes build_key_provider (app.py),
    and `queue-bridge run` dies with a full traceback, exit 1, not naming the variable."""
    import os
    import subprocess
    import sys

    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "run"],
        env={**base, "BRIDGE_HTTP_PORT": "0", "BRIDGE_CASSANDRA_PORT": "1", **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-400:]
    assert proc.returncode == 2, f"exit {proc.returncode}"
    assert "BRIDGE_KEY_SERVER_URL" in out
