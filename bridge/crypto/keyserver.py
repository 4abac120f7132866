"""A :class:`~bridge.crypto.keys.KeyProvider` that asks a remote key server over HTTP.

Protocol (all bodies JSON; ``{owner}`` and ``{key_id}`` are percent-encoded path segments)::

    GET {base}/owners/{owner}/keys/current     the owner's current key
    GET {base}/owners/{owner}/keys/{key_id}    a specific key of the owner

    200 {"id": "<key id>", "key": "<base64 of 32 bytes>"}
    404 {"error": "unknown_owner"}             the server has no keys for this owner
    404 {"error": "unknown_key"}               the owner exists, the key id does not

When a token is configured every request carries ``Authorization: Bearer <token>``.  The key id
``current`` is therefore reserved and can never name a specific key.

Error mapping:

* connection errors, timeouts (``timeout`` seconds per attempt), 5xx, 401/403, any other status,
  a 404 without one of the two error codes (wrong base URL?) and malformed bodies raise
  :class:`~bridge.crypto.errors.KeyUnavailable` -- none of these is the owner's fault;
* 404 ``unknown_owner`` raises :class:`~bridge.crypto.errors.UnknownOwner`;
* 404 ``unknown_key`` raises :class:`~bridge.crypto.errors.UnknownKey`.

A request that fails with a connection error (refused, reset, server disconnected -- typically a
stale keep-alive connection) is retried once; timeouts are not retried.  Wrap the provider in
:class:`~bridge.crypto.keys.CachingKeyProvider` for production use.

Hardening: a response is read up to ``MAX_RESPONSE_BYTES`` (a key is a few dozen bytes); after a
failure of the server (unreachable, timeout) it is not asked again for a backoff period
(exponential, ``backoff_base`` doubling up to ``backoff_cap`` seconds, with jitter): callers get
``KeyUnavailable`` at once instead of piling requests on a struggling server. An error status it
answers (5xx, refused credentials, a 404 without a code) backs off the owner asked about only,
and failing owners' retries share a budget a second (``BadKeyAnswer``, that owner's trouble, while
the server answers other owners well); and a
bearer token is never sent over plain ``http://`` except to a loopback address.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from bridge.crypto.errors import BadKeyAnswer, KeyUnavailable, UnknownKey, UnknownOwner
from bridge.crypto.keys import KEY_SIZE, OwnerKey

__all__ = ["HttpKeyProvider"]

_CURRENT = "current"
MAX_RESPONSE_BYTES = 64 * 1024
MAX_OWNERS_BACKED_OFF = 4096  # owners whose answered errors are remembered (each a few dozen bytes)
# An error status answered for one owner is that owner's trouble while another owner was served
# within this (the keys are cached 300 s: a fleet of many owners misses some every few seconds).
SERVED_LATELY_S = 600.0
SERVED_OWNERS_KEPT = 4  # the owners served last (one other than the failing one is enough)
# Lookups of owners already failing, a second per bridge (and at once): an owner not failing is
# always asked. 100 bridges ask a restarting key server 200 times a second at most, not once per
# owner whose key expired meanwhile.
FAILING_RETRIES_PER_S = 2.0
FAILING_RETRIES_BURST = 4
log = logging.getLogger("bridge.keyserver")


class _TimedOut(KeyUnavailable):
    """The key server did not answer a lookup in time."""


class _Malformed(KeyUnavailable):
    """A 200 whose body is not a JSON object, or too large: the server's trouble (a proxy's page
    for every request) unless it served other owners lately, then this owner's entry's."""


class _AnsweredError(KeyUnavailable):
    """An error status the server answered about one owner's key (not a transport failure):
    ``stale_ok`` for an error of the server's own (5xx), not for a refusal (401/403, a 404
    without its code)."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _segment(value: str) -> str:
    """Percent-encode one path segment, including '/' and the dot segments '.' and '..'."""
    quoted = quote(value, safe="")
    if quoted in {".", ".."}:
        quoted = quoted.replace(".", "%2E")
    return quoted


def _path(owner: str, key_id: str | None) -> str:
    """``{owner}/keys/{key_id}``, percent-encoded; ``UnknownOwner``/``UnknownKey`` for a name with no
    UTF-8 form (lone surrogates: undecodable bytes, surrogate-escaped), which no key server can know
    (``quote`` would raise ``UnicodeEncodeError``)."""
    try:
        owner_part = _segment(owner)
    except UnicodeEncodeError:
        raise UnknownOwner(f"owner {owner!r} is not valid Unicode text") from None
    try:
        key_part = _CURRENT if key_id is None else _segment(key_id)
    except UnicodeEncodeError:
        raise UnknownKey(f"owner {owner!r} has no key {key_id!r} (not valid Unicode text)") from None
    return f"{owner_part}/keys/{key_part}"


class HttpKeyProvider:
    """Key provider speaking the HTTP protocol described in this module's docstring.

    One :class:`aiohttp.ClientSession` is created lazily on first use (inside the running event
    loop) and closed by :meth:`close`; after ``close`` every call raises ``KeyUnavailable``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        allow_plain_http: bool = False,
        timeout: float = 2.0,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in {"http", "https"} or not url.host:
            # The URL itself is not repeated: it may carry basic-auth credentials.
            raise ValueError("key server URL must be http(s)://host[:port][/prefix]")
        if url.query_string or url.fragment:
            # The paths are appended to the base (``{base}/owners/...``): a query there broke every
            # lookup, and a token in it was shown wherever the URL is.
            raise ValueError("key server URL takes no query or fragment (a token goes in BRIDGE_KEY_SERVER_TOKEN)")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if url.scheme == "http" and not _loopback(url.host):
            # Its answers are the owners' keys, in clear: whoever reads the path reads every key,
            # and whoever answers on it chooses the key new tasks are sealed with. A token or
            # basic-auth credentials would go in clear too. Allowed only where the network itself
            # encrypts and authenticates (a service mesh's mTLS), said explicitly.
            if not allow_plain_http:
                raise ValueError(
                    "refusing plain http:// to a remote key server: it serves the owners' keys in clear; use "
                    "https, or set BRIDGE_KEY_SERVER_ALLOW_PLAIN_HTTP=true where the network encrypts (mTLS mesh)"
                )
            log.warning("the key server is reached over plain http:// (allowed by BRIDGE_KEY_SERVER_ALLOW_PLAIN_HTTP)")
        if token is not None:
            # A token read from a file (a Secret made with ``--from-file`` of a file ``echo`` wrote)
            # ends in a newline: aiohttp refuses such a header at every lookup, while the bridge
            # says ready. Surrounding whitespace is no part of a token; what is left must be one.
            token = token.strip()
            if not token or any(ord(c) < 0x20 or ord(c) == 0x7F for c in token):
                raise ValueError("the key server token is empty or has a control character inside it")
        if token is not None and (url.user or url.password):
            # aiohttp refuses both at every request (a ValueError each lookup, answered
            # ``internal``): refused here, at start, with the reason.
            raise ValueError("give the key server a token or basic-auth credentials in its URL, not both")
        if url.scheme == "http" and _loopback(url.host) and token is not None:
            log.warning("the key server token goes over plain http:// (loopback only): use https in production")
        self._backoff = (backoff_base, backoff_cap)
        self._clock = clock
        self._failures = 0
        self._retry_at = 0.0
        # An error the server answered about one owner (a 5xx, 401/403 for that owner's path: its
        # KMS key disabled, a per-tenant policy) backs off that owner only: one backoff for the
        # whole server let the broken owner's constant retries reopen it at each end, and every
        # other owner's cache misses were turned away (``unavailable``) for as long as it lasted.
        # Said to be that owner's trouble (``BadKeyAnswer``) while the server answers another owner
        # well (within ``SERVED_LATELY_S``); with no other owner served lately (a fleet of one
        # owner, a server failing for all) the adds wait where they are (their back-pressure), not
        # in the add retry lane.
        # failures, retry at, whether a cached key may stand in meanwhile (not after a refusal)
        self._owner_backoff: OrderedDict[str, tuple[int, float, bool]] = OrderedDict()
        self._served_lately: OrderedDict[str, float] = OrderedDict()  # owner -> when last served
        self._retry_tokens = float(FAILING_RETRIES_BURST)
        self._tokens_at = clock()
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def base_url(self) -> str:
        """The base URL, its basic-auth password masked (it can read every key)."""
        url = URL(self._base)
        return str(url.with_password("***")) if url.password else self._base

    def __repr__(self) -> str:  # never show the token nor the URL's password
        return f"HttpKeyProvider({self.base_url!r}, token={'set' if self._token else 'none'})"

    async def current_key(self, owner: str) -> OwnerKey:
        return await self._fetch(owner, None)

    async def key_by_id(self, owner: str, key_id: str) -> OwnerKey:
        if not key_id or key_id == _CURRENT:
            raise UnknownKey(f"owner {owner!r} has no key {key_id!r} (reserved or empty key id)")
        return await self._fetch(owner, key_id)

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- internals ---------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise KeyUnavailable("HttpKeyProvider is closed")
        if self._session is None:
            headers = {"Accept": "application/json"}
            if self._token is not None:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self._session

    async def _fetch(self, owner: str, key_id: str | None) -> OwnerKey:
        if not owner:
            raise UnknownOwner("empty owner name")
        path = _path(owner, key_id)  # before the backoff: a name no server can know is the caller's fault
        asked_at = now = self._clock()
        self._unless_backed_off(owner, now)
        try:
            key = await self._ask(owner, key_id, path)
        except _AnsweredError as exc:
            # An error status answered about this owner: backed off for this owner only (one
            # backoff for the whole server let a failing owner's retries turn every other owner
            # away); a server failing for everyone is held to the retry budget above.
            self._owner_failed(owner, stale_ok=exc.stale_ok)
            raise self._owner_error(owner, exc.message, stale_ok=exc.stale_ok) from None
        except BadKeyAnswer:
            self._served(owner)  # the server answered (about this owner's entry): it is healthy
            raise
        except (_TimedOut, _Malformed) as exc:
            # Slow for this owner while it answered others meanwhile (a tenant's KMS that hangs),
            # or garbage for this owner's entry while it serves the others lately: this owner's
            # trouble, as an answered error is. Taken for the server's, each of this owner's
            # retries backed off every other owner's lookups for up to 5 s, and its adds held the
            # add slots every owner shares (found by review; for garbage, 2026-12-07). With
            # nobody answered (the server away for all, a proxy's page for every request), the
            # server's, as before. Its cached key, if any, is still good (stale_ok).
            timed_out = isinstance(exc, _TimedOut)
            if self._another_served(owner, since=asked_at if timed_out else None):
                self._owner_failed(owner, stale_ok=True)
                raise self._owner_error(owner, str(exc), stale_ok=True) from None
            self._server_failed()
            if timed_out:
                raise KeyUnavailable(str(exc)) from exc.__cause__
            raise
        except KeyUnavailable:
            self._server_failed()
            raise
        except (UnknownOwner, UnknownKey):
            self._served(owner)  # the server answered: it is healthy
            raise
        self._served(owner)
        return key

    def _unless_backed_off(self, owner: str, now: float) -> None:
        """Raise if the server, or this owner, is not to be asked again yet."""
        wait = self._retry_at - now
        if wait > 0:
            raise KeyUnavailable(f"key server failing: not asked again for {wait:.1f}s")
        held = self._owner_backoff.get(owner)
        if held is not None:
            if held[1] > now:
                raise self._owner_error(owner, f"not asked again for {held[1] - now:.1f}s", stale_ok=held[2])
            if not self._retry_allowed(now):
                # Owners already failing are asked again within a budget a second, whatever their
                # number: a key server restarting would otherwise get a retry from every owner
                # whose key expired meanwhile (owners x bridges, every few seconds).
                raise self._owner_error(owner, "its retries are spaced out while it fails", stale_ok=held[2])

    def _delay(self, failures: int) -> float:
        base, cap = self._backoff
        delay = min(cap, base * 2 ** (failures - 1))
        return random.uniform(delay / 2, delay)  # nosec B311  (jitter, not secrecy)

    def _server_failed(self) -> None:
        self._failures += 1
        self._retry_at = self._clock() + self._delay(self._failures)

    def _owner_failed(self, owner: str, *, stale_ok: bool) -> None:
        failures = self._owner_backoff.pop(owner, (0, 0.0, stale_ok))[0] + 1
        self._owner_backoff[owner] = (failures, self._clock() + self._delay(failures), stale_ok)
        while len(self._owner_backoff) > MAX_OWNERS_BACKED_OFF:
            self._owner_backoff.popitem(last=False)  # the longest-failing: asked again at its next call

    def _served(self, owner: str) -> None:
        self._failures = 0
        self._owner_backoff.pop(owner, None)
        self._served_lately[owner] = self._clock()
        self._served_lately.move_to_end(owner)
        while len(self._served_lately) > SERVED_OWNERS_KEPT:
            self._served_lately.popitem(last=False)

    def _another_served(self, owner: str, since: float | None = None) -> bool:
        """Whether the server answered another owner well since ``since`` (default: within
        ``SERVED_LATELY_S``)."""
        since = self._clock() - SERVED_LATELY_S if since is None else since
        for o, at in reversed(self._served_lately.items()):  # the latest first
            if at < since:
                return False
            if o != owner:
                return True
        return False

    def _owner_error(self, owner: str, why: str, *, stale_ok: bool) -> KeyUnavailable:
        """What a failing owner's lookup raises: ``BadKeyAnswer`` (that owner's trouble: its adds
        wait in the add retry lane, not in the slots every owner's adds share) while the server
        serves another owner; else ``KeyUnavailable`` (a fleet of one owner, or a server failing
        for all: the adds are held where they are, their back-pressure)."""
        message = f"key server failing for owner {owner!r}: {why}"
        if self._another_served(owner):
            return BadKeyAnswer(message, stale_ok=stale_ok)
        return KeyUnavailable(message, stale_ok=stale_ok)

    def _retry_allowed(self, now: float) -> bool:
        """A token of the failing owners' retry budget (``FAILING_RETRIES_PER_S``), if one is left."""
        self._retry_tokens = min(
            FAILING_RETRIES_BURST, self._retry_tokens + (now - self._tokens_at) * FAILING_RETRIES_PER_S
        )
        self._tokens_at = now
        if self._retry_tokens < 1:
            return False
        self._retry_tokens -= 1
        return True

    async def _ask(self, owner: str, key_id: str | None, path: str) -> OwnerKey:
        what = f"owner {owner!r} " + ("current key" if key_id is None else f"key {key_id!r}")
        url = URL(f"{self._base}/owners/{path}", encoded=True)
        status, body = await self._get(url, what)
        if status == 200:
            return self._parse_key(owner, key_id, body, what)
        if status == 404:
            error = _error_code(body)
            if error == "unknown_owner":
                raise UnknownOwner(f"key server has no keys for owner {owner!r}")
            if error == "unknown_key":
                raise UnknownKey(f"key server has no {what}")
            raise _AnsweredError(
                f"key server answered 404 without an error code for {what} (wrong URL?)", stale_ok=False
            )
        if status in {401, 403}:
            raise _AnsweredError(f"key server refused our credentials (HTTP {status}) for {what}", stale_ok=False)
        raise _AnsweredError(f"key server answered HTTP {status} for {what}", stale_ok=status >= 500)

    async def _get(self, url: URL, what: str) -> tuple[int, bytes]:
        session = self._client()
        for attempt in (1, 2):
            try:
                async with session.get(url, allow_redirects=False) as resp:
                    # read(n) returns what is buffered, up to n bytes, not n bytes: an answer that
                    # arrives in pieces (chunked, through a proxy) is read to its end, still bounded.
                    body = bytearray()
                    while chunk := await resp.content.read(MAX_RESPONSE_BYTES + 1 - len(body)):
                        body += chunk
                        if len(body) > MAX_RESPONSE_BYTES:
                            raise _Malformed(f"key server response for {what} exceeds {MAX_RESPONSE_BYTES} bytes")
                    return resp.status, bytes(body)
            except TimeoutError as exc:
                raise _TimedOut(f"key server timed out after {self._timeout}s fetching {what}") from exc
            except aiohttp.ClientConnectionError as exc:
                if attempt == 1:
                    continue
                # The message reaches tenants (``unavailable``): the exception, which names the key
                # server's host and port, goes to the log only.
                log.warning("key server unreachable fetching %s: %s", what, _described(exc))
                raise KeyUnavailable(f"key server unreachable fetching {what}: {type(exc).__name__}") from None
            except aiohttp.ClientError as exc:
                log.warning("key server request failed fetching %s: %s", what, _described(exc))
                raise KeyUnavailable(f"key server request failed fetching {what}: {type(exc).__name__}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _parse_key(owner: str, key_id: str | None, body: bytes, what: str) -> OwnerKey:
        # Never echo the body: it may carry key material.
        try:
            doc: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _Malformed(f"malformed key server response for {what}: not JSON") from None
        if not isinstance(doc, dict):
            raise _Malformed(f"malformed key server response for {what}: not a JSON object")
        # From here on the server answered, about this owner's entry: no backoff for the server.
        got_id = doc.get("id")
        encoded = doc.get("key")
        if not isinstance(got_id, str) or not got_id:
            raise BadKeyAnswer(f"malformed key server response for {what}: missing 'id'")
        if got_id == _CURRENT:
            # Reserved (the path of the current key): a server echoing it had every add sealed
            # under an id that no lookup by id can ever answer, so those tasks and their results
            # became unopenable once the cache let go of it.
            raise BadKeyAnswer(f"malformed key server response for {what}: {_CURRENT!r} is not a key id")
        if key_id is not None and got_id != key_id:
            raise BadKeyAnswer(f"malformed key server response for {what}: it names key {got_id!r}")
        if not isinstance(encoded, str):
            raise BadKeyAnswer(f"malformed key server response for {what}: missing 'key'")
        try:
            secret = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadKeyAnswer(f"malformed key server response for {what}: 'key' is not base64") from None
        if len(secret) != KEY_SIZE:
            raise BadKeyAnswer(
                f"malformed key server response for {what}: key is {len(secret)} bytes, expected {KEY_SIZE}"
            )
        return OwnerKey(owner=owner, key_id=got_id, secret=secret)


def _error_code(body: bytes) -> str | None:
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, str):
            return error
    return None


def _described(exc: aiohttp.ClientError) -> str:
    """An aiohttp error without what it carries of the request: its repr, and a response error's
    str (through its URL), show the request's headers or the URL's credentials, and a key
    server's token or password reads every owner's key. (Not chained either, for the same reason:
    a traceback prints the cause.)"""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: HTTP {exc.status}, {exc.message}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{type(exc).__name__}: {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    return type(exc).__name__
