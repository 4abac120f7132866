"""``queue-bridge gateway-key --keys-file``: how it replaces the keys file the bridge reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge.cli import app


def _add_key(path: Path, owner: str) -> None:
    result = CliRunner().invoke(app, ["gateway-key", "--owner", owner, "--keys-file", str(path)])
    assert result.exit_code == 0, result.output


def test_a_leftover_temporary_file_does_not_give_the_keys_file_its_mode(tmp_path: Path) -> None:
    """The fixed ``<name>.tmp`` was opened with O_TRUNC: a leftover one (a crashed run) kept its
    mode, 0644 here, and the keys file became readable by everyone."""
    path = tmp_path / "keys.json"
    _add_key(path, "tenant-a")
    assert path.stat().st_mode & 0o777 == 0o600
    leftover = tmp_path / "keys.json.tmp"
    leftover.write_text("[]")
    os.chmod(leftover, 0o644)
    _add_key(path, "tenant-b")
    assert path.stat().st_mode & 0o777 == 0o600
    assert [e["owner"] for e in json.loads(path.read_text())] == ["tenant-a", "tenant-b"]


def test_the_keys_file_keeps_its_mode_and_a_symlink_stays_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "real-keys.json"
    _add_key(target, "tenant-a")
    os.chmod(target, 0o640)
    link = tmp_path / "keys.json"
    link.symlink_to(target)
    _add_key(link, "tenant-b")
    assert link.is_symlink()
    assert target.stat().st_mode & 0o777 == 0o640
    assert [e["owner"] for e in json.loads(target.read_text())] == ["tenant-a", "tenant-b"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_run_as_root_the_keys_file_keeps_its_owner(tmp_path: Path) -> None:
    """Replaced by root with a 0600 file of root's, the bridge (uid 10001) could not read it."""
    path = tmp_path / "keys.json"
    _add_key(path, "tenant-a")
    os.chown(path, 10001, 10001)
    _add_key(path, "tenant-b")
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (10001, 10001, 0o600)
