"""The README's Python examples are code users copy: each must at least compile (top-level await
allowed, as in an asyncio REPL or notebook)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_python_block_of_the_readme_compiles() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has Python examples"
    for block in blocks:
        compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_the_readme_calls_only_methods_of_the_clients_classes() -> None:
    """``task.x(...)``, ``worker.x(...)``, ``engine.x(...)`` in the examples name methods of
    Task, Worker and Engine, and ``task.x`` without a call is no method left uncalled: the worker
    loop once called ``task.lease_expired()``, a property, and crashed on the blip it handled."""
    from bridge.client import Engine, Worker
    from bridge.client.rpc import Task

    classes = {"task": Task, "worker": Worker, "engine": Engine}
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    checked = 0
    for block in blocks:
        tree = ast.parse(block)
        called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
                continue
            cls = classes.get(node.value.id)
            if cls is None:
                continue
            member = getattr(cls, node.attr, None)
            assert member is not None or node.attr in cls.__init__.__code__.co_names, f"{cls.__name__}.{node.attr}"
            if id(node) in called:
                assert callable(member) and not isinstance(member, property), f"{cls.__name__}.{node.attr} is no method"
            checked += 1
    assert checked > 5
