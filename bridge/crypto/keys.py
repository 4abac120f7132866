"""Owner keys, the :class:`KeyProvider` protocol and a caching, coalescing wrapper.

Every owner (tenant) has one *current* key, used to seal new data, and any number of older keys
that stay readable by id until they are revoked.  Providers:

* :class:`bridge.crypto.keyring_file.KeyringFileProvider` -- a local JSON keyring (dev, small
  deployments);
* :class:`bridge.crypto.keyserver.HttpKeyProvider` -- a remote key server over HTTP;
* :class:`CachingKeyProvider` -- wraps either one with a bounded, time-limited LRU cache and
  single-flight coalescing of concurrent misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import anyio

from bridge.crypto.errors import BadKeyAnswer, KeyUnavailable, UnknownOwner

__all__ = ["KEY_SIZE", "CachingKeyProvider", "KeyProvider", "OwnerKey"]

KEY_SIZE = 32
"""Length in bytes of every owner secret (AES-256)."""


@dataclass(frozen=True, slots=True)
class OwnerKey:
    """One key of one owner.  ``secret`` is the raw 32-byte AES-256 key and never appears in repr."""

    owner: str
    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.owner:
            raise ValueError("OwnerKey.owner must be a non-empty string")
        if not self.key_id:
            raise ValueError(f"OwnerKey.key_id must be a non-empty string (owner {self.owner!r})")
        if not isinstance(self.secret, bytes) or len(self.secret) != KEY_SIZE:
            size = len(self.secret) if isinstance(self.secret, bytes | bytearray) else "?"
            raise ValueError(
                f"key {self.key_id!r} of owner {self.owner!r}: secret must be {KEY_SIZE} bytes, got {size}"
            )


@runtime_checkable
class KeyProvider(Protocol):
    """Source of owner keys.

    ``current_key`` returns the key new data must be sealed with; ``key_by_id`` returns the key a
    stored value names.  Both raise :class:`~bridge.crypto.errors.UnknownOwner`,
    :class:`~bridge.crypto.errors.UnknownKey` (``key_by_id`` only) or
    :class:`~bridge.crypto.errors.KeyUnavailable`.
    """

    async def current_key(self, owner: str) -> OwnerKey: ...

    async def key_by_id(self, owner: str, key_id: str) -> OwnerKey: ...

    async def close(self) -> None: ...


# How long after its cached key expired an owner the key source says it does not know is taken for
# the source restarting (its store not loaded yet) rather than removed: a restart's time.
RESTART_GRACE_S = 600.0
# Owners whose last key given is remembered apart from the keys' LRU (``_known_lately``): a fleet
# serving more owners than the cache holds evicted the others' keys, and with them the memory of
# having served them. An entry is a name and a time (~150 bytes): 64K owners, some 10 MB at most.
OWNERS_SERVED_KEPT = 65_536

# Cache slot: (owner, key id), or (owner, None) for the owner's current key -- None cannot collide
# with any key id string.
_CacheKey = tuple[str, str | None]


class _Flight:
    """One upstream fetch that concurrent callers for the same cache key wait on."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: OwnerKey | None = None
        self.error: Exception | None = None


class CachingKeyProvider:
    """Bounded LRU cache with a maximum age in front of any :class:`KeyProvider`.

    * Current keys and keys-by-id share one LRU of at most ``max_entries`` entries, each valid for
      ``max_age`` seconds (measured with ``clock``, default :func:`time.monotonic`).  A key id's
      secret never changes, but revocation upstream must take effect eventually, so by-id entries
      expire too.  A fetched current key also fills the by-id slot of its id.
    * Concurrent misses for the same ``(owner, current)`` or ``(owner, key_id)`` are coalesced
      into a single upstream call (single flight); its result or error is shared by all waiters.
      If the caller that started the fetch is cancelled, one of the waiters retries.
    * Errors are never cached. An entry past ``max_age`` is asked for again; if the upstream then
      gives no answer (:class:`~bridge.crypto.errors.KeyUnavailable` whose ``stale_ok``: down,
      timed out, an error of its own) and the entry is younger than ``max_age + stale_if_error``,
      the entry is served (counted in ``stale``), as HTTP's ``stale-if-error``; from then on,
      until the upstream answers, it is served at once and asked for in the background (one
      lookup at a time per entry), so a hung upstream costs no request its timeout again.
      Without it, a key server away longer than the cache's age stopped every request that names
      an owner: a worker's extends and acks were refused, its leases ran out and the finished
      work was done again (found by review).
      An answer is never masked: a key revoked (``UnknownKey``), an owner refused (401/403) or its
      entry unusable is not served stale, and an owner the upstream says it does not know
      (``UnknownOwner``) while it had a key for it within ``max_age`` + ``RESTART_GRACE_S`` is
      taken for a key server restarting before its store is loaded (``BadKeyAnswer``: that
      owner's trouble, retried, not ``unknown_owner``, which dead-letters adds), and served no
      key. Past those windows, the upstream's answer or error stands.
    * Counters for metrics: ``hits`` (answered from the cache), ``misses`` (upstream calls made),
      ``coalesced`` (answered by joining another caller's upstream call).
    * Rotation: a rotated current key is picked up after at most ``max_age`` seconds, or at once
      after :meth:`invalidate`.
    * ``revalidate``, if given, is called before every lookup, hits included: an upstream that can
      tell cheaply whether its keys changed (the key-ring file: a rate-limited ``stat``) checks
      there and invalidates this cache when they did. Without it a hot owner's keys were served
      from the cache and the file was never looked at until they expired.
    """

    def __init__(
        self,
        upstream: KeyProvider,
        *,
        max_entries: int = 1024,
        max_age: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        revalidate: Callable[[], object] | None = None,
        stale_if_error: float = 0.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if max_age <= 0:
            raise ValueError("max_age must be > 0")
        if stale_if_error < 0:
            raise ValueError("stale_if_error must be >= 0")
        self._stale_if_error = stale_if_error
        self._upstream = upstream
        self._max_entries = max_entries
        self._max_age = max_age
        self._clock = clock
        self._revalidate = revalidate
        self._entries: OrderedDict[_CacheKey, tuple[OwnerKey, float]] = OrderedDict()
        self._flights: dict[_CacheKey, _Flight] = {}
        # Slots last answered stale because the upstream gave no answer: served stale at once
        # while their lookup is retried in the background (see ``_get``).
        self._outage: set[_CacheKey] = set()
        self._revalidating: dict[_CacheKey, asyncio.Task[None]] = {}
        self._generation = 0
        # When the upstream last gave a key of each owner (bounded, the oldest forgotten first).
        self._served_at: OrderedDict[str, float] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.coalesced = 0
        self.stale = 0

    @property
    def upstream(self) -> KeyProvider:
        return self._upstream

    def __len__(self) -> int:
        """Number of cache entries (expired ones included until they are next looked up)."""
        return len(self._entries)

    async def current_key(self, owner: str) -> OwnerKey:
        return await self._get((owner, None), lambda: self._upstream.current_key(owner))

    async def key_by_id(self, owner: str, key_id: str) -> OwnerKey:
        return await self._get((owner, key_id), lambda: self._upstream.key_by_id(owner, key_id))

    def invalidate(self, owner: str | None = None) -> None:
        """Forget cached keys of ``owner`` (all owners if None).  Fetches in flight are not cached."""
        self._generation += 1
        if owner is None:
            self._entries.clear()
            self._outage.clear()
            self._served_at.clear()
        else:
            for slot in [slot for slot in self._entries if slot[0] == owner]:
                del self._entries[slot]
            self._outage = {slot for slot in self._outage if slot[0] != owner}
            self._served_at.pop(owner, None)

    async def close(self) -> None:
        """Drop the cache and close the upstream provider."""
        tasks = list(self._revalidating.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.invalidate()
        await self._upstream.close()

    # -- internals ---------------------------------------------------------------------------

    def _lookup(self, slot: _CacheKey) -> OwnerKey | None:
        entry = self._entries.get(slot)
        if entry is None:
            return None
        key, stored_at = entry
        age = self._clock() - stored_at
        if age >= self._max_age:
            if age >= self._max_age + self._stale_if_error:
                del self._entries[slot]
                self._outage.discard(slot)
            return None  # asked for again (and kept, within the window, for an upstream that fails)
        self._entries.move_to_end(slot)
        return key

    def _stale(self, slot: _CacheKey) -> OwnerKey | None:
        """The entry past its age still within ``stale_if_error``, if any."""
        entry = self._entries.get(slot)
        if entry is None or not self._stale_if_error:
            return None
        key, stored_at = entry
        return key if self._clock() - stored_at < self._max_age + self._stale_if_error else None

    def _known_lately(self, owner: str) -> float | None:
        """Seconds since the upstream last gave a key of ``owner``, if within ``max_age`` plus
        a restart's time (``RESTART_GRACE_S``, at most the stale window): past it, an owner the
        source does not know is one removed (``unknown_owner``), not a source restarting."""
        if not self._stale_if_error:
            return None
        now, limit = self._clock(), self._max_age + min(self._stale_if_error, RESTART_GRACE_S)
        served_at = self._served_at.get(owner)
        if served_at is None or now - served_at >= limit:
            return None
        return now - served_at

    def _store(self, slot: _CacheKey, key: OwnerKey, now: float) -> None:
        # A fresh entry ends the slot's outage: a by-id slot refreshed by its owner's current-key
        # lookup stayed flagged, and past its age was served stale at once with the source healthy,
        # a refusal since (a tenant suspended) heard only by a later request (a re-review).
        self._outage.discard(slot)
        self._entries[slot] = (key, now)
        self._entries.move_to_end(slot)
        self._served_at[slot[0]] = now
        self._served_at.move_to_end(slot[0])
        if len(self._served_at) > OWNERS_SERVED_KEPT:
            self._served_at.popitem(last=False)
        while len(self._entries) > self._max_entries:
            self._outage.discard(self._entries.popitem(last=False)[0])

    async def _get(self, slot: _CacheKey, fetch: Callable[[], Awaitable[OwnerKey]]) -> OwnerKey:
        if self._revalidate is not None:
            self._revalidate()
        while True:
            key = self._lookup(slot)
            if key is not None:
                self.hits += 1
                return key
            if slot in self._outage and (stale := self._stale(slot)) is not None:
                # The upstream gave no answer the last time: serve stale now and ask again in the
                # background. Before, each retry (as each backoff ended) made the request that
                # started it, and every request of that owner joining it, wait the lookup's
                # timeout (2 s) against a server that hangs (found by review).
                self._revalidate_in_background(slot, fetch)
                self.stale += 1
                return stale
            flight = self._flights.get(slot)
            if flight is None:
                return await self._lead(slot, fetch)
            await flight.done.wait()
            if flight.result is not None:
                self.coalesced += 1
                return flight.result
            if flight.error is not None:
                self.coalesced += 1
                raise flight.error
            # The leader was cancelled before it got an answer: loop and try again ourselves.

    async def _lead(
        self, slot: _CacheKey, fetch: Callable[[], Awaitable[OwnerKey]], *, for_a_request: bool = True
    ) -> OwnerKey:
        flight = _Flight()
        self._flights[slot] = flight
        generation = self._generation
        self.misses += 1  # upstream calls, background ones included
        try:
            key = await fetch()
        except KeyUnavailable as exc:
            fresh = self._lookup(slot) if generation == self._generation and exc.stale_ok else None
            if fresh is not None:
                # Stored fresh while this lookup hung (its owner's current-key lookup fills the
                # by-id slot): the source answered meanwhile. Flagged again as an outage, the fresh
                # entry was served stale at once past its age, a refusal since unheard (a re-review).
                flight.result = fresh
                return fresh
            stale = self._stale(slot) if generation == self._generation and exc.stale_ok else None
            if stale is None:
                self._outage.discard(slot)
                flight.error = exc
                raise
            self._outage.add(slot)
            if for_a_request:
                self.stale += 1  # served past its age: the upstream cannot answer (kept at its old age)
            flight.result = stale
            return stale
        except UnknownOwner as exc:
            self._outage.discard(slot)  # an answer: the next request hears it, no key served stale
            owner = slot[0]
            lately = self._known_lately(owner) if generation == self._generation else None
            if lately is None:
                flight.error = exc
                raise
            # That owner's trouble (its adds wait in the add retry lane, not in the add slots every
            # owner shares: an offboarded tenant's backlog held them all), and no key is served.
            error = BadKeyAnswer(
                f"the key source does not know owner {owner!r}, though it gave a key of it {lately:.0f} s ago: "
                "taken for a key source restarting (retried), not an owner without keys"
            )
            flight.error = error
            raise error from None
        except Exception as exc:
            self._outage.discard(slot)
            flight.error = exc
            raise
        else:
            self._outage.discard(slot)
            flight.result = key
            if generation == self._generation:  # not invalidated meanwhile
                now = self._clock()
                self._store(slot, key, now)
                owner, key_id = slot
                if key_id is None and key.owner == owner:
                    self._store((owner, key.key_id), key, now)
            return key
        finally:
            del self._flights[slot]
            flight.done.set()

    def _revalidate_in_background(self, slot: _CacheKey, fetch: Callable[[], Awaitable[OwnerKey]]) -> None:
        """Ask the upstream for ``slot`` again without anyone waiting on it (one at a time per
        slot). Its outcome lands where a foreground lookup's would: a key is stored and ends the
        outage; a refusal or any other answer ends it too, so the next request asks in the
        foreground and hears the answer (never masked by a stale key); no answer keeps it."""
        if slot in self._flights or slot in self._revalidating:
            return

        async def revalidate() -> None:
            with contextlib.suppress(Exception):
                await self._lead(slot, fetch, for_a_request=False)

        def forget(done: asyncio.Task[None]) -> None:
            if self._revalidating.get(slot) is done:
                del self._revalidating[slot]

        task = asyncio.get_running_loop().create_task(revalidate())
        self._revalidating[slot] = task
        task.add_done_callback(forget)
