"""The processes a benchmark run starts (bridges, the echo server) and what /proc says about them."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcessFailed(RuntimeError):
    pass


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def status_kib(pid: int, field: str = "VmRSS") -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS: resident now; VmHWM: resident peak)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds (threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _cmdlines() -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        out.append((int(entry.name), raw.replace(b"\0", b" ").decode(errors="replace")))
    return out


def server_pids() -> dict[str, int]:
    """Cassandra's JVM and RabbitMQ's Erlang VM on this machine, found by command line (read only;
    the local stack may have been started from another state directory, so pid files are not
    reliable). Absent if not found."""
    out: dict[str, int] = {}
    for pid, cmd in _cmdlines():
        if "org.apache.cassandra.service.CassandraDaemon" in cmd:
            out.setdefault("cassandra", pid)
        elif "beam.smp" in cmd and "-s rabbit boot" in cmd:  # not rabbitmqctl's short-lived VM
            out.setdefault("rabbitmq", pid)
    return out


class CpuMeter:
    """CPU used by named processes between start() and stop(), as % of one core."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._c0: dict[str, float] = {}
        self.vanished: set[str] = set()  # a process exited (a server restarted?) during the phase

    def _now(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pids in self.pids.items():
            total = 0.0
            for pid in pids:
                if pid == os.getpid():
                    t = os.times()
                    total += t.user + t.system
                else:
                    secs = cpu_seconds(pid)
                    if secs is None:
                        self.vanished.add(name)
                    total += secs or 0.0
            out[name] = total
        return out

    def start(self) -> CpuMeter:
        self._t0 = time.perf_counter()
        self._c0 = self._now()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t0
        c1 = self._now()
        if wall <= 0:
            return {}
        return {
            name: math.nan if name in self.vanished else round(100.0 * (c1[name] - self._c0.get(name, 0.0)) / wall, 1)
            for name in c1
        }


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_rss_mib: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mib(self) -> float | None:
        kib = status_kib(self.pid)
        return None if kib is None else kib / 1024.0

    def hwm_mib(self) -> float | None:
        kib = status_kib(self.pid, "VmHWM")
        return None if kib is None else kib / 1024.0

    def check(self) -> None:
        if not self.alive():
            raise ProcessFailed(
                f"{self.name} exited with {self.proc.returncode}; "
                f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
            )

    async def wait_for_line(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            try:
                if needle in self.log_path.read_text(errors="replace"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ProcessFailed(
                    f"{self.name} not ready after {timeout:.0f}s; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            await asyncio.sleep(0.1)

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
            except TimeoutError:
                self.proc.kill()
        return self.proc.wait(10)


def spawn(name: str, argv: list[str], env: dict[str, str], log_path: Path) -> Managed:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, stdin=subprocess.DEVNULL
        )
    return Managed(name, proc, log_path)


def bridge_argv(profile_out: Path | None = None, clock: str = "wall") -> list[str]:
    if profile_out is None:
        return [sys.executable, "-m", "bridge", "run"]
    if clock == "cpu":
        return [sys.executable, "-m", "benchmarks.cpuprofile", str(profile_out)]
    return [sys.executable, "-m", "cProfile", "-o", str(profile_out), "-m", "bridge", "run"]


async def start_bridge(
    name: str, env: dict[str, str], log_path: Path, profile_out: Path | None = None, clock: str = "wall"
) -> Managed:
    m = spawn(name, bridge_argv(profile_out, clock), env, log_path)
    try:
        await m.wait_for_line("bridge started", timeout=90)
    except BaseException:
        await m.stop(5)
        raise
    return m


async def start_echo(env: dict[str, str], log_path: Path) -> Managed:
    m = spawn("echo", [sys.executable, "-m", "benchmarks.echo"], env, log_path)
    try:
        await m.wait_for_line("echo ready", timeout=30)
    except BaseException:
        await m.stop(5)
        raise
    return m


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so read after the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 else None


def _ours(pid: int, me: int) -> bool:
    """Whether ``pid`` descends from this process (its bridges, echo server, profiled bridges)."""
    for _ in range(16):  # (a bounded walk: a process tree is shallow)
        parent = _parent_of(pid)
        if parent is None or parent <= 1:
            return False
        if parent == me:
            return True
        pid = parent
    return False


def other_activity() -> list[str]:
    """Other bridges, benchmark runs or test runs on this machine (they share the 2 cores: the
    figures get noisy). Every benchmark module counts (``benchmarks.fleet``, ``lifecycle``,
    ``redelivery``, ``gateway``, ``drivers`` as well as ``run``): only ``run`` did, and another
    run's profiled bridges (``benchmarks.cpuprofile``) were taken for this run's own. This run's
    own processes are those that descend from it."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmd = " ".join(a.decode(errors="replace") for a in argv if a)
        if not ("-m bridge run" in cmd or "pytest" in cmd or "benchmarks." in cmd):
            continue
        if int(entry.name) == os.getppid() or _ours(int(entry.name), me):
            continue
        found.append(f"{entry.name}: {cmd[:100]}")
    return found
