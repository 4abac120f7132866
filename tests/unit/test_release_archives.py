"""The earlier releases the rolling-upgrade tests run ship as tarballs (tests/releases/): each must
be exactly that release's ``bridge`` package, as git has it."""

from __future__ import annotations

import io
import lzma
import subprocess
import tarfile

import pytest

from tests.integration.test_rolling_upgrade import OLDER, PREVIOUS, RELEASES, ROOT


def _files(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        out: dict[str, bytes] = {}
        for m in tar.getmembers():
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
        return out


@pytest.mark.parametrize("rev", [PREVIOUS, OLDER])
def test_each_release_the_upgrade_tests_run_is_shipped(rev: str) -> None:
    shipped = _files(lzma.decompress((RELEASES / f"{rev}.tar.xz").read_bytes()))
    assert "bridge/__init__.py" in shipped and "bridge/app.py" in shipped
    assert all(name.startswith("bridge/") for name in shipped)


@pytest.mark.parametrize("rev", [PREVIOUS, OLDER])
def test_a_shipped_release_is_that_revisions_bridge_package(rev: str) -> None:
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{rev}^{{commit}}"], capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"revision {rev} is not in this clone's history: the tarball cannot be compared")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "bridge"], capture_output=True, check=True)
    assert _files(lzma.decompress((RELEASES / f"{rev}.tar.xz").read_bytes())) == _files(archive.stdout)
