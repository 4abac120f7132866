"""Running the ``queue-bridge`` command line as real subprocesses (``python -m bridge ...``).

Each subprocess costs about a second of start-up, so independent invocations run in parallel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import anyio
import anyio.abc

from tests.conftest import ROOT


async def cli(
    *args: str, env: dict[str, str], extra: dict[str, str] | None = None, limit: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bridge ARGS`` with os.environ + env (+ extra); never raises on a non-zero exit.
    Fails the test if it takes over ``limit`` seconds."""
    full_env = {**os.environ, **env, **(extra or {})}
    full_env.pop("COLUMNS", None)
    full_env["COLUMNS"] = "200"  # wide help and error boxes: messages are not wrapped mid-phrase
    argv = [sys.executable, "-m", "bridge", *args]
    async with await anyio.open_process(argv, env=full_env, cwd=ROOT) as proc:
        try:
            with anyio.fail_after(limit):
                out, err = await _communicate(proc)
        finally:
            # A command that overran its limit (a `run` that did not exit, under a test that
            # expected it to) is killed, not left running as an orphan that keeps consuming.
            if proc.returncode is None:
                proc.kill()
                with anyio.CancelScope(shield=True):
                    await proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


async def _communicate(proc: anyio.abc.Process) -> tuple[bytes, bytes]:
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    async def drain(stream: anyio.abc.ByteReceiveStream | None, into: list[bytes]) -> None:
        if stream is not None:
            async for chunk in stream:
                into.append(chunk)

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain, proc.stdout, chunks["out"])
        tg.start_soon(drain, proc.stderr, chunks["err"])
        await proc.wait()
    return b"".join(chunks["out"]), b"".join(chunks["err"])


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
