"""KeyringFileProvider (load, validation, rotation, reload) and CachingKeyProvider (unit level)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from bridge.crypto import (
    BadKeyAnswer,
    CachingKeyProvider,
    KeyProvider,
    KeyringFileProvider,
    KeyUnavailable,
    OwnerKey,
    UnknownKey,
    UnknownOwner,
    generate_keyring,
    open_sealed,
    rotate_keyring,
    seal,
    write_keyring,
)
from bridge.crypto.keys import RESTART_GRACE_S


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _write(path: Path, doc: dict[str, Any], *, bump_mtime: bool = True) -> None:
    """Write ``doc`` and make sure the mtime differs from the previous one (coarse filesystems)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(json.dumps(doc), encoding="utf-8")
    path.chmod(0o600)  # as a key-ring is kept (readable by others, the bridge warns of it)
    if bump_mtime:
        st = path.stat()
        if st.st_mtime_ns <= before:
            os.utime(path, ns=(st.st_atime_ns, before + 1_000_000_000))


def _replace_keeping_mtime(path: Path, doc: dict[str, Any]) -> None:
    before = path.stat()
    write_keyring(path, doc)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def _delete(path: Path) -> None:
    path.unlink()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ring_doc() -> dict[str, Any]:
    return generate_keyring(["acme", "globex"])


@pytest.fixture
def ring_path(tmp_path: Path, ring_doc: dict[str, Any]) -> Path:
    path = tmp_path / "keyring.json"
    _write(path, ring_doc)
    return path


# -- generate / load ---------------------------------------------------------------------------


def test_generate_keyring_shape() -> None:
    doc = generate_keyring(["a", "b"])
    assert set(doc["owners"]) == {"a", "b"}
    ids = set()
    for entry in doc["owners"].values():
        assert entry["current"] in entry["keys"]
        assert len(base64.b64decode(entry["keys"][entry["current"]], validate=True)) == 32
        ids.add(entry["current"])
        assert set(entry["keys"]) == {entry["current"]}
    assert len(ids) == 2
    a1, a2 = generate_keyring(["a"]), generate_keyring(["a"])
    assert a1["owners"]["a"]["keys"] != a2["owners"]["a"]["keys"]  # fresh random keys


def test_generate_keyring_rejects_duplicates_and_strings() -> None:
    with pytest.raises(ValueError, match="duplicate owner 'a'"):
        generate_keyring(["a", "a"])
    with pytest.raises(TypeError):
        generate_keyring("ab")


@pytest.mark.anyio
async def test_load_serves_current_and_by_id(ring_path: Path, ring_doc: dict[str, Any]) -> None:
    provider = KeyringFileProvider(ring_path)
    entry = ring_doc["owners"]["acme"]
    key = await provider.current_key("acme")
    assert key.owner == "acme"
    assert key.key_id == entry["current"]
    assert key.secret == base64.b64decode(entry["keys"][entry["current"]])
    assert await provider.key_by_id("acme", key.key_id) == key
    other = await provider.current_key("globex")
    assert other.secret != key.secret
    assert provider.owners == {"acme", "globex"}
    await provider.close()


@pytest.mark.anyio
async def test_unknown_owner_and_key(ring_path: Path) -> None:
    provider = KeyringFileProvider(ring_path)
    with pytest.raises(UnknownOwner, match="nobody"):
        await provider.current_key("nobody")
    with pytest.raises(UnknownOwner, match="nobody"):
        await provider.key_by_id("nobody", "k1")
    with pytest.raises(UnknownKey, match="no-such-key"):
        await provider.key_by_id("acme", "no-such-key")
    # A key id of another owner is not visible through this owner.
    globex = await provider.current_key("globex")
    with pytest.raises(UnknownKey):
        await provider.key_by_id("acme", globex.key_id)


def test_provider_satisfies_protocol(ring_path: Path) -> None:
    assert isinstance(KeyringFileProvider(ring_path), KeyProvider)


# -- validation ----------------------------------------------------------------------------------

_GOOD = base64.b64encode(b"\x07" * 32).decode()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "top level must be a JSON object"),
        ({}, "missing or invalid 'owners'"),
        ({"owners": []}, "missing or invalid 'owners'"),
        ({"owners": {"acme": "x"}}, "owner 'acme': entry must be an object"),
        ({"owners": {"acme": {"current": "k1"}}}, "owner 'acme': 'keys' must be a non-empty object"),
        ({"owners": {"acme": {"current": "k1", "keys": {}}}}, "owner 'acme': 'keys' must be a non-empty"),
        (
            {"owners": {"acme": {"current": "k1", "keys": {"k1": "not base64!!"}}}},
            "owner 'acme': key 'k1' is not valid base64",
        ),
        (
            # decodes to 32 bytes if non-alphabet characters were silently dropped
            {"owners": {"acme": {"current": "k1", "keys": {"k1": _GOOD[:8] + "!" + _GOOD[8:]}}}},
            "owner 'acme': key 'k1' is not valid base64",
        ),
        (
            {"owners": {"acme": {"current": "k1", "keys": {"k1": base64.b64encode(b"short").decode()}}}},
            "owner 'acme': key 'k1' decodes to 5 bytes, expected 32",
        ),
        (
            {"owners": {"acme": {"current": "k1", "keys": {"k1": base64.b64encode(b"x" * 33).decode()}}}},
            "owner 'acme': key 'k1' decodes to 33 bytes, expected 32",
        ),
        (
            {"owners": {"acme": {"current": "k1", "keys": {"k1": 12345}}}},
            "owner 'acme': key 'k1' must be a base64 string",
        ),
        (
            {"owners": {"acme": {"current": "k2", "keys": {"k1": _GOOD}}}},
            "owner 'acme': current key id 'k2' is missing from 'keys'",
        ),
        (
            {"owners": {"acme": {"keys": {"k1": _GOOD}}}},
            "owner 'acme': 'current' must be a key id string",
        ),
        (
            {
                "owners": {
                    "good": {"current": "k1", "keys": {"k1": _GOOD}},
                    "bad": {"current": "k9", "keys": {"k1": _GOOD}},
                }
            },
            "owner 'bad': current key id 'k9'",
        ),
    ],
)
def test_validation_errors_name_the_problem(tmp_path: Path, doc: object, message: str) -> None:
    path = tmp_path / "ring.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        KeyringFileProvider(path)
    assert str(path) in str(info.value)
    assert _GOOD not in str(info.value)  # never echo key material


def test_invalid_json_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ring.json"
    path.write_text('{"owners": {', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        KeyringFileProvider(path)


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        KeyringFileProvider(tmp_path / "absent.json")


# -- rotation and reload -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_rotation_via_reload(ring_path: Path, ring_doc: dict[str, Any], clock: FakeClock) -> None:
    provider = KeyringFileProvider(ring_path, clock=clock)
    old = await provider.current_key("acme")
    sealed = seal(old, b"sealed before rotation", service="s", task_id="t", field="value")

    new_id = rotate_keyring(ring_doc, "acme")
    _write(ring_path, ring_doc)
    clock.advance(1.01)

    new = await provider.current_key("acme")
    assert new.key_id == new_id
    assert new.key_id != old.key_id
    assert new.secret != old.secret
    assert provider.reloads == 1
    # The old id stays readable, so data sealed before the rotation still opens.
    assert await provider.key_by_id("acme", old.key_id) == old
    assert open_sealed(
        await provider.key_by_id("acme", sealed.key_id), sealed, service="s", task_id="t", field="value"
    ) == (b"sealed before rotation")
    # Other owners are untouched.
    assert (await provider.current_key("globex")).key_id == ring_doc["owners"]["globex"]["current"]


@pytest.mark.anyio
async def test_a_rotated_file_that_cannot_be_read_is_read_again_once_it_can(
    ring_path: Path, ring_doc: dict[str, Any], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotated key-ring written by another user (mode 0600) cannot be read until an operator
    fixes its owner or mode, which changes neither its mtime nor its size: the bridge recorded the
    new version as seen and never read it again, keeping the old keys until it restarted."""
    from bridge.crypto import keyring_file

    provider = KeyringFileProvider(ring_path, clock=clock)
    old = await provider.current_key("acme")
    new_id = rotate_keyring(ring_doc, "acme")
    _write(ring_path, ring_doc)
    real_load = keyring_file.load_keyring
    unreadable = [True]

    def load(path: Path) -> Any:
        if unreadable[0]:  # as root, a chmod does not stop this process reading: refused here
            raise PermissionError(13, "Permission denied", str(path))
        return real_load(path)

    monkeypatch.setattr(keyring_file, "load_keyring", load)
    for _ in range(3):
        clock.advance(1.01)
        assert (await provider.current_key("acme")).key_id == old.key_id  # the previous ring is kept
    assert provider.failed_reloads == 1, "warned once, not at every check"
    unreadable[0] = False  # chown / chmod: the same mtime and size
    clock.advance(1.01)
    assert (await provider.current_key("acme")).key_id == new_id
    assert provider.reloads == 1


@pytest.mark.anyio
async def test_reload_is_checked_at_most_once_per_second(
    ring_path: Path, ring_doc: dict[str, Any], clock: FakeClock
) -> None:
    provider = KeyringFileProvider(ring_path, clock=clock)
    old = await provider.current_key("acme")
    new_id = rotate_keyring(ring_doc, "acme")
    _write(ring_path, ring_doc)

    clock.advance(0.5)
    assert (await provider.current_key("acme")).key_id == old.key_id  # not checked yet
    clock.advance(0.6)
    assert (await provider.current_key("acme")).key_id == new_id


@pytest.mark.anyio
async def test_unchanged_file_is_not_reread(ring_path: Path, clock: FakeClock) -> None:
    provider = KeyringFileProvider(ring_path, clock=clock)
    for _ in range(5):
        clock.advance(2)
        await provider.current_key("acme")
    assert provider.reloads == 0


@pytest.mark.anyio
async def test_reload_picks_up_atomic_replace(ring_path: Path, ring_doc: dict[str, Any], clock: FakeClock) -> None:
    provider = KeyringFileProvider(ring_path, clock=clock)
    rotate_keyring(ring_doc, "globex")
    ring_doc["owners"].pop("acme")
    write_keyring(ring_path, ring_doc)  # temp file + rename
    clock.advance(1.5)
    with pytest.raises(UnknownOwner):
        await provider.current_key("acme")  # removed owner: revocation takes effect
    assert (await provider.current_key("globex")).key_id == ring_doc["owners"]["globex"]["current"]


@pytest.mark.anyio
async def test_failed_reload_keeps_old_ring_and_warns(
    ring_path: Path, ring_doc: dict[str, Any], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    provider = KeyringFileProvider(ring_path, clock=clock)
    old = await provider.current_key("acme")

    broken = json.loads(json.dumps(ring_doc))
    new_id = rotate_keyring(broken, "acme")
    broken["owners"]["acme"]["keys"][new_id] = base64.b64encode(b"too short").decode()
    _write(ring_path, broken)
    clock.advance(1.5)
    with caplog.at_level(logging.WARNING, logger="bridge.crypto.keyring_file"):
        assert await provider.current_key("acme") == old
    assert provider.failed_reloads == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "keeping the previous keyring" in text
    assert f"key {new_id!r} decodes to 9 bytes" in text
    for entry in broken["owners"].values():  # no key material in logs
        for secret in entry["keys"].values():
            assert secret not in caplog.text

    # The broken file is not retried every second...
    clock.advance(1.5)
    await provider.current_key("acme")
    assert provider.failed_reloads == 1
    # ...but a fixed file is picked up.
    rotate_keyring(ring_doc, "acme")
    _write(ring_path, ring_doc)
    clock.advance(1.5)
    assert (await provider.current_key("acme")).key_id == ring_doc["owners"]["acme"]["current"]


@pytest.mark.anyio
async def test_deleted_file_keeps_old_ring(ring_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    provider = KeyringFileProvider(ring_path, clock=clock)
    old = await provider.current_key("acme")
    _delete(ring_path)
    clock.advance(1.5)
    with caplog.at_level(logging.WARNING, logger="bridge.crypto.keyring_file"):
        assert await provider.current_key("acme") == old
        clock.advance(1.5)
        assert await provider.current_key("acme") == old
    assert len([r for r in caplog.records if "cannot stat" in r.getMessage()]) == 1


@pytest.mark.anyio
async def test_reload_detects_change_with_preserved_mtime(
    ring_path: Path, ring_doc: dict[str, Any], clock: FakeClock
) -> None:
    # e.g. `cp -p` or a restored backup: the mtime is unchanged but size/inode are not.
    provider = KeyringFileProvider(ring_path, clock=clock)
    new_id = rotate_keyring(ring_doc, "acme")
    _replace_keeping_mtime(ring_path, ring_doc)
    clock.advance(1.5)
    assert (await provider.current_key("acme")).key_id == new_id


def test_keyring_cli_generate_and_rotate(tmp_path: Path) -> None:
    """The one key-ring command line: ``queue-bridge keyring`` (bridge.cli.keyring)."""
    from typer.testing import CliRunner

    from bridge.cli import app

    runner = CliRunner()
    path = tmp_path / "dev.json"
    generated = runner.invoke(app, ["keyring", "generate", str(path), "--owner", "a", "--owner", "b"])
    assert generated.exit_code == 0, generated.output
    assert path.stat().st_mode & 0o777 == 0o600
    doc = json.loads(path.read_text())
    assert set(doc["owners"]) == {"a", "b"}
    refused = runner.invoke(app, ["keyring", "generate", str(path), "--owner", "c"])
    assert refused.exit_code == 1, "refuses to overwrite without --force"
    old_current = doc["owners"]["a"]["current"]
    rotated = runner.invoke(app, ["keyring", "rotate", str(path), "--owner", "a"])
    assert rotated.exit_code == 0, rotated.output
    doc = json.loads(path.read_text())
    assert doc["owners"]["a"]["current"] != old_current
    assert old_current in doc["owners"]["a"]["keys"]
    for secret in doc["owners"]["a"]["keys"].values():
        assert secret not in generated.output + rotated.output


# -- CachingKeyProvider ------------------------------------------------------------------------


class CountingProvider:
    """Wraps a provider, counts upstream calls, optionally blocks them until released."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str | None]] = []
        self.gate: anyio.Event | None = None
        self.error: Exception | None = None
        self.closed = False

    async def _wait(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error

    async def current_key(self, owner: str) -> OwnerKey:
        self.calls.append((owner, None))
        await self._wait()
        return await self.inner.current_key(owner)

    async def key_by_id(self, owner: str, key_id: str) -> OwnerKey:
        self.calls.append((owner, key_id))
        await self._wait()
        return await self.inner.key_by_id(owner, key_id)

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def upstream(ring_path: Path) -> CountingProvider:
    return CountingProvider(KeyringFileProvider(ring_path))


@pytest.mark.anyio
async def test_cache_counts_hits_and_misses(upstream: CountingProvider, clock: FakeClock) -> None:
    cache = CachingKeyProvider(upstream, clock=clock)
    first = await cache.current_key("acme")
    assert (cache.hits, cache.misses) == (0, 1)
    assert await cache.current_key("acme") == first
    assert await cache.current_key("acme") == first
    assert (cache.hits, cache.misses) == (2, 1)
    # The current key also primed the by-id slot: opening data needs no upstream call.
    assert await cache.key_by_id("acme", first.key_id) == first
    assert (cache.hits, cache.misses) == (3, 1)
    await cache.current_key("globex")
    assert (cache.hits, cache.misses) == (3, 2)
    assert upstream.calls == [("acme", None), ("globex", None)]


@pytest.mark.anyio
async def test_cache_by_id_and_errors_not_cached(upstream: CountingProvider, ring_doc: dict[str, Any]) -> None:
    cache = CachingKeyProvider(upstream)
    kid = ring_doc["owners"]["acme"]["current"]
    await cache.key_by_id("acme", kid)
    await cache.key_by_id("acme", kid)
    assert (cache.hits, cache.misses) == (1, 1)
    for _ in range(2):
        with pytest.raises(UnknownKey):
            await cache.key_by_id("acme", "nope")
        with pytest.raises(UnknownOwner):
            await cache.current_key("nobody")
    assert cache.misses == 5  # errors are never cached
    assert len(upstream.calls) == 5


@pytest.mark.anyio
async def test_cache_max_age_expiry(upstream: CountingProvider, clock: FakeClock) -> None:
    cache = CachingKeyProvider(upstream, max_age=300, clock=clock)
    key = await cache.current_key("acme")
    clock.advance(299.9)
    await cache.current_key("acme")
    await cache.key_by_id("acme", key.key_id)
    assert len(upstream.calls) == 1
    clock.advance(0.2)  # 300.1 s after the fetch: both slots expired
    await cache.current_key("acme")
    assert len(upstream.calls) == 2
    clock.advance(10)
    await cache.key_by_id("acme", key.key_id)  # refreshed by the current-key fetch
    assert len(upstream.calls) == 2
    clock.advance(300)
    await cache.key_by_id("acme", key.key_id)
    assert upstream.calls[-1] == ("acme", key.key_id)
    assert len(upstream.calls) == 3


@pytest.mark.anyio
async def test_cache_picks_up_rotation_after_max_age(
    ring_path: Path, ring_doc: dict[str, Any], clock: FakeClock
) -> None:
    file_clock = FakeClock()
    cache = CachingKeyProvider(KeyringFileProvider(ring_path, clock=file_clock), max_age=60, clock=clock)
    old = await cache.current_key("acme")
    new_id = rotate_keyring(ring_doc, "acme")
    _write(ring_path, ring_doc)
    file_clock.advance(2)
    assert (await cache.current_key("acme")).key_id == old.key_id  # still cached
    clock.advance(61)
    assert (await cache.current_key("acme")).key_id == new_id
    cache.invalidate("acme")
    assert (await cache.current_key("acme")).key_id == new_id


@pytest.mark.anyio
async def test_cache_invalidate(upstream: CountingProvider, ring_doc: dict[str, Any], ring_path: Path) -> None:
    cache = CachingKeyProvider(upstream)
    old = await cache.current_key("acme")
    await cache.current_key("globex")
    new_id = rotate_keyring(ring_doc, "acme")
    _write(ring_path, ring_doc)
    upstream.inner = KeyringFileProvider(ring_path)
    assert (await cache.current_key("acme")).key_id == old.key_id  # cached
    cache.invalidate("acme")
    assert (await cache.current_key("acme")).key_id == new_id  # at once
    await cache.current_key("globex")  # other owners stay cached
    assert upstream.calls == [("acme", None), ("globex", None), ("acme", None)]
    cache.invalidate()
    assert len(cache) == 0


@pytest.mark.anyio
async def test_cache_invalidate_during_fetch_does_not_store_stale_key(upstream: CountingProvider) -> None:
    cache = CachingKeyProvider(upstream)
    upstream.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.current_key, "acme")
        await anyio.wait_all_tasks_blocked()
        cache.invalidate("acme")  # e.g. revocation noticed while the fetch is in flight
        upstream.gate.set()
    assert len(cache) == 0
    upstream.gate = None
    await cache.current_key("acme")
    assert len(upstream.calls) == 2


@pytest.mark.anyio
async def test_cache_lru_bound(upstream: CountingProvider, ring_doc: dict[str, Any], ring_path: Path) -> None:
    old_acme = ring_doc["owners"]["acme"]["current"]
    new_acme = rotate_keyring(ring_doc, "acme")
    _write(ring_path, ring_doc)
    upstream.inner = KeyringFileProvider(ring_path)
    globex = ring_doc["owners"]["globex"]["current"]
    cache = CachingKeyProvider(upstream, max_entries=2)

    await cache.key_by_id("acme", old_acme)  # miss: [old]
    await cache.key_by_id("globex", globex)  # miss: [old, globex]
    await cache.key_by_id("acme", old_acme)  # hit, becomes most recent: [globex, old]
    assert len(upstream.calls) == 2
    await cache.key_by_id("acme", new_acme)  # miss, evicts the least recently used: [old, new]
    assert len(cache) == 2
    assert len(upstream.calls) == 3
    await cache.key_by_id("acme", old_acme)  # still cached: [new, old]
    assert len(upstream.calls) == 3
    await cache.key_by_id("globex", globex)  # was evicted: [old, globex]
    assert upstream.calls[-1] == ("globex", globex)
    assert len(upstream.calls) == 4
    assert len(cache) == 2
    # A current-key fetch fills two slots (current + by id) and still respects the bound.
    await cache.current_key("acme")
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 5)


@pytest.mark.anyio
async def test_cache_coalesces_concurrent_misses(upstream: CountingProvider) -> None:
    cache = CachingKeyProvider(upstream)
    upstream.gate = anyio.Event()
    results: list[OwnerKey] = []

    async def get() -> None:
        results.append(await cache.current_key("acme"))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(get)
        await anyio.wait_all_tasks_blocked()
        assert upstream.calls == [("acme", None)]
        upstream.gate.set()
    assert len(results) == 20
    assert len(set(results)) == 1
    assert (cache.misses, cache.coalesced, cache.hits) == (1, 19, 0)


@pytest.mark.anyio
async def test_cache_coalesced_error_reaches_every_waiter(upstream: CountingProvider) -> None:
    cache = CachingKeyProvider(upstream)
    upstream.gate = anyio.Event()
    upstream.error = KeyUnavailable("down")
    errors: list[Exception] = []

    async def get() -> None:
        try:
            await cache.key_by_id("acme", "whatever")
        except KeyUnavailable as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(get)
        await anyio.wait_all_tasks_blocked()
        upstream.gate.set()
    assert len(errors) == 5
    assert len(upstream.calls) == 1
    upstream.error = None
    upstream.gate = None
    with pytest.raises(UnknownKey):  # the error was not cached: a new call goes upstream
        await cache.key_by_id("acme", "whatever")
    assert len(upstream.calls) == 2


@pytest.mark.anyio
async def test_cache_cancelled_leader_hands_over(upstream: CountingProvider) -> None:
    cache = CachingKeyProvider(upstream)
    upstream.gate = anyio.Event()
    results: list[OwnerKey] = []

    async def waiter() -> None:
        results.append(await cache.current_key("acme"))

    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as leader_group:
            leader_group.start_soon(cache.current_key, "acme")
            await anyio.wait_all_tasks_blocked()
            outer.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            leader_group.cancel_scope.cancel()  # the leader goes away without an answer
        await anyio.wait_all_tasks_blocked()
        assert len(upstream.calls) == 2  # the waiter started its own fetch
        upstream.gate.set()
    assert len(results) == 1
    assert results[0].owner == "acme"


@pytest.mark.anyio
async def test_cache_close_closes_upstream(upstream: CountingProvider) -> None:
    cache = CachingKeyProvider(upstream)
    await cache.current_key("acme")
    await cache.close()
    assert upstream.closed
    assert len(cache) == 0


def test_cache_rejects_bad_limits(upstream: CountingProvider) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        CachingKeyProvider(upstream, max_entries=0)
    with pytest.raises(ValueError, match="max_age"):
        CachingKeyProvider(upstream, max_age=0)


# -- the bridge's provider stack (bridge.app.build_key_provider) -------------------------------


def _stack(ring_path: Path, clock: FakeClock) -> KeyProvider:
    from bridge.app import build_key_provider
    from bridge.config import Settings

    settings = Settings(_env_file=None, keyring=ring_path, key_server_url=None)  # type: ignore[call-arg]
    assert settings.key_cache_seconds == 300  # the default this is about: minutes of a stale key
    return build_key_provider(settings, clock=clock)


@pytest.mark.anyio
async def test_a_rotated_key_ring_seals_with_the_new_key_at_the_next_check(
    ring_path: Path, ring_doc: dict[str, Any], clock: FakeClock
) -> None:
    """The cache in front of the key-ring served a hot owner's current key for key_cache_seconds
    (5 minutes) after a rotation: a key rotated out because it leaked still sealed new tasks."""
    keys = _stack(ring_path, clock)
    old = await keys.current_key("acme")
    new_id = rotate_keyring(ring_doc, "acme")
    write_keyring(ring_path, ring_doc)
    clock.advance(1.0)  # the file's next change check (once a second), nowhere near the cache's age
    current = await keys.current_key("acme")
    assert current.key_id == new_id != old.key_id
    sealed = seal(current, b"v", service="s", task_id="t", field="value")
    assert sealed.key_id == new_id
    assert open_sealed(await keys.key_by_id("acme", new_id), sealed, service="s", task_id="t", field="value") == b"v"


@pytest.mark.anyio
async def test_a_key_removed_from_the_key_ring_stops_opening_at_the_next_check(
    ring_path: Path, ring_doc: dict[str, Any], clock: FakeClock
) -> None:
    keys = _stack(ring_path, clock)
    old = await keys.current_key("acme")
    assert await keys.key_by_id("acme", old.key_id) == old  # cached by id too
    new_id = rotate_keyring(ring_doc, "acme")
    del ring_doc["owners"]["acme"]["keys"][old.key_id]
    write_keyring(ring_path, ring_doc)
    clock.advance(1.0)
    with pytest.raises(UnknownKey):
        await keys.key_by_id("acme", old.key_id)
    assert (await keys.current_key("acme")).key_id == new_id


@pytest.mark.anyio
async def test_a_forced_reload_of_the_key_ring_empties_the_cache(
    ring_path: Path, ring_doc: dict[str, Any], clock: FakeClock
) -> None:
    keys = _stack(ring_path, clock)
    assert isinstance(keys, CachingKeyProvider) and isinstance(keys.upstream, KeyringFileProvider)
    await keys.current_key("acme")
    new_id = rotate_keyring(ring_doc, "acme")
    write_keyring(ring_path, ring_doc)
    assert keys.upstream.maybe_reload(force=True)  # no time passes: the reload alone must do it
    assert (await keys.current_key("acme")).key_id == new_id


# -- writing a key-ring (write_keyring) ----------------------------------------------------------


def test_write_keyring_syncs_the_data_before_the_rename_and_the_directory_after(
    tmp_path: Path, ring_path: Path, ring_doc: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without fsync a power loss could leave the renamed key-ring empty: every owner's keys gone."""
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("fsync-dir" if st.st_mode & 0o170000 == 0o040000 else "fsync-file", st.st_ino))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", (os.stat(src).st_ino, Path(dst).name)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rotate_keyring(ring_doc, "acme")
    write_keyring(ring_path, ring_doc)
    monkeypatch.undo()

    written = ring_path.stat().st_ino
    renamed = events.index(("replace", (written, ring_path.name)))
    assert ("fsync-file", written) in events[:renamed], events
    assert ("fsync-dir", tmp_path.stat().st_ino) in events[renamed + 1 :], events
    assert load_keyring_doc(ring_path) == ring_doc


def load_keyring_doc(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def test_write_keyring_keeps_the_previous_version_as_bak_with_its_mode(
    ring_path: Path, ring_doc: dict[str, Any]
) -> None:
    os.chmod(ring_path, 0o640)
    before = ring_path.read_bytes()
    rotate_keyring(ring_doc, "acme")
    write_keyring(ring_path, ring_doc)
    bak = ring_path.with_name(ring_path.name + ".bak")
    assert bak.read_bytes() == before
    assert bak.stat().st_mode & 0o777 == 0o640
    assert load_keyring_doc(ring_path) == ring_doc
    assert not [p.name for p in ring_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_write_keyring_writes_a_symlinks_target_keeping_its_mode(
    tmp_path: Path, ring_path: Path, ring_doc: dict[str, Any]
) -> None:
    """Replacing the link with a plain file left the target (what the bridge may read through
    another path, a mounted secret) on the old keys; a 0600 file lost the bridge's read access."""
    os.chmod(ring_path, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(ring_path)
    new_id = rotate_keyring(ring_doc, "acme")
    write_keyring(link, ring_doc)
    assert link.is_symlink() and link.resolve() == ring_path
    assert load_keyring_doc(ring_path)["owners"]["acme"]["current"] == new_id
    assert ring_path.stat().st_mode & 0o777 == 0o640
    assert ring_path.with_name(ring_path.name + ".bak").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_write_keyring_as_root_keeps_the_owner_of_the_file(ring_path: Path, ring_doc: dict[str, Any]) -> None:
    """A rotation run as root gave the key-ring to root (0600): the bridge (uid 10001) could no
    longer read it."""
    os.chown(ring_path, 10001, 10001)
    os.chmod(ring_path, 0o600)
    rotate_keyring(ring_doc, "acme")
    write_keyring(ring_path, ring_doc)
    for path in (ring_path, ring_path.with_name(ring_path.name + ".bak")):
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (10001, 10001, 0o600), path


def test_write_keyring_makes_a_new_file_0600(tmp_path: Path, ring_doc: dict[str, Any]) -> None:
    path = tmp_path / "new.json"
    write_keyring(path, ring_doc)
    assert path.stat().st_mode & 0o777 == 0o600
    assert not path.with_name("new.json.bak").exists()


# -- stale-if-error --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_key_past_its_age_is_served_while_the_key_source_cannot_answer(
    upstream: CountingProvider, clock: FakeClock
) -> None:
    """A key server away longer than the cache's age refused every request naming an owner (a
    worker's extends and acks: leases ran out, finished work done again): the last key it gave is
    served, within the window, and asked for again at each miss (found by review, 2026-12-07)."""
    cache = CachingKeyProvider(upstream, max_age=300, clock=clock, stale_if_error=3600)
    key = await cache.current_key("acme")
    upstream.error = KeyUnavailable("key server down")
    clock.advance(301)
    assert await cache.current_key("acme") == key
    assert await cache.key_by_id("acme", key.key_id) == key
    assert cache.stale == 2 and len(upstream.calls) == 3, "each miss asked the source first"
    clock.advance(3_000)  # 3,301 s old: still within 300 + 3,600
    assert await cache.current_key("acme") == key
    clock.advance(600)  # past the window: the source's error stands, and the entry is gone
    with pytest.raises(KeyUnavailable):
        await cache.current_key("acme")
    upstream.error = None
    clock.advance(1)
    assert await cache.current_key("acme") == key
    assert cache.stale == 3


@pytest.mark.anyio
async def test_no_stale_key_without_the_window_nor_once_the_source_answers(
    upstream: CountingProvider, clock: FakeClock, ring_doc: dict[str, Any]
) -> None:
    plain = CachingKeyProvider(upstream, max_age=300, clock=clock)  # stale_if_error=0: as before
    await plain.current_key("acme")
    upstream.error = KeyUnavailable("down")
    clock.advance(301)
    with pytest.raises(KeyUnavailable):
        await plain.current_key("acme")
    # An answer is never masked: a revoked key is not served stale.
    upstream.error = UnknownKey("revoked")
    cache = CachingKeyProvider(upstream, max_age=300, clock=clock, stale_if_error=3600)
    upstream.error = None
    kid = ring_doc["owners"]["acme"]["current"]
    await cache.key_by_id("acme", kid)
    upstream.error = UnknownKey("revoked")
    clock.advance(301)
    with pytest.raises(UnknownKey):
        await cache.key_by_id("acme", kid)
    # Nor a key dropped by invalidate (a key-ring file's change is an answer).
    upstream.error = None
    await cache.current_key("acme")
    cache.invalidate()
    upstream.error = KeyUnavailable("down")
    with pytest.raises(KeyUnavailable):
        await cache.current_key("acme")
    assert cache.stale == 0


@pytest.mark.anyio
async def test_an_owner_the_source_gave_a_key_of_lately_and_now_says_it_does_not_know_is_an_outage(
    upstream: CountingProvider, clock: FakeClock
) -> None:
    """A key server restarting answers 404 unknown_owner before its store is loaded: an owner it
    served within the window is ``KeyUnavailable`` (retried), no key served; one it never served,
    or not for longer than the window, is ``UnknownOwner`` (answered ``unknown_owner``)."""
    cache = CachingKeyProvider(upstream, max_age=300, clock=clock, stale_if_error=3600)
    await cache.current_key("acme")
    upstream.error = UnknownOwner("no such owner")
    clock.advance(301)
    # That owner's trouble (BadKeyAnswer: its adds wait in the add retry lane, not in the slots
    # every owner's adds share: an offboarded tenant's backlog held them all for an hour).
    with pytest.raises(BadKeyAnswer, match="restarting"):
        await cache.current_key("acme")
    with pytest.raises(UnknownOwner):
        await cache.current_key("globex")  # never served by this cache
    clock.advance(RESTART_GRACE_S)  # a restart's time past the cached key's age: removed, not restarting
    with pytest.raises(UnknownOwner):
        await cache.current_key("acme")
    assert cache.stale == 0


@pytest.mark.anyio
async def test_an_owner_evicted_from_the_cache_is_still_known_to_have_been_served_lately(
    upstream: CountingProvider, clock: FakeClock
) -> None:
    """The same with more owners than the cache holds: an owner evicted by the others' lookups (a
    fleet serving more owners than BRIDGE_KEY_CACHE_SIZE) was taken for one the source never
    knew, its requests answered ``unknown_owner`` and dead-lettered while the key server restarted
    (found by review, 2026-12-07). Who was served lately is kept apart from the keys."""
    cache = CachingKeyProvider(upstream, max_age=300, clock=clock, stale_if_error=3600, max_entries=1)
    await cache.current_key("acme")
    await cache.current_key("globex")  # acme's key evicted
    assert len(cache) == 1
    upstream.error = UnknownOwner("no such owner")
    clock.advance(5)
    with pytest.raises(BadKeyAnswer, match="restarting"):
        await cache.current_key("acme")
    clock.advance(300 + RESTART_GRACE_S)  # past the window: removed, not restarting
    with pytest.raises(UnknownOwner):
        await cache.current_key("acme")


@pytest.mark.anyio
async def test_an_owner_the_source_refuses_is_not_served_stale(upstream: CountingProvider, clock: FakeClock) -> None:
    """A tenant suspended by disabling its key (the key server answers 403 for that owner only, or
    an unusable entry) must stop sealing and opening: a refusal is an answer, never masked."""
    cache = CachingKeyProvider(upstream, max_age=300, clock=clock, stale_if_error=3600)
    await cache.current_key("acme")
    clock.advance(301)
    upstream.error = BadKeyAnswer("refused for this owner (HTTP 403)")  # stale_ok=False
    with pytest.raises(BadKeyAnswer):
        await cache.current_key("acme")
    upstream.error = KeyUnavailable("HTTP 403", stale_ok=False)
    with pytest.raises(KeyUnavailable):
        await cache.current_key("acme")
    upstream.error = BadKeyAnswer("HTTP 503 for this owner", stale_ok=True)  # an error of the server's own
    assert (await cache.current_key("acme")).owner == "acme"
    assert cache.stale == 1


@pytest.mark.anyio
async def test_waiters_on_a_failing_lookup_get_the_stale_key_too(upstream: CountingProvider, clock: FakeClock) -> None:
    cache = CachingKeyProvider(upstream, max_age=300, clock=clock, stale_if_error=3600)
    key = await cache.current_key("acme")
    clock.advance(301)
    upstream.gate = anyio.Event()
    upstream.error = KeyUnavailable("timed out")
    results: list[OwnerKey] = []

    async def lookup() -> None:
        results.append(await cache.current_key("acme"))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(lookup)
        await anyio.wait_all_tasks_blocked()
        assert len(upstream.calls) == 2, "one upstream call for the three"
        upstream.gate.set()
    assert results == [key, key, key]
    assert cache.coalesced == 2 and len(upstream.calls) == 2


async def _background_lookups_done(cache: CachingKeyProvider) -> None:
    with anyio.fail_after(5):
        await asyncio.gather(*cache._revalidating.values())


@pytest.mark.anyio
async def test_once_served_stale_a_key_is_served_at_once_and_asked_for_in_the_background(
    upstream: CountingProvider, clock: FakeClock
) -> None:
    """A key server that hangs: each retry of the lookup made the requests of that owner wait its
    timeout before the stale key was served. Once an answer was stale, the next misses are served
    at once and the source is asked in the background, one lookup at a time; its answer lands as a
    foreground one would (a key ends the outage, a refusal is heard by the next request)."""
    cache = CachingKeyProvider(upstream, max_age=300, clock=clock, stale_if_error=3600)
    key = await cache.current_key("acme")
    clock.advance(301)
    upstream.error = KeyUnavailable("timed out")
    assert await cache.current_key("acme") == key  # the outage's first request asked and waited
    upstream.gate = anyio.Event()  # the source hangs from now on
    calls = len(upstream.calls)
    with anyio.fail_after(1):
        assert await cache.current_key("acme") == key
        assert await cache.current_key("acme") == key
    await anyio.wait_all_tasks_blocked()
    assert len(upstream.calls) == calls + 1, "one background lookup, none waited on"
    assert cache.stale == 3
    # The source answers a refusal (the tenant suspended meanwhile): the next request hears it.
    upstream.error = KeyUnavailable("HTTP 403", stale_ok=False)
    upstream.gate.set()
    upstream.gate = None
    await _background_lookups_done(cache)
    with pytest.raises(KeyUnavailable, match="403"):
        await cache.current_key("acme")
    # The source answers again: stored, and no longer served stale.
    upstream.error = KeyUnavailable("timed out")
    assert await cache.current_key("acme") == key
    stale = cache.stale
    upstream.error = None
    assert await cache.current_key("acme") == key  # served stale, the background lookup succeeds
    await _background_lookups_done(cache)
    calls = len(upstream.calls)
    assert await cache.current_key("acme") == key
    assert cache.stale == stale + 1 and len(upstream.calls) == calls, "a fresh hit, not stale"


@pytest.mark.anyio
async def test_close_cancels_the_background_lookups(upstream: CountingProvider, clock: FakeClock) -> None:
    cache = CachingKeyProvider(upstream, max_age=300, clock=clock, stale_if_error=3600)
    await cache.current_key("acme")
    clock.advance(301)
    upstream.error = KeyUnavailable("timed out")
    await cache.current_key("acme")
    upstream.gate = anyio.Event()  # never set: the background lookup hangs
    await cache.current_key("acme")
    await anyio.wait_all_tasks_blocked()
    with anyio.fail_after(1):
        await cache.close()


async def _both_slots_served_stale(upstream: CountingProvider, clock: FakeClock) -> tuple[CachingKeyProvider, OwnerKey]:
    """A cache whose two slots of one owner (its current key, that key by id) were served stale: the
    key source timed out past the cache's age. (The cache, the key.)"""
    cache = CachingKeyProvider(upstream, max_age=300, clock=clock, stale_if_error=3600)
    key = await cache.current_key("acme")
    clock.advance(301)
    upstream.error = KeyUnavailable("timed out")
    assert await cache.current_key("acme") == key
    assert await cache.key_by_id("acme", key.key_id) == key
    return cache, key


@pytest.mark.anyio
async def test_a_slot_refreshed_by_another_lookup_is_no_longer_served_stale_at_once(
    upstream: CountingProvider, clock: FakeClock
) -> None:
    """Both of an owner's slots served stale in an outage (its adds' current key, its fetches'
    key by id); the source back, a current-key lookup refreshed the by-id slot too but left it
    flagged: past its age it was served stale at once, with the source healthy, and a refusal
    since was heard only by a later request (a re-review, 2026-12-07)."""
    cache, key = await _both_slots_served_stale(upstream, clock)
    upstream.error = None
    assert await cache.current_key("acme") == key  # stale at once; its background lookup stores both
    await _background_lookups_done(cache)
    clock.advance(301)
    upstream.error = KeyUnavailable("HTTP 403", stale_ok=False)  # the tenant suspended meanwhile
    with pytest.raises(KeyUnavailable, match="403"):
        await cache.key_by_id("acme", key.key_id)


@pytest.mark.anyio
async def test_a_lookup_that_hung_through_the_recovery_does_not_flag_a_fresh_entry_again(
    upstream: CountingProvider, clock: FakeClock
) -> None:
    """A by-id lookup in the background hangs while the source recovers and a current-key lookup
    stores both slots fresh; the hung one then times out and flagged the fresh slot again: past
    its age it was served stale at once, a refusal since unheard (a re-review, 2026-12-07)."""
    cache, key = await _both_slots_served_stale(upstream, clock)
    hung = upstream.gate = anyio.Event()
    assert await cache.key_by_id("acme", key.key_id) == key  # its background lookup hangs
    await anyio.wait_all_tasks_blocked()
    upstream.gate, upstream.error = None, None  # the source back
    assert await cache.current_key("acme") == key  # stale once more; its lookup stores both fresh
    await _background_lookup_of(cache, ("acme", None))
    upstream.error = KeyUnavailable("timed out")
    hung.set()  # the hung lookup ends in its timeout
    await _background_lookups_done(cache)
    clock.advance(301)
    upstream.error = KeyUnavailable("HTTP 403", stale_ok=False)
    with pytest.raises(KeyUnavailable, match="403"):
        await cache.key_by_id("acme", key.key_id)


async def _background_lookup_of(cache: CachingKeyProvider, slot: tuple[str, str | None]) -> None:
    task = cache._revalidating.get(slot)
    if task is not None:
        with anyio.fail_after(5):
            await asyncio.gather(task)


@pytest.mark.parametrize(
    "owner_doc",
    [
        {"current": "k20250101-ab12cd34", "keys": {_GOOD: "k20250101-ab12cd34"}},  # id and secret swapped
        {"current": _GOOD, "keys": {"k1": base64.b64encode(b"\x08" * 32).decode()}},  # the secret as `current`
        {"current": _GOOD.rstrip("="), "keys": {"k1": base64.b64encode(b"\x08" * 32).decode()}},  # unpadded
    ],
)
def test_a_mistaken_keyring_entry_never_prints_a_secret(tmp_path: Path, owner_doc: dict[str, Any]) -> None:
    """A key id is printed in the file's errors (logs, the CLI); a secret pasted where an id goes
    was printed with it (found by review, 2026-12-07): an id that is itself a key is shown redacted."""
    from bridge.crypto import keyring_file

    path = tmp_path / "ring.json"
    path.write_text(json.dumps({"owners": {"acme": owner_doc}}))
    with pytest.raises(ValueError, match="redacted") as raised:
        keyring_file.load_keyring(path)
    assert _GOOD not in str(raised.value) and _GOOD.rstrip("=") not in str(raised.value)


def test_a_secret_given_twice_as_a_name_is_not_printed(tmp_path: Path) -> None:
    """A swapped id and secret copied in a hand edit: the duplicate name is the secret."""
    from bridge.crypto import keyring_file

    path = tmp_path / "ring.json"
    entry = f'"{_GOOD}": "k20250101-ab12cd34"'
    path.write_text('{"owners": {"acme": {"current": "k1", "keys": {' + entry + ", " + entry + "}}}}")
    with pytest.raises(ValueError, match="redacted") as raised:
        keyring_file.load_keyring(path)
    assert _GOOD.rstrip("=")[:32] not in str(raised.value)


def test_a_long_hex_key_id_is_shown_in_errors(tmp_path: Path) -> None:
    """Key ids are free-form: a SHA-256 fingerprint as one is shown, not taken for a secret."""
    from bridge.crypto import keyring_file

    fingerprint = "ab" * 32
    path = tmp_path / "ring.json"
    path.write_text(json.dumps({"owners": {"acme": {"current": fingerprint, "keys": {"k1": _GOOD}}}}))
    with pytest.raises(ValueError, match=f"current key id '{fingerprint}' is missing"):
        keyring_file.load_keyring(path)
