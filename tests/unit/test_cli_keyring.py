"""``queue-bridge keyring``: what it refuses to do to a live key-ring, and its lock."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from bridge.cli import app
from bridge.crypto import generate_keyring, write_keyring
from tests.conftest import ROOT


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    path = tmp_path / "ring.json"
    write_keyring(path, generate_keyring(["alpha", "beta"]))
    return path


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_generate_force_refuses_to_replace_a_live_key_ring(ring: Path) -> None:
    """--force replaced a live key-ring: every key in it, and every task sealed with one, lost."""
    before = ring.read_bytes()
    code, out = _invoke("keyring", "generate", str(ring), "--owner", "gamma", "--force")
    assert code == 1, out
    assert "2 owner(s) and 2 key(s)" in out and "--destroy-existing-keys" in out
    assert ring.read_bytes() == before


def test_generate_force_refuses_to_replace_a_key_ring_with_one_broken_entry(ring: Path) -> None:
    """A hand edit broke one owner's secret (the bridges kept their old keys), and ``--force``
    took the file for "not a key-ring" and replaced it: every other key in it lost for good (found
    by review, 2026-12-07)."""
    doc = json.loads(ring.read_text())
    alpha = doc["owners"]["alpha"]
    alpha["keys"][alpha["current"]] = "not base64 !"
    ring.write_text(json.dumps(doc))
    before = ring.read_bytes()
    code, out = _invoke("keyring", "generate", str(ring), "--owner", "gamma", "--force")
    assert code == 1, out
    assert "--destroy-existing-keys" in out and "owners" in out
    assert ring.read_bytes() == before


def test_generate_force_refuses_to_replace_a_key_ring_a_hand_edit_left_unparsable(ring: Path) -> None:
    """A trailing comma made the key-ring invalid JSON (the bridges kept their keys), and
    ``--force`` took it for "not a key-ring" (found by re-review, 2026-12-07)."""
    broken = ring.read_text().rstrip().removesuffix("}") + ",}"
    ring.write_text(broken)
    code, out = _invoke("keyring", "generate", str(ring), "--owner", "gamma", "--force")
    assert code == 1, out
    assert "--destroy-existing-keys" in out
    assert ring.read_text() == broken


def test_generate_destroy_existing_keys_replaces_it_keeping_a_backup(ring: Path) -> None:
    before = ring.read_bytes()
    code, out = _invoke("keyring", "generate", str(ring), "--owner", "gamma", "--destroy-existing-keys")
    assert code == 0, out
    assert set(json.loads(ring.read_text())["owners"]) == {"gamma"}
    assert ring.with_name("ring.json.bak").read_bytes() == before


def test_generate_force_replaces_a_file_that_is_no_key_ring(tmp_path: Path) -> None:
    path = tmp_path / "ring.json"
    path.write_text("{}\n")
    code, out = _invoke("keyring", "generate", str(path), "--owner", "gamma", "--force")
    assert code == 0, out
    assert set(json.loads(path.read_text())["owners"]) == {"gamma"}


def test_rotate_refuses_an_owner_not_in_the_file_without_create(ring: Path) -> None:
    """A typo in --owner silently made a new owner, and the owner meant kept its old key."""
    before = ring.read_bytes()
    code, out = _invoke("keyring", "rotate", str(ring), "--owner", "alpah")
    assert code == 1, out
    assert "no owner 'alpah'" in out and "alpha, beta" in out and "--create" in out
    assert ring.read_bytes() == before
    code, out = _invoke("keyring", "rotate", str(ring), "--owner", "gamma", "--create")
    assert code == 0, out
    assert set(json.loads(ring.read_text())["owners"]) == {"alpha", "beta", "gamma"}


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.anyio
async def test_rotate_waits_for_the_lock_of_another_keyring_command(ring: Path) -> None:
    """Two rotations at once each read the file and wrote it back with their own key: the first
    one's key was lost. A rotation waits while another command holds the lock beside the file."""
    before = _bytes(ring)
    lock = os.open(ring.with_name("ring.json.lock"), os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    argv = [sys.executable, "-m", "bridge", "keyring", "rotate", str(ring), "--owner", "alpha"]
    try:
        async with await anyio.open_process(argv, cwd=ROOT) as proc:
            assert proc.stderr is not None
            with anyio.fail_after(30):
                said = b""
                async for chunk in proc.stderr:  # until it says it waits (or exits without waiting)
                    said += chunk
                    if b"waiting for the lock" in said:
                        break
                assert b"waiting for the lock" in said, (said, proc.returncode)
                assert _bytes(ring) == before, "it wrote while another command held the lock"
                fcntl.flock(lock, fcntl.LOCK_UN)
                assert await proc.wait() == 0
    finally:
        os.close(lock)
    alpha = json.loads(_bytes(ring))["owners"]["alpha"]
    assert len(alpha["keys"]) == 2


def test_generate_force_over_a_placeholder_is_not_readable_by_others(tmp_path: Path) -> None:
    """A placeholder made by ``touch`` (0644) passed its mode to the new key-ring, and every
    rotation after kept it: every owner's keys readable by every local user. Its group keeps
    reading (a bridge may read the key-ring through its group)."""
    path = tmp_path / "ring.json"
    path.touch()
    os.chmod(path, 0o644)
    code, out = _invoke("keyring", "generate", str(path), "--owner", "alpha", "--force")
    assert code == 0, out
    assert path.stat().st_mode & 0o777 == 0o640
    code, out = _invoke("keyring", "rotate", str(path), "--owner", "alpha")
    assert code == 0, out
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_key_ring_readable_by_everyone_is_warned_about(ring: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bridge.crypto import KeyringFileProvider

    KeyringFileProvider(ring)
    assert "readable by every local user" not in caplog.text
    os.chmod(ring, 0o644)
    KeyringFileProvider(ring)
    assert "readable by every local user" in caplog.text


def test_a_key_id_given_twice_is_refused_not_the_last_one_kept(ring: Path) -> None:
    """JSON readers keep the last of two equal names: a line copied by hand without its id changed
    gave the id a new secret, and the tasks sealed under the old one were condemned as tampered."""
    from bridge.crypto import KeyringFileProvider

    doc = json.loads(ring.read_text())
    key_id, secret = next(iter(doc["owners"]["alpha"]["keys"].items()))
    other = generate_keyring(["x"])["owners"]["x"]["keys"]
    twice = json.dumps(doc).replace(
        f'"{key_id}": "{secret}"', f'"{key_id}": "{secret}", "{key_id}": "{next(iter(other.values()))}"'
    )
    assert twice.count(key_id) >= 3
    ring.write_text(twice)
    with pytest.raises(ValueError, match="appears twice"):
        KeyringFileProvider(ring)


def test_rotate_refuses_a_key_ring_naming_a_key_id_twice(ring: Path) -> None:
    """rotate read the file leniently: the last of two secrets under one id won and was written
    back clean, and the bridges (which refuse the duplicate) then loaded it, condemning the tasks
    sealed under the first secret."""
    doc = json.loads(ring.read_text())
    key_id, secret = next(iter(doc["owners"]["alpha"]["keys"].items()))
    wrong = next(iter(generate_keyring(["x"])["owners"]["x"]["keys"].values()))
    twice = json.dumps(doc).replace(f'"{key_id}": "{secret}"', f'"{key_id}": "{secret}", "{key_id}": "{wrong}"')
    ring.write_text(twice)
    code, out = _invoke("keyring", "rotate", str(ring), "--owner", "alpha")
    assert code == 1 and "appears twice" in out, out
    assert ring.read_text() == twice


def test_a_staged_key_opens_tasks_and_seals_none_until_promoted(ring: Path) -> None:
    """Rotation in a fleet: the kubelet (or configuration management) brings a changed key-ring to
    each host at its own moment, and a task sealed with a key the fetching bridge has not loaded
    yet waited out its whole lease. A staged key is in every bridge's file before any bridge
    seals with it. Found by review, 2026-12-06."""
    from bridge.crypto import KeyringFileProvider

    before = json.loads(ring.read_text())["owners"]["alpha"]["current"]
    code, out = _invoke("keyring", "rotate", str(ring), "--owner", "alpha", "--stage")
    assert code == 0, out
    staged = next(k for k in json.loads(ring.read_text())["owners"]["alpha"]["keys"] if k != before)
    assert f"promote {ring} --owner alpha {staged}" in out

    async def keys() -> tuple[str, str]:
        provider = KeyringFileProvider(ring)
        current = await provider.current_key("alpha")
        opened = await provider.key_by_id("alpha", staged)
        return current.key_id, opened.key_id

    assert anyio.run(keys) == (before, staged)  # opens with it, still seals with the old key
    code, out = _invoke("keyring", "promote", str(ring), "--owner", "alpha", staged)
    assert code == 0, out
    assert anyio.run(keys) == (staged, staged)
    assert before in json.loads(ring.read_text())["owners"]["alpha"]["keys"]  # old tasks stay readable


@pytest.mark.parametrize(("owner", "key"), [("alpha", "k-nope"), ("nobody", None)])
def test_promote_refuses_a_key_or_owner_not_in_the_file(ring: Path, owner: str, key: str | None) -> None:
    before = ring.read_bytes()
    key_id = key or json.loads(ring.read_text())["owners"]["alpha"]["current"]
    result = CliRunner().invoke(app, ["keyring", "promote", str(ring), "--owner", owner, key_id])
    assert result.exit_code == 1
    assert (f"no key {key_id!r}" if key else f"no owner {owner!r}") in result.output
    assert ring.read_bytes() == before
