"""``make run``'s script (examples/run_demo.py) fills in only what the user did not set, in the
environment or in the ``.env`` file the settings read."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _demo() -> Any:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return importlib.import_module("run_demo")
    finally:
        sys.path.remove(str(ROOT / "examples"))


def test_the_demo_leaves_what_a_dotenv_sets_and_warns_of_a_misspelt_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It set its defaults in the environment, which outranks `.env`: a `.env` naming another
    broker was silently replaced by 127.0.0.1, and one naming a key server met the forced key-ring
    (`make run` set BRIDGE_KEYRING itself): "set BRIDGE_KEYRING or BRIDGE_KEY_SERVER_URL, not
    both", exit 2. A misspelt name went unreported (found by review, 2026-12-07)."""
    demo = _demo()
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "BRIDGE_AMQP_URL=amqp://me:pw@rabbit.dev:5672/\n"
        "BRIDGE_KEY_SERVER_URL=https://keys.example/\n"
        "BRIDGE_CASANDRA_HOSTS=cass.dev\n"
    )
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")})
    demo.default_environment()
    assert "BRIDGE_AMQP_URL" not in os.environ, "the .env's broker must stand"
    assert "BRIDGE_KEYRING" not in os.environ, "a key server is configured: no key-ring"
    assert os.environ["BRIDGE_HTTP_PORT"] == "8080" and os.environ["BRIDGE_TRUSTED_USERS"] == "engine"
    out = capsys.readouterr()
    assert "BRIDGE_CASANDRA_HOSTS is not a setting" in out.out + out.err


def test_the_make_run_recipe_does_not_force_a_key_ring() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "BRIDGE_KEYRING" not in recipe, recipe
