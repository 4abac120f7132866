"""Running the ``queue-bridge`` command line as real subprocesses (``python -m bridge ...``).

Each subprocess costs about a second of start-up, so independent invocations run in parallel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import anyio

from tests.conftest import ROOT


async def cli(
    *args: str, env: dict[str, str], extra: dict[str, str] | None = None, limit: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bridge ARGS`` with os.environ + env (+ extra); never raises on a non-zero exit.
    Fails the test if it takes over ``limit`` seconds."""
    full_env = {**os.environ, **env, **(extra or {})}
    full_env.pop("COLUMNS", None)
    full_env["COLUMNS"] = "200"  # wide help and error boxes: messages are not wrapped mid-phrase
    with anyio.fail_after(limit):
        proc = await anyio.run_process([sys.executable, "-m", "bridge", *args], env=full_env, cwd=ROOT, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


async def cli_many(*calls: tuple[tuple[str, ...], dict[str, str]], env: dict[str, str]) -> list[Any]:
    """Run several independent CLI invocations in parallel, results in order."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int, args: tuple[str, ...], extra: dict[str, str]) -> None:
        results[i] = await cli(*args, env=env, extra=extra)

    async with anyio.create_task_group() as tg:
        for i, (args, extra) in enumerate(calls):
            tg.start_soon(one, i, args, extra)
    return results


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
