"""The destructive queue-management commands (purge, discard, redrive --all) against a stand-in
for the bridge's replies: how long they wait, what a timeout says, what a later round's failure
reports, and the target printed before acting. Run in-process (CliRunner): the stand-in replaces
the RPC client's connection and requests, everything in bridge.cli runs as it is."""

from __future__ import annotations

import json
import uuid
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

    def __init__(self, *replies: Any) -> None:
        self.replies = list(replies)
        self.requests: list[tuple[str, dict[str, Any], float]] = []
        self.message_ids: list[str | None] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        async def open(engine: Engine) -> None:
            return None

        async def close(engine: Engine) -> None:
            return None

        async def call(engine: Engine, method: str, body: Any, **kw: Any) -> dict[str, Any]:
            wait_s = float(kw.get("wait_s", 0.0))
            self.requests.append((method, body, wait_s))
            self.message_ids.append(kw.get("message_id"))
            reply = self.replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            if method == "add":  # the one reply not under "result"
                return {"task": {"id": reply}, "_headers": {}}
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


# Review round 16 (the operator's CLI in an incident). Each test failed before its fix.

PARKED_BOUND = "2026-12-07T10:00:00.000Z"
AFTER_ID = "00000000-0000-1000-8000-000000000050"


def test_a_redrive_all_that_fails_part_way_prints_the_command_that_goes_on_with_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A re-run of `redrive --all` took a new bound: it put back again the poison tasks the first
    run put back and workers parked since (the loop contract 1.9 ended). The error now names the
    bound and position, and the command that goes on with them."""
    bridge = FakeBridge(
        {"redriven": 1000, "parkedBefore": PARKED_BOUND, "after": AFTER_ID},
        RequestTimeout("no reply", waited_s=30.0),
    )
    bridge.install(monkeypatch)
    code, _, err = _run("redrive", "svc", "--all", "--owner", "tenant-a")
    assert code == 1
    assert "the outcome is unknown" in err and "run it again to continue" not in err
    assert "1000 redriven by the 1 request(s) answered before it" in err
    assert (
        f"to go on: queue-bridge redrive --all --parked-before {PARKED_BOUND} --after {AFTER_ID} "
        "--owner tenant-a --timeout 10.0 -- svc"
    ) in err

    resumed = FakeBridge({"redriven": 7, "parkedBefore": PARKED_BOUND})
    resumed.install(monkeypatch)
    code, out, err = _run(
        "redrive", "svc", "--all", "--parked-before", PARKED_BOUND, "--after", AFTER_ID, "--owner", "tenant-a"
    )
    assert code == 0, err
    assert json.loads(out) == {"redriven": 7}
    assert resumed.requests[0][1] == {"serviceId": "svc", "all": True, "parkedBefore": PARKED_BOUND, "after": AFTER_ID}


def test_a_redrive_all_whose_first_request_fails_says_run_it_again(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeBridge(RequestTimeout("no reply", waited_s=30.0)).install(monkeypatch)
    code, _, err = _run("redrive", "svc", "--all")
    assert code == 1
    assert "run it again to continue" in err and "to go on:" not in err


def test_a_resume_command_never_carries_the_amqp_url(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeBridge(
        {"redriven": 3, "parkedBefore": PARKED_BOUND, "after": AFTER_ID}, UnavailableError("Cassandra is unavailable")
    ).install(monkeypatch)
    code, _, err = _run("redrive", "svc", "--all", "--amqp-url", "amqp://ops:pw-on-cli@rabbit.example/prod")
    assert code == 1
    assert "pw-on-cli" not in err
    assert "--amqp-url URL" in err and f"--after {AFTER_ID}" in err


@pytest.mark.parametrize(
    ("args", "param"),
    [
        (("redrive", "svc", "--parked-before", PARKED_BOUND, AFTER_ID), "--parked-before / --after"),
        (("redrive", "svc", "--all", "--parked-before", "yesterday"), "--parked-before"),
        (("redrive", "svc", "--all", "--parked-before", "2026-12-07T10:00:00"), "--parked-before"),
        (("redrive", "svc", "--all", "--after", "not-a-uuid"), "--after"),
        (("redrive", "svc", str(uuid.uuid4())), "TASK_ID"),
        (("discard", "svc", "00000000-0000-1000-8000-000000000001", "nope"), "TASK_ID"),
        (("cancel", "svc", str(uuid.uuid4())), "TASK_ID"),
        (("discard", "x" * 256, "00000000-0000-1000-8000-000000000001"), "SERVICE"),
        (("redrive", "bad\nservice", "--all"), "SERVICE"),
        (("add", "é" * 128, "1"), "SERVICE"),
    ],
)
def test_arguments_the_bridge_would_refuse_are_usage_errors_before_anything_is_sent(
    monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], param: str
) -> None:
    """Refused by the bridge (exit 1) after the "about to act" notice, or not at all until then."""
    bridge = FakeBridge()
    bridge.install(monkeypatch)
    code, _, err = _run(*args)
    assert code == 2, err
    assert param in err
    assert bridge.requests == []
    assert "putting back" not in err and "dropping" not in err and "cancelling" not in err


def test_more_than_1000_named_ids_go_as_several_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [f"00000000-0000-1000-8000-{n:012d}" for n in range(2500)]
    bridge = FakeBridge(
        {"redriven": 1000},
        {"redriven": 990},
        {"redriven": 500},
        {"discarded": 1000},
        {"discarded": 1000},
        {"discarded": 7},
    )
    bridge.install(monkeypatch)
    code, out, err = _run("redrive", "svc", *ids)
    assert code == 0, err
    assert json.loads(out) == {"redriven": 2490}
    assert [len(body["taskIds"]) for _, body, _ in bridge.requests] == [1000, 1000, 500]
    assert [i for _, body, _ in bridge.requests for i in body["taskIds"]] == ids
    code, out, err = _run("discard", "svc", *ids)
    assert code == 0, err
    assert json.loads(out) == {"discarded": 2007}
    assert [len(body["taskIds"]) for _, body, _ in bridge.requests[3:]] == [1000, 1000, 500]


def test_a_named_discard_that_fails_part_way_says_what_the_earlier_requests_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [f"00000000-0000-1000-8000-{n:012d}" for n in range(1500)]
    FakeBridge({"discarded": 1000}, RequestTimeout("no reply", waited_s=30.0)).install(monkeypatch)
    code, _, err = _run("discard", "svc", *ids)
    assert code == 1
    assert "the outcome is unknown" in err and "1000 discarded by the 1 request(s) answered before it" in err


def test_a_cancel_with_no_answer_says_the_outcome_is_unknown_and_how_to_learn_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It asked "is a bridge consuming?", and a re-run printed false for the task it had cancelled."""
    task = "00000000-0000-1000-8000-000000000001"
    bridge = FakeBridge(RequestTimeout("no reply", waited_s=10.0))
    bridge.install(monkeypatch)
    code, _, err = _run("cancel", "svc", task)
    assert code == 1
    assert "the outcome is unknown" in err and "is a bridge consuming" not in err
    assert f"cancel: cancelling task {task} of service 'svc'" in err
    sent_id = bridge.message_ids[0]
    assert sent_id is not None
    assert f"run it again with --request-id {sent_id}" in err

    again = FakeBridge(True)
    again.install(monkeypatch)
    code, out, err = _run("cancel", "svc", task, "--request-id", sent_id)
    assert code == 0, err
    assert out.strip() == "true"
    assert again.message_ids == [sent_id]


def test_an_add_with_no_answer_names_the_key_that_adds_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --message-id a re-run after no answer added the task a second time."""
    bridge = FakeBridge(RequestTimeout("no reply", waited_s=10.0))
    bridge.install(monkeypatch)
    code, _, err = _run("add", "svc", '{"n": 1}')
    assert code == 1
    assert "the outcome is unknown" in err
    key = bridge.message_ids[0]
    assert key is not None and f"run it again with --message-id {key}" in err
    again = FakeBridge("00000000-0000-1000-8000-000000000009")
    again.install(monkeypatch)
    code, out, err = _run("add", "svc", '{"n": 1}', "--message-id", key)
    assert out.strip() == "00000000-0000-1000-8000-000000000009"
    assert code == 0, err
    assert again.message_ids == [key]


def test_a_bad_amqp_url_never_shows_part_of_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """urlsplit's error quoted the "port", the password's first part; a password of digits before
    an unencoded '#' even parsed, as host and port."""
    FakeBridge().install(monkeypatch)
    for url in (
        "amqp://ops:s3cr#et-pass@rabbit:5672/",
        "amqp://ops:top/secret@rabbit/",
        "amqp://ops:4711#xYz@rabbit.prod/prod",
    ):
        code, _, err = _run("parked", "svc", "--amqp-url", url)
        assert code == 2, err
        for part in ("s3cr", "top", "4711", "xYz", "secret"):
            assert part not in err, (url, err)
        assert "percent-encode" in err


def test_bridge_amqp_url_with_an_unencoded_password_is_refused_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.config import ConfigError, load_settings

    monkeypatch.setenv("BRIDGE_AMQP_URL", "amqp://ops:4711#xYz@rabbit.prod/prod")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "percent-encode" in str(raised.value)
    assert "4711" not in str(raised.value) and "xYz" not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://bridge:Xy@k9/Qr@rabbit:5672/",  # '@' and '/' in the password: host k9, vhost Qr@rabbit
        "amqp://svc@corp:4711#x@rabbit/",  # '@' in the user: host corp, port 4711
        "amqp://u:p@ss@host/",
        "amqp://u:4711?b@rabbit/",
    ],
)
def test_a_password_with_an_unencoded_at_is_refused_too(url: str) -> None:
    """The first check missed a user or password holding an '@' before its '/', '?' or '#': it
    loaded, and `config`, the connect errors and `permissions` showed most of the password as a
    host or a vhost (found by the re-review, 2026-12-07)."""
    from bridge.config import password_unencoded

    assert password_unencoded(url)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:5672/",
        "amqp://rabbit/?name=bridge@pod-7",
        "amqps://rabbit:5671/?auth=external&certfile=/certs/bridge@prod.pem&keyfile=/certs/k.pem",
        "amqp://u:p@[::1]:5672/vh?heartbeat=30",
        "amqp://u:p%23x%40y@h/%2F",
        "amqp://svc%40corp:pw@h/",
    ],
)
def test_urls_with_nothing_to_leak_are_taken(url: str) -> None:
    from bridge.config import password_unencoded

    assert not password_unencoded(url)


def test_the_resume_command_runs_for_a_service_that_begins_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Printed as `redrive -svc --all ...`, click read the service as an unknown option (the
    re-review, 2026-12-07): the command printed is run here, as printed."""
    import shlex

    FakeBridge(
        {"redriven": 1, "parkedBefore": PARKED_BOUND, "after": AFTER_ID}, RequestTimeout("no reply", waited_s=3.0)
    ).install(monkeypatch)
    code, _, err = _run("redrive", "--all", "--timeout", "1234567", "--", "-svc")
    assert code == 1
    printed = err.split("to go on: ", 1)[1].strip()
    argv = shlex.split(printed)
    assert argv[:2] == ["queue-bridge", "redrive"] and "1234567.0" in argv
    resumed = FakeBridge({"redriven": 0, "parkedBefore": PARKED_BOUND})
    resumed.install(monkeypatch)
    code, out, err = _run(*argv[1:])
    assert json.loads(out) == {"redriven": 0}
    assert code == 0, err
    assert resumed.requests[0][1] == {"serviceId": "-svc", "all": True, "parkedBefore": PARKED_BOUND, "after": AFTER_ID}


def test_a_purge_that_stopped_short_exits_3_not_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """It printed "more": true and exited 0, as a complete purge does: `purge --yes && deploy`
    went on with ready tasks still queued (found by review, 2026-12-07)."""
    FakeBridge({"purged": 5, "more": True}, {"purged": 0, "more": True}).install(monkeypatch)
    code, out, err = _run("purge", "svc", "--yes")
    assert code == 3, (code, err)
    assert json.loads(out) == {"purged": 5, "more": True} and "stopped short" in err


def _parked_doc(n: int) -> dict[str, object]:
    return {
        "id": f"00000000-0000-1000-8000-{n:012d}",
        "deliveries": 1,
        "reason": "failed",
        "lastError": None,
        "parkedAt": "2026-12-07T00:00:00.000Z",
        "addedAt": "2026-12-07T00:00:00.000Z",
        "hasToken": False,
    }


def test_a_parked_list_cut_at_its_limit_says_more_are_parked_and_exits_3(monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of --limit tasks gave no sign it was cut: a triage script filtering it found nothing
    past the first --limit and exited 0 on every run (found by review, 2026-12-07). The CLI asks
    for one more than its limit: exactly --limit parked tasks is a complete list (exit 0)."""
    bridge = FakeBridge({"tasks": [_parked_doc(n) for n in range(3)], "after": None})
    bridge.install(monkeypatch)
    code, out, err = _run("parked", "svc", "--limit", "2")
    doc = json.loads(out)
    assert code == 3 and doc["more"] is True and len(doc["tasks"]) == 2 and "more may be parked" in err
    assert bridge.requests[0][1]["limit"] == 3, bridge.requests
    # Where the next page starts: past the last task listed (not the one asked for beyond it).
    assert doc["after"] == doc["tasks"][-1]["id"] and f"--after {doc['after']}" in err
    FakeBridge({"tasks": [_parked_doc(n) for n in range(2)], "after": None}).install(monkeypatch)
    code, out, _ = _run("parked", "svc", "--limit", "2")
    assert code == 0 and "more" not in json.loads(out) and len(json.loads(out)["tasks"]) == 2


def test_a_parked_list_goes_on_where_the_bridge_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A page the bridge cut short (its share of the index read, or the contract's 1,000 listed)
    gives its ``after``, printed for --after; --after is sent as the request's ``after`` (1.11).
    Before, a listing of 1,000 could not go on: the CLI said "more" and nothing listed them."""
    bridge = FakeBridge({"tasks": [_parked_doc(n) for n in range(2)], "after": AFTER_ID})
    bridge.install(monkeypatch)
    code, out, err = _run("parked", "svc", "--limit", "1000")
    assert code == 3 and json.loads(out)["after"] == AFTER_ID and json.loads(out)["more"] is True, (out, err)
    nxt = FakeBridge({"tasks": [_parked_doc(7)], "after": None})
    nxt.install(monkeypatch)
    code, out, _ = _run("parked", "svc", "--after", AFTER_ID)
    assert code == 0 and json.loads(out) == {"tasks": [_parked_doc(7)]}
    assert nxt.requests[0][1] == {"serviceId": "svc", "limit": 101, "after": AFTER_ID}
    code, _, err = _run("parked", "svc", "--after", "nope")
    assert code == 2 and "--after" in err


def test_a_bridge_that_cannot_page_is_never_read_as_a_next_page_or_a_complete_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bridge before contract 1.11 ignores ``after`` and answers the first page again, with no
    ``after`` of its own (found by review, 2026-12-07): sent --after, the CLI printed page one
    again as the next (a script paging until exit 0 looped for ever), and 1,000 tasks from it
    read as every parked task (exit 0). Such a reply is known by its missing ``after``."""
    old = FakeBridge({"tasks": [_parked_doc(n) for n in range(1000)]})
    old.install(monkeypatch)
    code, out, err = _run("parked", "svc", "--limit", "1000")
    assert code == 3 and json.loads(out)["more"] is True and "after" not in json.loads(out), err
    assert "older than contract 1.11" in err
    FakeBridge({"tasks": [_parked_doc(n) for n in range(3)]}).install(monkeypatch)
    code, out, err = _run("parked", "svc", "--limit", "2")
    assert code == 3 and "after" not in json.loads(out), "an after the bridge cannot go on from"
    FakeBridge({"tasks": [_parked_doc(n) for n in range(3)]}).install(monkeypatch)
    code, out, err = _run("parked", "svc", "--after", AFTER_ID)
    assert code == 1 and "older than contract 1.11" in err and not out.strip(), (code, out, err)
    FakeBridge({"tasks": [_parked_doc(n) for n in range(2)]}).install(monkeypatch)
    code, out, _ = _run("parked", "svc")
    assert code == 0 and len(json.loads(out)["tasks"]) == 2  # a short list from it is complete
