"""The examples (examples/engine.py, worker.py, run_demo.py) against the real servers.

engine.main and worker.main run in-process against the ``bridge`` fixture; run_demo.py --once
runs as a real process (what `make run` starts), with its own exchange and queue names.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import ENGINE_USER, OWNERS, ROOT, Servers, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

EXAMPLES = ROOT / "examples"


def _load(name: str) -> ModuleType:
    """Import examples/<name>.py (examples/ is a directory of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"qb_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


engine_example = _load("engine")
worker_example = _load("worker")


async def test_engine_and_two_workers(bridge: Any, servers: Servers, names: dict[str, str]) -> None:
    service = service_id()
    exchange = names["exchange"]
    lines: list[str] = []
    results: dict[int, dict[str, Any]] = {}
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(
            worker_example.main(
                servers.amqp_url(OWNERS[0]),
                service=service,
                exchange=exchange,
                worker_id=f"test-worker-{i}",
                max_tasks=0,
                stop=stop,
                work_time=(0.0, 0.02),
                wait_timeout=10,
                log=lambda line, i=i: lines.append(f"[worker-{i}] {line}"),
            )
        )
        for i in (1, 2)
    ]
    try:
        rc = await asyncio.wait_for(
            engine_example.main(
                servers.amqp_url(ENGINE_USER),
                owner=OWNERS[0],
                service=service,
                exchange=exchange,
                results_queue=names["queue_prefix"] + ".results",
                count=15,
                timeout=60,
                results=results,
                log=lambda line: lines.append(f"[engine] {line}"),
            ),
            90,
        )
    finally:
        stop.set()
        worker_codes = await asyncio.wait_for(asyncio.gather(*workers), 30)
    output = "\n".join(lines)

    assert rc == 0, output
    assert worker_codes == [0, 0], output
    assert sorted(results) == list(range(1, 16)), output
    failed = {n for n, body in results.items() if "error" in body}
    assert failed == {7, 14}, output  # every 7th task fails on purpose
    for n, body in results.items():
        assert body["token"]["n"] == n
        assert body["serviceId"] == service
        if n not in failed:
            assert body["result"]["text"] == f"HELLO FROM TASK {n}"
        else:
            assert "failed on purpose" in body["error"]["message"]
    result_lines = [line for line in lines if line.startswith("[engine] result for task ")]
    assert len(result_lines) == 15, output
    assert sum(": error " in line for line in result_lines) == 2, output
    assert "[engine] all 15 results arrived" in output


@pytest.mark.parametrize("bridge_user", ["queue-bridge", "guest"])
async def test_run_demo_once(bridge_env: dict[str, str], tmp_path: Path, servers: Servers, bridge_user: str) -> None:
    """`make run`'s script, --once: its own bridge, two workers and the engine, exit 0. Also with
    the bridge as another broker user (a .env's BRIDGE_AMQP_URL, which the demo now keeps): its
    engine took only results published by queue-bridge, and dropped every one (found by review,
    2026-12-07)."""
    # bridge_env names this test's own exchange and queues (deleted after the test); no bridge
    # fixture runs here, the demo starts its own.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "QB_"))},
        **bridge_env,
        "BRIDGE_AMQP_URL": servers.amqp_url(bridge_user),
        "BRIDGE_HTTP_PORT": "0",
        "QB_COUNT": "5",
        "QB_SERVICE": service_id(),
        "QB_TIMEOUT": "30",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "run_demo.py"),
        "--once",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        pytest.fail("run_demo.py --once did not exit within 90 s:\n" + out.decode(errors="replace"))
    output = out.decode(errors="replace")
    (tmp_path / "run_demo.log").write_text(output)

    assert proc.returncode == 0, output
    assert "bridge ready (http off)" in output, output
    numbers = sorted(int(n) for n in re.findall(r"\[engine \+[\d.]+s\] result for task (\d+):", output))
    assert numbers == [1, 2, 3, 4, 5], output
    assert "all 5 results arrived" in output, output
