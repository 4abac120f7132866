"""``queue-bridge permissions``: the vhost it prints for, quoting, and the bridge's read rights."""

from __future__ import annotations

import re
import shlex

import pytest
from typer.testing import CliRunner

from bridge.cli import app
from bridge.transport.permissions import amqp_vhost, role_permissions


def _lines(monkeypatch: pytest.MonkeyPatch, url: str, *args: str) -> list[list[str]]:
    monkeypatch.setenv("BRIDGE_AMQP_URL", url)
    monkeypatch.setenv("BRIDGE_TRUSTED_USERS", "engine")
    result = CliRunner().invoke(app, ["permissions", *args])
    assert result.exit_code == 0, result.output
    return [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("rabbitmqctl")]


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://qb:pw@rabbit:5672/prod", "prod"),
        ("amqp://qb:pw@rabbit:5672/team%2Fa", "team/a"),
        ("amqp://qb:pw@rabbit:5672/%2F", "/"),
        ("amqp://qb:pw@rabbit:5672/", "/"),
        ("amqp://qb:pw@rabbit:5672", "/"),
    ],
)
def test_permissions_are_for_the_vhost_of_the_bridges_url(
    monkeypatch: pytest.MonkeyPatch, url: str, vhost: str
) -> None:
    """The lines said `-p /` for a bridge on another vhost: its users got nothing they use."""
    assert amqp_vhost(url) == vhost
    lines = _lines(monkeypatch, url)
    assert lines and all(line[2:4] == ["-p", vhost] for line in lines), lines
    assert lines[0][4] == "qb"


def test_an_explicit_vhost_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _lines(monkeypatch, "amqp://qb:pw@rabbit:5672/prod", "--vhost", "staging")
    assert all(line[3] == "staging" for line in lines)


def test_every_argument_is_quoted_for_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user or vhost with a space, a quote or a ';' made a line that did something else."""
    odd_user, odd_vhost = "ops team;touch /tmp/x", "it's $HOME"
    lines = _lines(monkeypatch, "amqp://qb:pw@rabbit:5672/", "--bridge-user", odd_user, "--vhost", odd_vhost)
    bridge = lines[0]
    assert bridge[:5] == ["rabbitmqctl", "set_permissions", "-p", odd_vhost, odd_user]
    assert len(bridge) == 8
    roles = role_permissions("queue-bridge", "queue-bridge.results", "queue-bridge", "queue-bridge.results")
    assert bridge[5:] == [roles["bridge"].configure, roles["bridge"].write, roles["bridge"].read]


def test_the_bridge_may_not_read_an_engine_results_queue_of_its_own_name() -> None:
    """The bridge declares and binds the results queue and never consumes it: read on it let the
    bridge's user take the engine's results."""
    roles = role_permissions("qb", "qb.results", "qb", "engine-results")
    bridge, engine = roles["bridge"], roles["engine"]
    assert not re.fullmatch(bridge.read, "engine-results")
    assert re.fullmatch(bridge.read, "qb.results"), "binding the queue needs read on the results exchange"
    assert re.fullmatch(bridge.configure, "engine-results") and re.fullmatch(bridge.write, "engine-results")
    assert re.fullmatch(engine.read, "engine-results")
    # Sharing the exchange's name (the default), the queue's name is one the bridge must read.
    shared = role_permissions("qb", "qb.results", "qb", "qb.results")["bridge"]
    assert re.fullmatch(shared.read, "qb.results")


def test_the_bridges_rules_are_never_printed_for_guest_unasked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as documented where BRIDGE_AMQP_URL is not set, it printed the bridge's rules for
    `guest` (the default URL's user, RabbitMQ's administrator): pasted, they cut guest down and
    gave the bridge's user nothing (found by review, 2026-12-07). It asks for --bridge-user."""
    monkeypatch.delenv("BRIDGE_AMQP_URL", raising=False)
    monkeypatch.setenv("BRIDGE_TRUSTED_USERS", "engine")
    result = CliRunner().invoke(app, ["permissions", "--worker", "tenant-a"])
    assert result.exit_code == 2, result.output
    assert "--bridge-user" in result.stderr and "rabbitmqctl" not in result.stdout
    lines = _lines(monkeypatch, "amqp://guest:guest@127.0.0.1:5672/", "--bridge-user", "queue-bridge")
    assert lines[0][4] == "queue-bridge"
