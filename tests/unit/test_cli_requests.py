"""The destructive queue-management commands (purge, discard, redrive --all) against a stand-in
for the bridge's replies: how long they wait, what a timeout says, what a later round's failure
reports, and the target printed before acting. Run in-process (CliRunner): the stand-in replaces
the RPC client's connection and requests, everything in bridge.cli runs as it is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner

from bridge.cli import app
from bridge.client.errors import RequestTimeout, UnavailableError
from bridge.client.rpc import Engine

Reply = Callable[[str, dict[str, Any], float], dict[str, Any]]


class FakeBridge:
    """Answers the engine's requests with ``replies`` in turn (a reply may be an exception);
    records each request's method, body and how much longer than --timeout it was awaited."""

    def __init__(self, *replies: dict[str, Any] | Exception) -> None:
        self.replies = list(replies)
        self.requests: list[tuple[str, dict[str, Any], float]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        async def open(engine: Engine) -> None:
            return None

        async def close(engine: Engine) -> None:
            return None

        async def call(engine: Engine, method: str, body: Any, **kw: Any) -> dict[str, Any]:
            wait_s = float(kw.get("wait_s", 0.0))
            self.requests.append((method, body, wait_s))
            reply = self.replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return {"result": reply, "_headers": {}}

        monkeypatch.setattr(Engine, "open", open)
        monkeypatch.setattr(Engine, "close", close)
        monkeypatch.setattr(Engine, "call", call)


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_AMQP_URL", "amqp://ops:pw-secret@rabbit.example:5673/prod")
    monkeypatch.setenv("BRIDGE_EXCHANGE", "qb-x")
    monkeypatch.delenv("BRIDGE_AMQP_HOSTS", raising=False)


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_purge_awaits_a_round_as_long_as_its_20000_tasks_may_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """One purge request cancels up to 20,000 tasks one compare-and-set at a time: awaited the
    default 10 s, a few thousand ready tasks were reported as "no reply" while the bridge went on."""
    from bridge.domain.lifecycle import PURGE_MAX

    bridge = FakeBridge({"purged": 20_000, "more": True}, {"purged": 3, "more": False})
    bridge.install(monkeypatch)
    code, out, err = _run("purge", "svc", "--yes")
    assert code == 0, err
    assert out.strip() == '{"purged": 20003}'
    assert [m for m, _, _ in bridge.requests] == ["purge", "purge"]
    for _, _, wait_s in bridge.requests:
        assert wait_s >= PURGE_MAX * 0.005, "a round's reply must be awaited for the tasks it may cancel"


def test_a_purge_with_no_answer_says_the_outcome_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeBridge(RequestTimeout("no reply", waited_s=210.0)).install(monkeypatch)
    code, _, err = _run("purge", "svc", "--yes")
    assert code == 1
    assert "no answer within 210s: the outcome is unknown, the bridge may still be working" in err
    assert "run it again to continue" in err
    assert "is a bridge consuming" not in err


def test_discard_awaits_its_ids_and_says_a_timeout_leaves_the_outcome_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [f"00000000-0000-1000-8000-{n:012d}" for n in range(1000)]
    bridge = FakeBridge({"discarded": 1000}, RequestTimeout("no reply", waited_s=30.0))
    bridge.install(monkeypatch)
    code, out, err = _run("discard", "svc", *ids)
    assert code == 0, err
    assert out.strip() == '{"discarded": 1000}'
    assert bridge.requests[0][2] >= 1000 * 0.005
    code, _, err = _run("discard", "svc", *ids)
    assert code == 1 and "the outcome is unknown" in err and "is a bridge consuming" not in err


def test_a_named_redrive_with_no_answer_says_the_outcome_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only `redrive --all` said so: a named redrive that timed out (the bridge still pacing it at
    BRIDGE_REDRIVE_RATE) asked "is a bridge consuming?" while tasks were being put back. Found by
    review."""
    ids = [f"00000000-0000-1000-8000-{n:012d}" for n in range(3)]
    FakeBridge(RequestTimeout("no reply", waited_s=30.0)).install(monkeypatch)
    code, _, err = _run("redrive", "svc", *ids)
    assert code == 1
    assert "the outcome is unknown" in err and "is a bridge consuming" not in err
    assert "redrive: putting back 3 parked task(s) of service 'svc'" in err


def test_a_failed_later_purge_round_reports_what_the_earlier_ones_purged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Those tasks stay purged: reporting only the error left the operator without the count."""
    bridge = FakeBridge(
        {"purged": 20_000, "more": True},
        {"purged": 1_500, "more": True},
        UnavailableError("Cassandra is unavailable"),
    )
    bridge.install(monkeypatch)
    code, _, err = _run("purge", "svc", "--yes")
    assert code == 1
    assert "Cassandra is unavailable" in err
    assert "21500 purged by the 2 request(s) answered before it" in err


def test_a_failed_later_redrive_all_round_reports_what_the_earlier_ones_put_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bridge = FakeBridge(
        {"redriven": 1000, "parkedBefore": 1_700_000_000_000, "after": "a1"},
        RequestTimeout("no reply", waited_s=30.0),
    )
    bridge.install(monkeypatch)
    code, _, err = _run("redrive", "svc", "--all")
    assert code == 1
    assert "the outcome is unknown" in err
    assert "1000 redriven by the 1 request(s) answered before it" in err
    # The second round carried the first reply's bound and position.
    assert bridge.requests[1][1] == {"serviceId": "svc", "all": True, "parkedBefore": 1_700_000_000_000, "after": "a1"}


def test_redrive_all_goes_on_until_a_reply_has_no_after(monkeypatch: pytest.MonkeyPatch) -> None:
    bridge = FakeBridge(
        {"redriven": 1000, "parkedBefore": 5, "after": "a1"},
        {"redriven": 7, "parkedBefore": 5},
    )
    bridge.install(monkeypatch)
    code, out, err = _run("redrive", "svc", "--all")
    assert code == 0, err
    assert out.strip() == '{"redriven": 1007}'


@pytest.mark.parametrize(
    ("args", "reply", "doing"),
    [
        (("purge", "svc", "--yes", "--owner", "tenant-a"), {"purged": 0, "more": False}, "purge"),
        (("discard", "svc", "00000000-0000-1000-8000-000000000001"), {"discarded": 0}, "discard"),
        (("redrive", "svc", "--all", "--owner", "tenant-a"), {"redriven": 0, "parkedBefore": 1}, "redrive --all"),
        (("redrive", "svc", "00000000-0000-1000-8000-000000000001"), {"redriven": 1}, "redrive"),
    ],
)
def test_destructive_commands_name_their_target_before_acting(
    monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], reply: dict[str, Any], doing: str
) -> None:
    """A wrong BRIDGE_AMQP_URL or --owner shows on the terminal, before the tasks are gone."""
    FakeBridge(reply).install(monkeypatch)
    code, _, err = _run(*args)
    assert code == 0, err
    line = err.strip()
    assert line.startswith(f"{doing}: ") and "service 'svc'" in line, line
    assert "rabbit.example:5673" in line and "vhost 'prod'" in line and "user 'ops'" in line
    assert "bridge exchange 'qb-x'" in line
    assert ("owner 'tenant-a'" in line) == ("--owner" in args)
    assert "pw-secret" not in line


def test_the_commands_bounds_are_the_bridges() -> None:
    from bridge.client import rpc
    from bridge.domain import lifecycle

    assert rpc.PURGE_MAX == lifecycle.PURGE_MAX
    assert rpc.REDRIVE_ALL_MAX == lifecycle.REDRIVE_ALL_MAX
