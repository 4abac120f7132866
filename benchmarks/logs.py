"""Reading the bridges' JSON logs: warning/error counts, and when the scheduler re-exposed a task."""

from __future__ import annotations

import collections
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

_REEXPOSED = re.compile(r"lease of task (\S+) \(epoch (\d+)\) expired: re-exposed")
_NORMALIZE = (
    (re.compile(r"amq\.rabbitmq\.reply-to\.\S+"), "amq.rabbitmq.reply-to.*"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\b\d+(\.\d+)?\b"), "N"),
)


def events(paths: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _norm(message: str) -> str:
    for pattern, repl in _NORMALIZE:
        message = pattern.sub(repl, message)
    return message[:140]


def summarize(paths: list[Path], top: int = 5) -> dict[str, Any]:
    levels: collections.Counter[str] = collections.Counter()
    messages: collections.Counter[str] = collections.Counter()
    connection = 0
    for ev in events(paths):
        level = str(ev.get("level", "?")).lower()
        levels[level] += 1
        if level in ("warning", "error", "critical"):
            text = str(ev.get("event", ""))
            messages[f"{level}: {_norm(text)}"] += 1
            connection += "connect" in text.lower()
    return {"levels": dict(levels), "top": messages.most_common(top), "connection_errors": connection}


def reexposed_at(paths: list[Path]) -> dict[str, float]:
    """task id -> wall-clock time (epoch seconds) at which a scheduler logged its re-exposure."""
    out: dict[str, float] = {}
    for ev in events(paths):
        text = str(ev.get("event", ""))
        if "re-exposed" not in text or "timestamp" not in ev:
            continue
        # "lease expired: task re-exposed" with a task_id field, or the id inside the message
        m = _REEXPOSED.search(text)
        task_id = str(ev["task_id"]) if ev.get("task_id") else (m.group(1) if m else None)
        if task_id is None:
            continue
        try:
            ts = datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        out.setdefault(task_id, ts)
    return out
