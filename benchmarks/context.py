"""One benchmark run: its names, its keyspace, its processes, and what it has measured so far."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika

from benchmarks import serverside
from benchmarks.procs import CpuMeter, Managed, server_pids, start_bridge, start_echo
from benchmarks.progress import say
from benchmarks.stats import Figure, Sample, Target
from bridge.config import Settings
from bridge.crypto import generate_keyring, write_keyring
from bridge.storage.session import open_session

HOST = "127.0.0.1"  # benchmarks never target anything else
KEYSPACE = "qb_bench"
ENGINE_USER = "engine"
OWNER = "worker-a"
CASSANDRA_REQUESTS = "queue_bridge_cassandra_requests"  # the bridges' counter, by statement (a batch: 1)
CASSANDRA_STATEMENTS = "queue_bridge_cassandra_statements"  # by statement, each member of a batch counted
CQL_PORT = 9042
OWNERS = ("engine", "worker-a", "worker-b", "guest")

# Tables for B-lwt and B-write, shaped like the bridge's `leases` and `ready` rows.
BENCH_TABLES = (
    """CREATE TABLE IF NOT EXISTS {ks}.bench_lwt (
        owner text, service text, task_id timeuuid, state text, epoch int, worker text,
        lease_until timestamp, claim_id uuid,
        PRIMARY KEY ((owner, service, task_id)))""",
    """CREATE TABLE IF NOT EXISTS {ks}.bench_write (
        owner text, service text, lane tinyint, bucket bigint, seq timeuuid, task_id timeuuid,
        key_id text, value_nonce blob, value_ct blob, created_at timestamp,
        PRIMARY KEY ((owner, service, lane, bucket), seq))""",
)


class StackDown(RuntimeError):
    pass


Labels = tuple[tuple[str, str], ...]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ([^ ]+)(?: [0-9]+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(texts: Iterable[str]) -> dict[tuple[str, Labels], float]:
    """Samples of Prometheus text pages, summed over the pages by name (``_total`` dropped) and
    labels (sorted); the ``_created`` timestamps are not counts and are left out."""
    out: dict[tuple[str, Labels], float] = {}
    for text in texts:
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue
            name = m.group(1)
            if name.endswith("_created"):
                continue
            name = name.removesuffix("_total")
            labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
            out[(name, labels)] = out.get((name, labels), 0.0) + float(m.group(3))
    return out


@dataclass
class Scrape:
    """One scrape of the running bridges' /metrics, every sample kept with its labels."""

    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)
    answered: int = 0  # bridges whose /metrics answered
    asked: int = 0

    def __bool__(self) -> bool:
        return bool(self.samples)

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (all of them without)."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= set(ls))

    def by(self, name: str, label: str) -> dict[str, float]:
        """``name``'s samples summed by the value of one label."""
        out: dict[str, float] = {}
        for (n, ls), v in self.samples.items():
            if n == name:
                key = dict(ls).get(label, "")
                out[key] = out.get(key, 0.0) + v
        return out


@dataclass
class Plan:
    """How much of everything a run does (the default run and ``--quick`` differ only here)."""

    quick: bool
    base_seq: int  # sequential (single-request) operations per baseline
    base_conc: int  # operations per baseline at the workloads' concurrency
    add_seq: int  # sequential adds (latency)
    adds: int  # pipelined adds (throughput); they also fill W-cycle's queue
    add_window: int
    cycle_seq: int  # sequential fetch/ack cycles (latency) before W-cycle's 16 workers
    workers: int
    e2e_rates: tuple[int, ...]
    e2e_seconds: float
    recover_tasks: int
    recover_ttr_ms: int
    scale_bridges: tuple[int, ...]
    scale_tasks: int
    memory_tasks: int
    memory_repeat_tasks: int
    caps: dict[str, float] = field(default_factory=dict)  # seconds, per phase
    # W-scale's fixed-rate step: this fraction of one bridge's saturation throughput (0: skipped)
    scale_rate_fraction: float = 0.0
    budget_s: float = 290.0  # a step that would start later than this is skipped (and reported)

    @classmethod
    def default(cls) -> Plan:
        return cls(
            quick=False,
            base_seq=400,
            base_conc=4000,
            add_seq=300,
            adds=20_000,
            add_window=64,
            cycle_seq=300,
            workers=16,
            e2e_rates=(200, 100),
            e2e_seconds=12.0,
            recover_tasks=1000,
            recover_ttr_ms=1000,
            scale_bridges=(1, 2, 4),
            scale_tasks=3000,
            memory_tasks=100_000,
            memory_repeat_tasks=1000,
            caps={"adds": 60, "cycle": 80, "e2e_drain": 15, "recover": 40, "scale": 15, "memory": 60},
            budget_s=290,
        )

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(
            quick=True,
            base_seq=150,
            base_conc=1500,
            add_seq=100,
            adds=2000,
            add_window=64,
            cycle_seq=100,
            workers=16,
            e2e_rates=(200,),
            e2e_seconds=4.0,
            recover_tasks=200,
            recover_ttr_ms=1000,
            scale_bridges=(1, 2),
            scale_tasks=800,
            memory_tasks=10_000,
            memory_repeat_tasks=300,
            caps={"adds": 12, "cycle": 10, "e2e_drain": 5, "recover": 10, "scale": 5, "memory": 10},
            budget_s=57,
        )


class Bench:
    def __init__(
        self,
        plan: Plan,
        *,
        bridges: int,
        profile_dir: Path | None = None,
        profile_clock: str = "wall",
        metrics: bool = False,
    ) -> None:
        self.plan = plan
        self.metrics = metrics
        self.metrics_ports: dict[str, int] = {}
        self.extra_bridge_env: dict[str, str] = {}  # settings of the bridges started from now on
        self.bridges_wanted = bridges
        self.profile_dir = profile_dir
        self.profile_clock = profile_clock
        self.profiles: list[Path] = []
        self.run_id = uuid.uuid4().hex[:8]
        self.exchange = f"qb-bench-{self.run_id}"
        self.results_exchange = f"qb-bench-{self.run_id}.results"
        self.queue_prefix = f"qb-bench-{self.run_id}"
        self.echo_exchange = f"qb-bench-{self.run_id}.echo"
        self.echo_queue = f"qb-bench-{self.run_id}.echo"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"qb-bench-{self.run_id}-"))
        self.keyring = self.workdir / "keyring.json"
        self.bridges: list[Managed] = []
        self.bridge_logs: list[Path] = []
        self._bridge_seq = 0
        self.echo: Managed | None = None
        # The bridges' driver (BRIDGE_CASSANDRA_DRIVER): a baseline is the same client's bare round trip.
        self.db = open_session(
            Settings(
                cassandra_hosts=[HOST],
                cassandra_port=9042,
                cassandra_keyspace=KEYSPACE,
                keyring=None,
                key_server_url=None,
            )
        )
        self.figures: list[Figure] = []
        self.targets: list[Target] = []
        self.baselines: dict[str, Sample] = {}
        self.sections: dict[str, Any] = {"cpu": {}}
        self.cycle_queue: tuple[str, int] | None = None  # (service, tasks waiting) left by W-add
        self.filler: Any = None  # benchmarks.fill.DirectFiller, opened on first use
        self.skipped: list[str] = []
        self.phase = "setup"
        # phase -> other bridges/test processes seen while it ran (they share the CPUs and servers)
        self.disturbances: dict[str, set[str]] = {}
        self.failed = False

    # -- names and environments --------------------------------------------------------------
    @staticmethod
    def amqp_url(user: str) -> str:
        return f"amqp://{user}:{user}@{HOST}:5672/"

    def bridge_env(self, name: str) -> dict[str, str]:
        return {
            "BRIDGE_AMQP_URL": self.amqp_url("guest"),
            "BRIDGE_CASSANDRA_HOSTS": HOST,
            "BRIDGE_CASSANDRA_PORT": "9042",
            "BRIDGE_CASSANDRA_KEYSPACE": KEYSPACE,
            "BRIDGE_KEYRING": str(self.keyring),
            "BRIDGE_EXCHANGE": self.exchange,
            "BRIDGE_RESULTS_EXCHANGE": self.results_exchange,
            "BRIDGE_QUEUE_PREFIX": self.queue_prefix,
            "BRIDGE_TRUSTED_USERS": ENGINE_USER,
            "BRIDGE_LOG_FORMAT": "json",
            "BRIDGE_INSTANCE_ID": name,
            **self._http_env(name),
            **self.extra_bridge_env,
        }

    def _http_env(self, name: str) -> dict[str, str]:
        """BRIDGE_HTTP_PORT=0 (no HTTP) unless --metrics: then a free loopback port per bridge."""
        if not self.metrics:
            return {"BRIDGE_HTTP_PORT": "0"}
        import socket

        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        self.metrics_ports[name] = port
        return {"BRIDGE_HTTP_HOST": HOST, "BRIDGE_HTTP_PORT": str(port)}

    async def _metrics_texts(self, *, tolerant: bool) -> list[str]:
        """The running bridges' /metrics pages (none without --metrics); ``tolerant``: skip a
        bridge that does not answer, else fail naming it (a sum over the fleet without it is not
        the fleet's)."""
        import urllib.request

        texts: list[str] = []
        for b in self.bridges:
            port = self.metrics_ports.get(b.name)
            if port is None:
                continue
            url = f"http://{HOST}:{port}/metrics"
            try:
                texts.append(
                    await asyncio.to_thread(lambda u=url: urllib.request.urlopen(u, timeout=5).read().decode())
                )
            except OSError as exc:
                if not tolerant:
                    raise RuntimeError(f"{b.name}: its /metrics ({url}) did not answer: {exc}") from exc
        return texts

    async def scrape(self, *, tolerant: bool = False) -> Scrape:
        """Every sample of the running bridges' /metrics, with its labels (empty without --metrics)."""
        asked = sum(1 for b in self.bridges if b.name in self.metrics_ports)
        texts = await self._metrics_texts(tolerant=tolerant)
        return Scrape(parse_metrics(texts), answered=len(texts), asked=asked)

    async def counters(self) -> dict[str, float]:
        """queue_bridge_* counters summed over the running bridges and over their labels (empty
        without --metrics; a bridge that does not answer is skipped: see ``scrape``)."""
        out: dict[str, float] = {}
        for (name, _labels), value in parse_metrics(await self._metrics_texts(tolerant=True)).items():
            if name.startswith("queue_bridge_") and math.isfinite(value):
                out[name] = out.get(name, 0.0) + value
        return out

    async def statements(self) -> dict[str, float]:
        """Cassandra requests sent by the running bridges, by statement (empty without --metrics):
        a batch counts once, under the batch's name."""
        return (await self.scrape()).by(CASSANDRA_REQUESTS, "statement")

    async def executed_statements(self) -> dict[str, float]:
        """Statements Cassandra executed for the running bridges, by statement: each member of a
        batch counted under its own name (empty without --metrics, or for bridges before it)."""
        return (await self.scrape()).by(CASSANDRA_STATEMENTS, "statement")

    async def cassandra_clients(self) -> serverside.Snapshot:
        """Cassandra's own count of the requests each client connection sent (system_views.clients),
        with each connection attributed to the bridge process holding it (or to this process:
        "benchmark", the probe session reading the table among them)."""
        groups = {b.name: [b.pid] for b in self.bridges}
        groups["benchmark"] = [os.getpid()]
        return await serverside.snapshot(self.db, CQL_PORT, groups)

    def service(self, what: str) -> str:
        return f"bench-{what}-{uuid.uuid4().hex[:6]}"

    # -- setup and teardown -------------------------------------------------------------------
    async def preflight(self) -> None:
        """Both servers must answer before anything starts (the tests' outage drills stop them at times)."""
        try:
            conn = await asyncio.wait_for(aio_pika.connect(self.amqp_url("guest")), 10)
            await conn.close()
        except Exception as exc:
            raise StackDown(
                f"RabbitMQ on {HOST}:5672 does not answer ({type(exc).__name__}: {exc}); start it with `make stack-up`"
            ) from None
        try:
            await self.db.connect()
            await self.db.execute_raw("SELECT release_version FROM system.local")
        except Exception as exc:
            raise StackDown(
                f"Cassandra on {HOST}:9042 does not answer ({type(exc).__name__}); start it with `make stack-up`"
            ) from None

    async def setup(self) -> None:
        await self.preflight()
        write_keyring(self.keyring, generate_keyring(list(OWNERS)))
        say(f"run {self.run_id}: exchange {self.exchange}, keyspace {KEYSPACE}, logs in {self.workdir}")
        say(f"resetting keyspace {KEYSPACE} (dropped and re-created for every run)")
        await self.db.execute_raw(f"DROP KEYSPACE IF EXISTS {KEYSPACE}")
        await self.db.execute_raw(
            f"CREATE KEYSPACE {KEYSPACE} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
        )
        for cql in BENCH_TABLES:
            await self.db.execute_raw(cql.replace("{ks}", KEYSPACE))
        await self.ensure_bridges(self.bridges_wanted)

    async def ensure_bridges(self, n: int) -> None:
        """Start or stop bridge processes until ``n`` run (the first one is never stopped here)."""
        while len(self.bridges) > max(n, 1):
            b = self.bridges.pop()
            say(f"stopping {b.name}")
            await b.stop()
        while len(self.bridges) < n:
            name = f"bridge-{self._bridge_seq}"
            self._bridge_seq += 1
            prof = self.profile_dir / f"{name}.prof" if self.profile_dir else None
            say(f"starting {name}" + (f" under cProfile ({self.profile_clock} clock) -> {prof}" if prof else ""))
            if prof:
                self.profiles.append(prof)
            # One at a time: the first one creates the schema.
            log = self.workdir / f"{name}.log"
            self.bridge_logs.append(log)
            b = await start_bridge(name, self.bridge_env(name), log, prof, self.profile_clock)
            b.started_rss_mib = b.rss_mib()
            self.bridges.append(b)

    async def ensure_echo(self) -> None:
        if self.echo is None:
            env = {
                "QB_ECHO_URL": self.amqp_url("guest"),
                "QB_ECHO_EXCHANGE": self.echo_exchange,
                "QB_ECHO_QUEUE": self.echo_queue,
                "QB_ECHO_PREFETCH": "64",  # the bridge's default BRIDGE_PREFETCH
                # aiormq (the bridge's request path) unless told aio-pika (the echo until 2026-12-06)
                "QB_ECHO_PATH": os.environ.get("QB_ECHO_PATH", "aiormq"),
            }
            say("starting the echo server (B-rpc)")
            self.echo = await start_echo(env, self.workdir / "echo.log")

    def check_processes(self) -> None:
        for b in self.bridges:
            b.check()

    def cpu_meter(self) -> CpuMeter:
        import os

        pids: dict[str, list[int]] = {"bridges": [b.pid for b in self.bridges]}
        for name, pid in server_pids().items():
            pids[name] = [pid]
        pids["generator"] = [os.getpid()]
        if self.echo is not None:
            pids["echo"] = [self.echo.pid]
        return CpuMeter(pids).start()

    async def teardown(self) -> None:
        for b in reversed(self.bridges):
            with contextlib.suppress(Exception):
                await b.stop()
        if self.echo is not None:
            with contextlib.suppress(Exception):
                await self.echo.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._delete_amqp_entities(), 20)
        if self.filler is not None:
            with contextlib.suppress(Exception):
                await self.filler.close()
        with contextlib.suppress(Exception):
            await self.db.close()
        if self.failed and self.bridge_logs:
            say(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def _delete_amqp_entities(self) -> None:
        """Remove this run's queues and exchanges from RabbitMQ (they are durable)."""
        conn = await aio_pika.connect(self.amqp_url("guest"))
        try:
            queues = [
                f"{self.queue_prefix}.{m}"
                for m in ("add", "fetch", "ack", "lifecycle", "unrouted", "dead-letter", "duty")
            ]
            exchanges = [
                self.exchange,
                f"{self.exchange}.dead",
                f"{self.exchange}.unrouted",
                self.results_exchange,
                self.echo_exchange,
            ]
            for q in [*queues, self.echo_queue]:
                ch = await conn.channel()
                with contextlib.suppress(Exception):
                    await ch.queue_delete(q)
            for ex in exchanges:
                ch = await conn.channel()
                with contextlib.suppress(Exception):
                    await ch.exchange_delete(ex)
        finally:
            await conn.close()

    # -- results -------------------------------------------------------------------------------
    async def watch_others(self) -> None:
        """Every few seconds, note other bridges or test runs on the machine (run as a background task)."""
        from benchmarks.procs import other_activity

        mine = {str(b.pid) for b in self.bridges}
        while True:
            mine |= {str(b.pid) for b in self.bridges}
            others = [o for o in other_activity() if o.split(":", 1)[0] not in mine]
            if others:
                self.disturbances.setdefault(self.phase, set()).update(o[:60] for o in others)
            await asyncio.sleep(3.0)

    def record_cpu(self, phase: str, meter: CpuMeter, ops_per_s: float) -> dict[str, float]:
        """CPU % of one core per process group during a phase, and the phase's operation rate."""
        cpu = meter.stop()
        self.sections["cpu"][phase] = {**cpu, "ops_per_s": ops_per_s}
        for name in meter.vanished:
            self.disturbances.setdefault(self.phase, set()).add(f"a {name} process exited during {phase}")
        return cpu

    def figure(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        return fig

    def target(self, t: Target) -> Target:
        self.targets.append(t)
        return t
