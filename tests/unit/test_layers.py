"""The domain stands on its own: it imports nothing from storage, transport or their drivers.

Two checks: a walk of the import statements (everything ``bridge.domain`` imports, and what those
modules import in turn, inside the package), and a fresh interpreter that imports every domain
module and then looks at ``sys.modules`` (which also catches imports hidden in functions).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = ROOT / "bridge"
FORBIDDEN = ("bridge.storage", "bridge.transport", "bridge.cli", "bridge.app", "cassandra", "aio_pika", "aiormq")


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "bridge":
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _domain_modules() -> list[str]:
    return sorted(
        "bridge.domain" + ("" if p.stem == "__init__" else f".{p.stem}") for p in (BRIDGE / "domain").glob("*.py")
    )


def test_the_domain_imports_nothing_from_storage_transport_or_drivers() -> None:
    seen: set[str] = set()
    chains: dict[str, str] = {m: m for m in _domain_modules()}
    todo = list(chains)
    bad: list[str] = []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        for imported in _imports(path):
            chain = f"{chains[name]} -> {imported}"
            if imported.startswith(FORBIDDEN):
                bad.append(chain)
            elif imported.startswith("bridge.") and imported not in chains:
                chains[imported] = chain
                todo.append(imported)
    assert bad == [], "the domain reaches outside its layer:\n" + "\n".join(sorted(bad))
    assert {"bridge.domain.queue", "bridge.domain.store", "bridge.crypto"} <= seen, "the walk followed nothing"


def test_importing_the_domain_loads_no_driver() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {_domain_modules()!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert "bridge.domain.queue" in loaded
    assert [m for m in loaded if m.startswith(FORBIDDEN)] == []
