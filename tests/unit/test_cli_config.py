"""``queue-bridge config``: what it shows of the RabbitMQ URL."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bridge.cli import app


def _config(monkeypatch: pytest.MonkeyPatch, url: str) -> dict[str, object]:
    monkeypatch.setenv("BRIDGE_AMQP_URL", url)
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert "s3cr3t" not in result.stdout
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def test_config_shows_the_amqp_url_with_only_its_password_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """It showed stars only: an operator could not see which broker, vhost and user a bridge used."""
    shown = _config(monkeypatch, "amqps://ops:s3cr3t@rabbit.example:5671/prod?heartbeat=30")
    assert shown["BRIDGE_AMQP_URL"] == "amqps://ops:**********@rabbit.example:5671/prod?heartbeat=30"


def test_config_masks_a_password_with_url_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _config(monkeypatch, "amqp://ops:s3cr3t%40x%3Ay@[::1]:5672/%2F")
    assert shown["BRIDGE_AMQP_URL"] == "amqp://ops:**********@[::1]:5672/%2F"
