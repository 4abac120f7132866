"""HttpKeyProvider (and CachingKeyProvider on top of it) against the real in-process KeyServer."""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from bridge.crypto import (
    BadKeyAnswer,
    CachingKeyProvider,
    HttpKeyProvider,
    KeyUnavailable,
    OwnerKey,
    UnknownKey,
    UnknownOwner,
    open_sealed,
    seal,
)
from bridge.crypto.keyserver import MAX_RESPONSE_BYTES
from tests.keyserver import KeyServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def server() -> AsyncIterator[KeyServer]:
    async with KeyServer() as srv:
        yield srv


class FakeClock:
    """Monotonic seconds that move only when a test says so (the provider's failure backoff)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def provider(server: KeyServer, clock: FakeClock) -> AsyncIterator[HttpKeyProvider]:
    prov = HttpKeyProvider(server.url, clock=clock)
    yield prov
    await prov.close()


async def test_current_and_by_id(server: KeyServer, provider: HttpKeyProvider) -> None:
    key_id = server.add_owner("acme")
    key = await provider.current_key("acme")
    assert key == OwnerKey(owner="acme", key_id=key_id, secret=server.secret("acme", key_id))
    assert await provider.key_by_id("acme", key_id) == key
    assert server.paths == ["/owners/acme/keys/current", f"/owners/acme/keys/{key_id}"]


async def test_rotation(server: KeyServer, provider: HttpKeyProvider) -> None:
    old_id = server.add_owner("acme")
    old = await provider.current_key("acme")
    sealed = seal(old, b"before rotation", service="svc", task_id="t1", field="value")
    new_id = server.rotate("acme")
    new = await provider.current_key("acme")
    assert new.key_id == new_id != old_id
    assert new.secret == server.secret("acme", new_id)
    # Old data is still readable through the id it names.
    by_id = await provider.key_by_id("acme", sealed.key_id)
    assert open_sealed(by_id, sealed, service="svc", task_id="t1", field="value") == b"before rotation"


async def test_unknown_owner(server: KeyServer, provider: HttpKeyProvider) -> None:
    server.add_owner("acme")
    with pytest.raises(UnknownOwner, match="nobody"):
        await provider.current_key("nobody")
    with pytest.raises(UnknownOwner, match="nobody"):
        await provider.key_by_id("nobody", "k1")


async def test_unknown_key(server: KeyServer, provider: HttpKeyProvider) -> None:
    old_id = server.add_owner("acme")
    with pytest.raises(UnknownKey, match="no-such-key"):
        await provider.key_by_id("acme", "no-such-key")
    server.rotate("acme")
    server.revoke("acme", old_id)
    with pytest.raises(UnknownKey, match=old_id):
        await provider.key_by_id("acme", old_id)


async def test_reserved_key_id_current_is_never_requested(server: KeyServer, provider: HttpKeyProvider) -> None:
    server.add_owner("acme")
    with pytest.raises(UnknownKey):
        await provider.key_by_id("acme", "current")
    assert server.requests == 0


async def test_owner_and_key_id_are_url_quoted(server: KeyServer, provider: HttpKeyProvider) -> None:
    owner = "team/a b?x=1#frag%2F.."
    key_id = server.add_owner(owner)
    server.add_owner("team")  # a naive client would hit /owners/team/...
    key = await provider.current_key(owner)
    assert key.owner == owner
    assert key.secret == server.secret(owner, key_id)
    for odd in (".", ".."):
        odd_id = server.add_owner(odd)
        assert (await provider.current_key(odd)).key_id == odd_id
    assert all(path.startswith("/owners/") and path.count("/") == 4 for path in server.paths)
    # Dot segments are percent-encoded so no proxy or server can normalise them away.
    assert "/owners/%2E/keys/current" in server.paths
    assert "/owners/%2E%2E/keys/current" in server.paths


async def test_a_name_that_is_not_unicode_text_is_unknown_and_never_requested(
    server: KeyServer, provider: HttpKeyProvider
) -> None:
    """A lone surrogate (undecodable bytes, surrogate-escaped) made quote() raise UnicodeEncodeError."""
    server.add_owner("acme")
    with pytest.raises(UnknownOwner):
        await provider.current_key("caf\udcff")
    with pytest.raises(UnknownKey):
        await provider.key_by_id("acme", "k\udcff")
    assert server.requests == 0


async def test_503_is_key_unavailable(server: KeyServer, provider: HttpKeyProvider, clock: FakeClock) -> None:
    server.add_owner("acme")
    server.fail = True
    with pytest.raises(KeyUnavailable, match="503"):
        await provider.current_key("acme")
    assert server.requests == 1  # HTTP errors are not retried
    server.fail = False
    clock.now += 10  # past the failure backoff
    assert (await provider.current_key("acme")).owner == "acme"  # transient: recovers


async def test_a_failing_server_is_not_asked_again_before_its_backoff(
    server: KeyServer, provider: HttpKeyProvider, clock: FakeClock
) -> None:
    """Issue 13.9: the client did not back off on failures."""
    server.add_owner("acme")
    server.fail = True
    delays = []
    for _ in range(6):
        with pytest.raises(KeyUnavailable, match="503"):
            await provider.current_key("acme")
        asked = server.requests
        with pytest.raises(KeyUnavailable, match="not asked again for"):
            await provider.current_key("acme")
        assert server.requests == asked, "asked during the backoff"
        # One owner failing: that owner is backed off (test below); the whole server once two are.
        wait = float(max(provider._retry_at, provider._owner_backoff.get("acme", (0, 0.0))[1]) - clock.now)
        delays.append(wait)
        clock.now += wait + 0.001
    assert delays[0] <= 0.2 and max(delays) <= 5.0 and delays[-1] >= 2.5  # exponential, capped, jittered
    server.fail = False
    assert (await provider.current_key("acme")).owner == "acme"
    assert provider._failures == 0 and not provider._owner_backoff


@pytest.mark.parametrize("status", [500, 503, 403])
async def test_an_error_answered_for_one_owner_backs_off_that_owner_only(
    server: KeyServer, provider: HttpKeyProvider, clock: FakeClock, status: int
) -> None:
    """The server answers an error for one owner only (its KMS key disabled, a per-tenant policy):
    one backoff for the whole server let that owner's constant retries reopen it at each end, and
    every other owner's lookup was refused meanwhile (found by review, 2026-12-06)."""
    for owner in ("broken", "healthy", "other"):
        server.add_owner(owner)
    assert (await provider.current_key("other")).owner == "other"  # the server serves others
    server.failing_owners["broken"] = status
    with pytest.raises(BadKeyAnswer, match=str(status)):  # that owner's trouble (the add retry lane)
        await provider.current_key("broken")
    asked = server.requests
    with pytest.raises(BadKeyAnswer, match="not asked again"):
        await provider.current_key("broken")
    assert server.requests == asked, "the failing owner was asked during its backoff"
    assert (await provider.current_key("healthy")).owner == "healthy"
    server.failing_owners.clear()
    clock.now += 10
    assert (await provider.current_key("broken")).owner == "broken"
    assert not provider._owner_backoff


@pytest.mark.parametrize("served_before", [False, True])
async def test_an_error_answered_while_no_other_owner_is_served_holds_the_adds_where_they_are(
    server: KeyServer, provider: HttpKeyProvider, clock: FakeClock, served_before: bool
) -> None:
    """A fleet of one owner, or a server failing for all: said to be the owner's trouble, every
    add went to the add retry lane and back, round and round, for the whole outage, instead of
    being held (its back-pressure). ``KeyUnavailable`` then (found by the session's re-review)."""
    for owner in ("a", "b"):
        server.add_owner(owner)
    if served_before:  # served long ago: no sign the server serves anyone now
        assert (await provider.current_key("b")).owner == "b"
        clock.now += 3_600
    server.fail = True
    for _ in range(3):
        with pytest.raises(KeyUnavailable) as failed:
            await provider.current_key("a")
        assert not isinstance(failed.value, BadKeyAnswer)
        clock.now += 10


async def test_a_broken_owner_first_on_a_new_bridge_does_not_turn_away_the_next_owner(
    server: KeyServer, provider: HttpKeyProvider, clock: FakeClock
) -> None:
    """A bridge just started (nothing served yet) met a broken owner's errors first: taken for the
    server's, each backed off the whole server, and the next owner's lookups were refused for as
    long as the broken owner's retries kept reopening it (found by the session's re-review)."""
    for owner in ("broken", *(f"next{i}" for i in range(5))):
        server.add_owner(owner)
    server.failing_owners["broken"] = 403
    for i in range(5):
        with pytest.raises(KeyUnavailable):
            await provider.current_key("broken")
        clock.now += 0.01  # another owner's first lookup right after
        assert (await provider.current_key(f"next{i}")).owner == f"next{i}"
        clock.now += 6


async def test_failing_owners_retries_are_held_to_a_budget_while_others_are_always_asked(
    server: KeyServer, provider: HttpKeyProvider, clock: FakeClock
) -> None:
    """A key server failing for everyone, owners' keys expiring one after the other: each owner
    backing off alone, the server got a retry from every failing owner every few seconds. Their
    retries share a budget a second; an owner not failing is asked at once."""
    owners = [f"o{i}" for i in range(100)]
    for owner in [*owners, "fine"]:
        server.add_owner(owner)
    server.failing_owners.update({o: 503 for o in owners})
    for owner in owners:  # each fails once: now all of them are failing
        with pytest.raises(KeyUnavailable):
            await provider.current_key(owner)
    clock.now += 10  # every owner's backoff over
    asked = server.requests
    for _ in range(10):  # ten rounds of all 100 retrying, over one second
        for owner in owners:
            with pytest.raises(KeyUnavailable):
                await provider.current_key(owner)
        clock.now += 0.1
    retried = server.requests - asked
    assert retried <= 4 + 2 * 1.0 + 1, f"{retried} retries of failing owners in one second"
    assert (await provider.current_key("fine")).owner == "fine"


async def test_two_owners_failing_do_not_turn_away_an_owner_the_server_serves(
    server: KeyServer, provider: HttpKeyProvider, clock: FakeClock
) -> None:
    """Two broken owners asking all the time, each failure escalated to a backoff of the whole
    server: a healthy owner's cache misses were refused (19-83% of them in the re-review's
    simulation; found by the session's re-review, 2026-12-06)."""
    for owner in ("bad0", "bad1", *(f"good{i}" for i in range(20))):
        server.add_owner(owner)
    assert (await provider.current_key("good0")).owner == "good0"
    server.failing_owners.update({"bad0": 403, "bad1": 500})
    refused = 0
    for step in range(200):
        clock.now += 0.25
        for bad in ("bad0", "bad1"):
            with pytest.raises(BadKeyAnswer):
                await provider.current_key(bad)
        if step % 10 == 0:
            try:
                await provider.current_key(f"good{step % 20}")
            except KeyUnavailable:
                refused += 1
    assert refused == 0, f"{refused} of 20 lookups of healthy owners refused"


async def test_an_oversized_response_is_refused(server: KeyServer, provider: HttpKeyProvider) -> None:
    server.add_owner("acme")
    server.padding = 200_000  # a key server gone wrong, or not a key server
    with pytest.raises(KeyUnavailable, match="exceeds"):
        await provider.current_key("acme")


def test_keys_are_never_fetched_over_plain_http_from_a_remote_host_unless_allowed() -> None:
    """The answers are the owners' keys: over plain http:// to another host they go in clear,
    token or not (a provider without a token was accepted: "nothing to leak")."""
    for token in ("t", None):
        with pytest.raises(ValueError, match="https"):
            HttpKeyProvider("http://keys.example.com", token=token)
        HttpKeyProvider("https://keys.example.com", token=token)
        HttpKeyProvider("http://127.0.0.1:8089", token=token)  # loopback: allowed (a warning with a token)
        HttpKeyProvider("http://keys.example.com", token=token, allow_plain_http=True)  # the mesh encrypts


def test_the_providers_url_and_repr_do_not_show_its_password() -> None:
    provider = HttpKeyProvider("https://svc:secret@keys.example.com/v1")
    assert "secret" not in provider.base_url and "secret" not in repr(provider)
    assert provider.base_url.startswith("https://svc:") and provider.base_url.endswith("@keys.example.com/v1")


def test_a_url_with_a_query_is_refused_and_shown_without_its_values() -> None:
    """A key server URL may carry its token as a query parameter: `queue-bridge config`, the
    provider's repr and its logs showed it (only a basic-auth password was masked; found by
    review, 2026-12-06)."""
    from bridge.config import Settings

    url = "https://keys.example.com/v1?token=s3cr3t-value&region=eu"
    with pytest.raises(ValueError, match="no query") as refused:  # its paths go after the base
        HttpKeyProvider(url)
    assert "s3cr3t-value" not in str(refused.value)
    shown = Settings(key_server_url=url).masked()["BRIDGE_KEY_SERVER_URL"]
    assert "s3cr3t-value" not in shown and shown.startswith("https://keys.example.com/v1?token="), shown


async def test_server_stopped_is_key_unavailable(server: KeyServer, provider: HttpKeyProvider) -> None:
    server.add_owner("acme")
    await provider.current_key("acme")  # a keep-alive connection now exists
    await server.stop()
    with pytest.raises(KeyUnavailable, match="unreachable"):
        await provider.current_key("acme")


async def test_nothing_listening_is_key_unavailable() -> None:
    with socket.socket() as sock:  # find a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prov = HttpKeyProvider(f"http://127.0.0.1:{port}", timeout=1.0)
    try:
        with pytest.raises(KeyUnavailable, match="unreachable"):
            await prov.current_key("acme")
    finally:
        await prov.close()


async def test_timeout_is_key_unavailable(server: KeyServer) -> None:
    server.add_owner("acme")
    server.delay = 1.0
    prov = HttpKeyProvider(server.url, timeout=0.2)
    try:
        with anyio.fail_after(5):
            with pytest.raises(KeyUnavailable, match="timed out"):
                await prov.current_key("acme")
    finally:
        await prov.close()
    assert server.requests == 1  # timeouts are not retried


async def test_a_timeout_is_the_servers_when_nobody_was_answered_meanwhile_else_the_owners(
    server: KeyServer,
) -> None:
    """A key server away for everyone (nobody answered while the lookup waited) is backed off as a
    whole, as before; one slow for one owner while it answers others backs off that owner only."""
    for owner in ("acme", "globex", "initech"):
        server.add_owner(owner)
    prov = HttpKeyProvider(server.url, timeout=0.3)
    try:
        with anyio.fail_after(10):
            server.delay = 1.0  # away for everyone
            with pytest.raises(KeyUnavailable, match="timed out"):
                await prov.current_key("acme")
            server.delay = 0.0
            with pytest.raises(KeyUnavailable, match="not asked again"):
                await prov.current_key("globex")  # the whole server is backed off
            prov._retry_at = 0.0  # the backoff's end
            await prov.current_key("globex")
            server.slow_owners["acme"] = 1.0  # slow for one owner; the others answered meanwhile
            async with anyio.create_task_group() as tg:

                async def others() -> None:
                    for _ in range(5):
                        await prov.current_key("initech")
                        await anyio.sleep(0.05)

                tg.start_soon(others)
                with pytest.raises(KeyUnavailable, match="timed out"):
                    await prov.current_key("acme")
            await prov.current_key("globex")  # not backed off: only acme is
            with pytest.raises(KeyUnavailable, match="not asked again"):
                await prov.current_key("acme")
    finally:
        await prov.close()


def _dropping_handler(drops: int, secret: bytes) -> tuple[Handler, list[int]]:
    """A handler that kills the first ``drops`` connections without answering, then serves a key."""
    attempts = [0]

    async def handler(request: web.Request) -> web.StreamResponse:
        attempts[0] += 1
        if attempts[0] <= drops:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return web.json_response({"id": "k1", "key": base64.b64encode(secret).decode()})

    return handler, attempts


async def test_retries_after_connection_error() -> None:
    # aiohttp itself re-sends an idempotent request once when the connection drops; the provider
    # retries once more on top.  Two dropped connections are therefore survived -- without the
    # provider's own retry this raises KeyUnavailable.
    secret = b"\x05" * 32
    handler, attempts = _dropping_handler(2, secret)
    async with _custom_server(handler) as url:
        prov = HttpKeyProvider(url)
        try:
            key = await prov.key_by_id("acme", "k1")
        finally:
            await prov.close()
    assert key.secret == secret
    assert attempts[0] == 3


async def test_retry_is_bounded() -> None:
    handler, attempts = _dropping_handler(1000, b"\x05" * 32)
    async with _custom_server(handler) as url:
        prov = HttpKeyProvider(url)
        try:
            with pytest.raises(KeyUnavailable, match="unreachable"):
                await prov.key_by_id("acme", "k1")
        finally:
            await prov.close()
    assert 2 <= attempts[0] <= 4  # one retry by the provider (x aiohttp's own single re-send)


async def test_bearer_token_required() -> None:
    async with KeyServer(token="t0ps3cret") as server:
        key_id = server.add_owner("acme")
        anonymous = HttpKeyProvider(server.url)
        wrong = HttpKeyProvider(server.url, token="guess")
        right = HttpKeyProvider(server.url, token="t0ps3cret")
        try:
            with pytest.raises(KeyUnavailable, match="401"):
                await anonymous.current_key("acme")
            with pytest.raises(KeyUnavailable, match="401"):
                await wrong.current_key("acme")
            assert (await right.current_key("acme")).key_id == key_id
            assert "t0ps3cret" not in repr(right)
        finally:
            for prov in (anonymous, wrong, right):
                await prov.close()


async def test_a_token_read_from_a_file_with_its_newline_is_sent_without_it() -> None:
    """A token mounted from a Secret made of a file written by ``echo`` ends in a newline: aiohttp
    refused the header at every lookup (a ValueError, answered ``internal``: every add
    dead-lettered) while the bridge said ready. Surrounding whitespace is no part of a token."""
    async with KeyServer(token="t0ps3cret") as server:
        key_id = server.add_owner("acme")
        provider = HttpKeyProvider(server.url, token="t0ps3cret\n")
        try:
            assert (await provider.current_key("acme")).key_id == key_id
        finally:
            await provider.close()


def test_a_token_with_a_control_character_inside_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="token"):
        HttpKeyProvider("https://keys.example.com", token="t0p\ns3cret")
    with pytest.raises(ValueError, match="token"):
        HttpKeyProvider("https://keys.example.com", token=" \n")


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (200, b"not json", "not JSON"),
        (200, b"[]", "not a JSON object"),
        (200, b'{"key": "AAAA"}', "missing 'id'"),
        (200, b'{"id": "k1"}', "missing 'key'"),
        (200, b'{"id": "k1", "key": "***"}', "not base64"),
        (200, b'{"id": "k1", "key": "AAAA"}', "3 bytes, expected 32"),
        (200, b'{"id": "other", "key": "' + base64.b64encode(b"x" * 32) + b'"}', "names key 'other'"),
        (404, b"404: Not Found", "404 without an error code"),
        (500, b"boom", "HTTP 500"),
        (302, b"", "HTTP 302"),
    ],
)
async def test_malformed_answers_are_key_unavailable(status: int, body: bytes, error: str) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Location": "http://127.0.0.1:1/"} if status == 302 else None
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")

    async with _custom_server(handler) as url:
        prov = HttpKeyProvider(url)
        try:
            with pytest.raises(KeyUnavailable, match=error) as info:
                await prov.key_by_id("acme", "k1")
        finally:
            await prov.close()
    assert "eHh4" not in str(info.value)  # the body (key material) is never echoed


async def test_a_current_key_named_current_is_refused() -> None:
    """The id "current" names the path of the current key, never a key: a server that echoed it as its
    key's id had every add sealed under an id no lookup by id could answer (the tasks and their
    results unopenable once the cache let it go)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = b'{"id": "current", "key": "' + base64.b64encode(b"x" * 32) + b'"}'
        return web.Response(status=200, body=body, content_type="application/json")

    async with _custom_server(handler) as url:
        prov = HttpKeyProvider(url)
        try:
            with pytest.raises(KeyUnavailable, match="'current' is not a key id"):
                await prov.current_key("acme")
        finally:
            await prov.close()


async def test_closed_provider_is_unavailable(server: KeyServer) -> None:
    server.add_owner("acme")
    prov = HttpKeyProvider(server.url)
    await prov.current_key("acme")
    await prov.close()
    await prov.close()  # idempotent
    with pytest.raises(KeyUnavailable, match="closed"):
        await prov.current_key("acme")


def test_rejects_bad_base_url() -> None:
    with pytest.raises(ValueError, match="http"):
        HttpKeyProvider("ftp://example.org")
    with pytest.raises(ValueError, match="http"):
        HttpKeyProvider("localhost:8089")


async def test_base_url_with_trailing_slash(server: KeyServer) -> None:
    key_id = server.add_owner("acme")
    prov = HttpKeyProvider(server.url + "/")
    try:
        assert (await prov.current_key("acme")).key_id == key_id
    finally:
        await prov.close()


# -- CachingKeyProvider over the real server -----------------------------------------------------


async def test_concurrent_current_key_calls_are_coalesced(server: KeyServer, provider: HttpKeyProvider) -> None:
    key_id = server.add_owner("acme")
    server.delay = 0.05  # keep the single upstream request in flight while the others arrive
    cache = CachingKeyProvider(provider)
    results: list[OwnerKey] = []

    async def get() -> None:
        results.append(await cache.current_key("acme"))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(get)
    assert server.requests == 1
    assert len(results) == 50
    assert {key.key_id for key in results} == {key_id}
    assert (cache.misses, cache.coalesced, cache.hits) == (1, 49, 0)

    # Cached now: no further request, and the by-id slot was filled too.
    await cache.current_key("acme")
    await cache.key_by_id("acme", key_id)
    assert server.requests == 1
    assert cache.hits == 2


async def test_coalesced_by_id_and_unavailable(server: KeyServer, provider: HttpKeyProvider, clock: FakeClock) -> None:
    key_id = server.add_owner("acme")
    server.delay = 0.05
    server.fail = True
    cache = CachingKeyProvider(provider)
    failures: list[KeyUnavailable] = []

    async def get() -> None:
        try:
            await cache.key_by_id("acme", key_id)
        except KeyUnavailable as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(get)
    assert len(failures) == 10
    assert server.requests == 1
    server.fail = False  # errors are not cached: the next call after the backoff succeeds
    clock.now += 10
    assert (await cache.key_by_id("acme", key_id)).key_id == key_id
    assert server.requests == 2


async def test_caching_expiry_against_server(server: KeyServer, provider: HttpKeyProvider) -> None:
    now = [0.0]
    server.add_owner("acme")
    cache = CachingKeyProvider(provider, max_age=30, clock=lambda: now[0])
    first = await cache.current_key("acme")
    new_id = server.rotate("acme")
    assert (await cache.current_key("acme")).key_id == first.key_id
    assert server.requests == 1
    now[0] = 31.0
    assert (await cache.current_key("acme")).key_id == new_id
    assert server.requests == 2


# -- helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"null", b"[]", b"<html>proxy</html>", b"x" * (MAX_RESPONSE_BYTES + 1)])
async def test_a_malformed_answer_for_one_owner_backs_off_that_owner_only(body: bytes) -> None:
    """A 200 whose body is not a JSON object (or too large) for one owner's entry, while the server
    serves the others: it backed the whole server off, and every other owner's lookups were
    turned away for up to 5 s at each of that owner's retries (found by review, 2026-12-07)."""
    good = base64.b64encode(b"k" * 32).decode()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/owners/broken/"):
            return web.Response(status=200, body=body, content_type="application/json")
        return web.json_response({"id": "k1", "key": good})

    async with _custom_server(handler) as url:
        prov = HttpKeyProvider(url)
        try:
            await prov.current_key("acme")  # the server answers others well
            with pytest.raises(KeyUnavailable, match=r"malformed|exceeds"):
                await prov.current_key("broken")
            assert (await prov.current_key("globex")).key_id == "k1", "every owner turned away"
            with pytest.raises(KeyUnavailable, match="not asked again"):
                await prov.current_key("broken")  # that owner backed off
        finally:
            await prov.close()


@pytest.mark.parametrize("body", [b"null", b"<html>proxy</html>"])
async def test_a_malformed_answer_while_nobody_else_is_served_backs_the_server_off(body: bytes) -> None:
    """The same answer with no owner served lately (a proxy answering its page for everyone): the
    server's trouble, backed off as a whole, as before."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, body=body, content_type="application/json")

    async with _custom_server(handler) as url:
        prov = HttpKeyProvider(url)
        try:
            with pytest.raises(KeyUnavailable, match="malformed"):
                await prov.current_key("acme")
            with pytest.raises(KeyUnavailable, match="key server failing: not asked again"):
                await prov.current_key("globex")
        finally:
            await prov.close()


@asynccontextmanager
async def _custom_server(handler: Handler) -> AsyncIterator[str]:
    """Serve one handler for every GET path on a free port; yield the base URL."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _raw_server(answer: bytes) -> AsyncIterator[int]:
    """A socket that answers every request with these bytes: HTTP no client library accepts."""
    import asyncio

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ],
    ids=["oversized header", "two content lengths"],
)
@pytest.mark.parametrize("by_token", [True, False], ids=["token", "password in the URL"])
async def test_a_malformed_answer_never_logs_the_key_servers_credentials(
    answer: bytes, by_token: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's error for a malformed answer carries the request's headers: logged with %r, the
    bridge wrote the token (or the URL's basic-auth password, base64) to its log on every failed
    lookup, fleet-wide; whoever reads the logs could then read every owner's key. Found by review,
    2026-12-06."""
    import traceback

    token, password = "canary-token-1f2e", "canary-pass-9d8c"
    basic = base64.b64encode(f"kb:{password}".encode()).decode()
    async with _raw_server(answer) as port:
        if by_token:
            prov = HttpKeyProvider(f"http://127.0.0.1:{port}", token=token)
        else:
            prov = HttpKeyProvider(f"http://kb:{password}@127.0.0.1:{port}")
        try:
            with caplog.at_level("DEBUG"), pytest.raises(KeyUnavailable) as raised:
                await prov.key_by_id("acme", "k1")
        finally:
            await prov.close()
    # What reaches the log, and what a caller logging the error with its traceback would write.
    written = caplog.text + "".join(traceback.format_exception(raised.value))
    assert "key server request failed" in caplog.text
    for secret in (token, password, basic, "Authorization"):
        assert secret not in written


def test_a_token_and_credentials_in_the_url_are_refused_at_start() -> None:
    """aiohttp refuses an Authorization header beside a URL's credentials at every request: each
    lookup raised a ValueError (answered ``internal``, every add refused) instead of one clear
    error at start. Found by review, 2026-12-06."""
    with pytest.raises(ValueError, match="not both"):
        HttpKeyProvider("https://kb:pw@keys.example", token="t")
