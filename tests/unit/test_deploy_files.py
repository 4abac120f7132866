"""Static checks of the deployment files: Dockerfile, docker-compose.yml (+ deploy/compose/), deploy/kubernetes/.

No Docker engine or cluster is needed: the files are parsed and cross-checked against the code
(``bridge.config.Settings``, ``pyproject.toml``, the CLI, the key-ring format) and against each other,
so a renamed setting, a broken healthcheck or a mismatched password fails here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bridge.cli import app as cli_app
from bridge.config import Settings
from bridge.crypto.keyring_file import load_keyring, parse_keyring

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
RABBIT_DEFINITIONS = ROOT / "deploy" / "compose" / "rabbitmq-definitions.json"
RABBIT_CONF = ROOT / "deploy" / "compose" / "rabbitmq.conf"
K8S_DIR = ROOT / "deploy" / "kubernetes"

CORE_SERVICES = ("rabbitmq", "cassandra", "bridge")
DEV_USERS = {"guest", "queue-bridge", "engine", "worker-a", "worker-b"}  # password = name
ROLES = {"queue-bridge": "bridge", "engine": "engine", "worker-a": "worker", "worker-b": "worker"}
ENV_PREFIX = "BRIDGE_"


# --------------------------------------------------------------------------------------------- helpers


def _field(env_name: str) -> str:
    return env_name.removeprefix(ENV_PREFIX).lower()


def _assert_settings_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, where: str) -> Settings:
    """Every BRIDGE_* name is a Settings field, and the values together form valid Settings."""
    names = [name for name in env if name.startswith(ENV_PREFIX)]
    unknown = [name for name in names if _field(name) not in Settings.model_fields]
    assert not unknown, f"{where}: not a bridge setting (no field in bridge.config.Settings): {unknown}"
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name in names:
        monkeypatch.setenv(name, env[name])
    return Settings(_env_file=None)  # type: ignore[call-arg]


def _verify_rabbit_hash(password_hash: str, password: str) -> bool:
    """rabbit_password_hashing_sha256: base64(salt(4) + sha256(salt + utf-8 password))."""
    raw = base64.b64decode(password_hash, validate=True)
    salt, digest = raw[:4], raw[4:]
    return len(raw) == 4 + 32 and hashlib.sha256(salt + password.encode("utf-8")).digest() == digest


def _python_code(argv: list[str]) -> str:
    """The code of a ``python -c CODE`` argv, compiled to prove it is valid Python."""
    assert "-c" in argv, f"expected a `python -c` command, got {argv}"
    assert PurePosixPath(argv[0]).name.startswith("python"), argv
    code = argv[argv.index("-c") + 1]
    compile(code, "<healthcheck>", "exec")
    return code


# --------------------------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = pending + line
        pending = ""
        keyword, _, args = logical.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append((keyword, args))
    return stages


def _exec_form(args: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not an exec-form (JSON array) instruction: {args}")
    assert isinstance(value, list), args
    assert value, args
    assert all(isinstance(item, str) for item in value), args
    return value


def _dockerfile_uid() -> int:
    users = [args for keyword, args in _stages()[-1] if keyword == "USER"]
    assert users, "the runtime stage has no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]}: use a numeric uid so Kubernetes can verify runAsNonRoot"
    return int(uid)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_dockerfile_builder_and_runtime_use_the_same_python() -> None:
    stages = _stages()
    assert len(stages) >= 2, "expected a multi-stage build (builder + runtime)"
    images = [args.split()[0] for stage in stages for keyword, args in stage if keyword == "FROM"]
    assert len(set(images)) == 1, f"builder and runtime images differ: {images}"
    match = re.fullmatch(r"python:(\d+\.\d+)[-.\w]*", images[0])
    assert match, f"expected an official python image, got {images[0]}"
    assert match.group(1) == _pyproject()["tool"]["mypy"]["python_version"]


def test_dockerfile_runs_as_a_non_root_user() -> None:
    assert _dockerfile_uid() != 0


def _entrypoint() -> list[str]:
    runtime = _stages()[-1]
    entrypoints = [args for keyword, args in runtime if keyword == "ENTRYPOINT"]
    assert entrypoints, "the runtime stage has no ENTRYPOINT"
    return _exec_form(entrypoints[-1])


def _init_and_command(entrypoint: list[str]) -> tuple[list[str], list[str]]:
    """(the init's argv up to its ``--``, the command it runs): an ENTRYPOINT ``[init, ..., "--", cmd, ...]``."""
    assert "--" in entrypoint, f"expected an init that runs the bridge after `--`: {entrypoint}"
    split = entrypoint.index("--")
    return entrypoint[:split], entrypoint[split + 1 :]


def test_dockerfile_entrypoint_is_exec_form_console_script() -> None:
    runtime = _stages()[-1]
    _, command = _init_and_command(_entrypoint())
    assert command, "the init is given no command"
    assert command[0] in _pyproject()["project"]["scripts"]
    cmds = [args for keyword, args in runtime if keyword == "CMD"]
    assert cmds, "the runtime stage has no CMD"
    commands = {info.name or info.callback.__name__ for info in cli_app.registered_commands if info.callback}
    assert _exec_form(cmds[-1])[0] in commands
    stopsignals = [args for keyword, args in runtime if keyword == "STOPSIGNAL"]
    assert stopsignals in ([], ["SIGTERM"])


def test_dockerfile_runs_the_bridge_under_an_init() -> None:
    """PID 1 gets no default action for a signal: the kernel drops a SIGTERM that arrives before
    the bridge installed its handler (the first second or two of a start: imports, settings), and
    the container then runs until SIGKILL, a stop grace later. An init (tini) as PID 1 forwards the
    signal to the bridge (whose default action then ends it), reaps, and exits with its code."""
    init, _ = _init_and_command(_entrypoint())
    assert init, "the ENTRYPOINT starts with `--`: no init"
    assert PurePosixPath(init[0]).name == "tini", f"expected tini as PID 1, got {init}"
    assert PurePosixPath(init[0]).is_absolute(), "the init by its absolute path (no PATH lookup in PID 1)"
    installs = [args for keyword, args in _stages()[-1] if keyword == "RUN" and "apt-get install" in args]
    assert any(re.search(r"\btini\b", args) for args in installs), "the runtime stage does not install tini"
    for args in installs:
        assert "--no-install-recommends" in args, args
        assert "rm -rf /var/lib/apt/lists" in args, f"the apt lists stay in the image: {args}"
    user_at = max(i for i, (keyword, _) in enumerate(_stages()[-1]) if keyword == "USER")
    installed_at = [i for i, (keyword, args) in enumerate(_stages()[-1]) if keyword == "RUN" and "apt-get" in args]
    assert all(i < user_at for i in installed_at), "apt-get runs as root, before USER"


def test_dockerfile_healthcheck_probes_liveness() -> None:
    """Not readiness: Swarm and autoheal tools replace an unhealthy container, and readiness fails
    through a RabbitMQ or Cassandra outage, which would replace every bridge of the fleet."""
    checks = [args for keyword, args in _stages()[-1] if keyword == "HEALTHCHECK"]
    assert checks, "the runtime stage has no HEALTHCHECK"
    options, sep, command = checks[-1].partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {checks[-1]}"
    code = _python_code(_exec_form(command))
    assert "/health/live" in code
    assert "127.0.0.1" in code
    assert str(Settings.model_fields["http_port"].default) in code
    assert "--timeout=" in options


def _healthcheck_code() -> str:
    checks = [args for keyword, args in _stages()[-1] if keyword == "HEALTHCHECK"]
    return _python_code(_exec_form(checks[-1].partition("CMD ")[2]))


@pytest.mark.parametrize(
    ("env", "healthy"),
    [
        ({"BRIDGE_HTTP_PORT": "{port}"}, True),  # the wildcard default: asked on loopback
        ({"BRIDGE_HTTP_PORT": "{port}", "BRIDGE_HTTP_HOST": "127.0.0.1"}, True),
        ({"BRIDGE_HTTP_PORT": "{port}", "BRIDGE_HTTP_HOST": "127.0.0.2"}, False),  # listening elsewhere
        ({"BRIDGE_HTTP_PORT": "{closed}"}, False),
        ({"BRIDGE_HTTP_PORT": "0"}, True),  # no HTTP: nothing to ask, the process runs
    ],
)
def test_dockerfile_healthcheck_asks_where_the_bridge_listens(env: dict[str, str], healthy: bool) -> None:
    """It asked 127.0.0.1:BRIDGE_HTTP_PORT whatever BRIDGE_HTTP_HOST said, and with the port 0
    ("no HTTP") a port nothing listens on: the container stayed unhealthy, and Swarm or an
    autoheal tool replaced it in a loop. Found by review. Run here against a real HTTP server."""
    import http.server
    import socket
    import threading

    class Live(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health/live" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Live)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        closed = spare.getsockname()[1]
    try:
        values = {k: v.format(port=server.server_port, closed=closed) for k, v in env.items()}
        clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        done = subprocess.run(
            [sys.executable, "-c", _healthcheck_code()], env={**clean, **values}, capture_output=True, timeout=30
        )
        assert (done.returncode == 0) == healthy, done.stderr.decode()[-500:]
    finally:
        server.shutdown()
        server.server_close()


def test_dockerfile_runtime_environment() -> None:
    runtime = _stages()[-1]
    env: dict[str, str] = {}
    for keyword, args in runtime:
        if keyword == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                env[name] = value
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PATH", "").startswith("/app/.venv/bin:")
    copies = [args for keyword, args in runtime if keyword == "COPY"]
    assert any("--from=builder" in args and "/app/.venv" in args for args in copies), copies
    exposed = " ".join(args for keyword, args in runtime if keyword == "EXPOSE").split()
    assert str(Settings.model_fields["http_port"].default) in exposed


def test_dockerfile_installs_locked_dependencies_before_the_project() -> None:
    builder = _stages()[0]
    syncs = [i for i, (keyword, args) in enumerate(builder) if keyword == "RUN" and "uv sync" in args]
    assert len(syncs) >= 2, "expected a dependency layer and a project layer (two `uv sync`)"
    extras = _pyproject()["project"]["optional-dependencies"]
    for i in syncs:
        args = builder[i][1]
        assert "--frozen" in args or "--locked" in args, args
        assert "--no-dev" in args, args
        for extra in re.findall(r"--extra[ =](\S+)", args):
            assert extra in extras, f"unknown extra {extra!r} in: {args}"
    assert "--no-install-project" in builder[syncs[0]][1]
    copied_first = [args for keyword, args in builder[: syncs[0]] if keyword == "COPY"]
    sources = {src for args in copied_first for src in args.split()[:-1] if not src.startswith("--")}
    # (and on the pinned uv that installs them, copied before them)
    wanted = {"pyproject.toml", "uv.lock", "deploy/python/uv-requirements.txt"}
    assert sources == wanted, f"the dependency layer must depend only on them: {sources}"


UV_PINNED = ROOT / "deploy" / "python" / "uv-requirements.txt"


def test_the_tools_that_build_an_install_are_pinned() -> None:
    """uv.lock pins the dependencies, not the tools that install them: uv itself (pip-installed,
    by version only) and the build backend (``hatchling>=1.24``) could differ at every rebuild.
    uv goes in by hash in the image and in deploy/local/python.sh; hatchling by exact version."""
    pinned = UV_PINNED.read_text()
    version = re.search(r"^uv==(\S+)", pinned, re.MULTILINE)
    assert version, pinned
    hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", pinned)
    assert len(hashes) >= 2, "a wheel for x86_64 and one for aarch64 at least"
    builder = _stages()[0]
    installs = [args for keyword, args in builder if keyword == "RUN" and "pip install" in args]
    assert installs and all("--require-hashes" in args for args in installs), installs
    arg = re.search(r"^ARG UV_VERSION=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert arg is None or arg.group(1) == version.group(1), "ARG UV_VERSION names another release"
    script = (ROOT / "deploy" / "local" / "python.sh").read_text()
    pip_lines = [line for line in script.splitlines() if "pip install" in line]
    assert pip_lines and all("--require-hashes" in line for line in pip_lines), pip_lines
    requires = _pyproject()["build-system"]["requires"]
    exact = r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*"
    assert all(re.fullmatch(exact, r) for r in requires), requires
    # ... and the backend's own dependencies, resolved afresh at each build otherwise (review).
    constraints = _pyproject()["tool"]["uv"]["build-constraint-dependencies"]
    assert all(re.fullmatch(exact, c) for c in constraints), constraints
    assert set(requires) <= set(constraints), "the backend itself is not among the build constraints"
    assert {c.split("==")[0] for c in constraints} >= {"packaging", "pathspec", "pluggy", "trove-classifiers"}


def test_dockerignore_excludes_local_state() -> None:
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    # node_modules: `make test` installs the Node example's packages there; copied with examples/,
    # the runtime image shipped an npm tree nothing in it uses.
    # keyring.json: deploy/kubernetes/secret.yaml generates one where it is run (the repository,
    # most likely), and the builder's `COPY . .` took every owner's keys into its cached layers.
    for needed in (
        ".venv",
        ".git",
        "deploy/local/state",
        "benchmarks/results",
        "examples/node/node_modules",
        "keyring.json",
        "keyring.json.bak",
        "keys.json",
    ):
        assert needed in patterns, f".dockerignore should exclude {needed}"


# --------------------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    assert isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    doc = json.loads(RABBIT_DEFINITIONS.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def _service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.partition("=") for item in env]
        return {name: value for name, _, value in pairs}
    return {name: "" if value is None else str(value) for name, value in env.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    out = []
    for entry in service.get("volumes") or []:
        assert isinstance(entry, str), f"use the short volume syntax: {entry}"
        source, target = entry.split(":")[:2]
        out.append((source, target))
    return out


def _depends_on(service: dict[str, Any]) -> dict[str, Any]:
    deps = service.get("depends_on") or {}
    assert isinstance(deps, dict), "depends_on needs the long syntax to carry a condition"
    return deps


def test_compose_cassandra_restarts_on_its_own_data(compose: dict[str, Any]) -> None:
    """One fixed token (``-Dcassandra.initial_token``) on an image whose cassandra.yaml says
    ``num_tokens: 16``: the first start took the one token and saved it, and every start after
    (``down`` then ``up``, a host reboot) stopped at "Cannot change the number of tokens from 1 to
    16", the bridge waiting for a healthy Cassandra for ever (found by review, 2026-12-07). The
    image's entrypoint writes ``CASSANDRA_NUM_TOKENS`` into cassandra.yaml."""
    env = _service_env(compose["services"]["cassandra"])
    tokens = [t for t in env.get("JVM_OPTS", "").split() if t.startswith("-Dcassandra.initial_token=")]
    if tokens:
        given = len(tokens[0].partition("=")[2].split(","))
        assert env.get("CASSANDRA_NUM_TOKENS") == str(given), "num_tokens must match the initial tokens given"


def test_compose_core_services_have_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in CORE_SERVICES:
        assert name in services, f"docker-compose.yml has no service {name!r}"
        check = services[name].get("healthcheck") or {}
        assert not check.get("disable"), name
        assert check.get("test"), f"service {name!r} has no healthcheck test"


def test_compose_bridge_waits_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    deps = _depends_on(services["bridge"])
    for name in ("rabbitmq", "cassandra"):
        assert (deps.get(name) or {}).get("condition") == "service_healthy", f"bridge -> {name}"
    for name, dep in deps.items():
        assert name in services, f"bridge depends on an undefined service {name!r}"
        if dep.get("condition") == "service_completed_successfully":
            assert services[name].get("restart") in (None, "no"), f"one-shot {name!r} must not restart"
    assert (deps.get("keyinit") or {}).get("condition") == "service_completed_successfully"


def test_compose_bridge_waits_for_a_broker_whose_listener_is_not_up_yet(compose: dict[str, Any]) -> None:
    """RabbitMQ's healthcheck (ping) passes a moment before its AMQP listener and the definitions'
    users exist: with BRIDGE_START_TIMEOUT 0 the bridge exited 1 at its first refused attempt, and
    a `docker compose up` that saw it exited failed the demo services that wait for it."""
    env = compose["services"]["bridge"]["environment"]
    assert float(env.get("BRIDGE_START_TIMEOUT", 0)) >= 30, env


def test_make_help_describes_what_each_target_runs() -> None:
    """`make help` said `make lint` runs mypy: it runs ruff only (mypy is `make typecheck`)."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert lint is not None
    said = re.search(r'echo "make lint +(.*)"', makefile)
    assert said is not None
    assert ("mypy" in said.group(1)) == ("mypy" in lint.group(1)), (said.group(1), lint.group(1))


def test_compose_bridge_is_built_from_this_repository(compose: dict[str, Any]) -> None:
    services = compose["services"]
    bridge = services["bridge"]
    build = bridge.get("build")
    assert build, "the bridge service must build the image from the Dockerfile"
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert ((ROOT / context).resolve() / dockerfile) == DOCKERFILE
    image = bridge.get("image")
    users = [name for name, svc in services.items() if name != "bridge" and svc.get("image") == image]
    assert {"keyinit", "demo-engine", "demo-worker"} <= set(users), "they run from the bridge's image"
    for name in users:
        assert "build" in services[name] or services[name].get("pull_policy") == "never", (
            f"{name}: the image is built by the bridge service, not pulled"
        )


def test_compose_bridge_runs_under_an_init(compose: dict[str, Any]) -> None:
    """The bridge is not PID 1 of its container (a SIGTERM in its first second would be dropped)."""
    assert compose["services"]["bridge"].get("init") is True


def test_compose_bridge_env_is_valid_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    seen = 0
    for name, service in compose["services"].items():
        env = _service_env(service)
        if any(key.startswith(ENV_PREFIX) for key in env):
            seen += 1
            _assert_settings_env(env, monkeypatch, f"docker-compose.yml service {name!r}")
    assert seen, "no service sets BRIDGE_* variables"


def test_compose_amqp_urls_use_users_from_the_definitions(compose: dict[str, Any], definitions: dict[str, Any]) -> None:
    users = {user["name"]: user for user in definitions["users"]}
    urls = [
        (service_name, value)
        for service_name, service in compose["services"].items()
        for value in _service_env(service).values()
        if value.startswith(("amqp://", "amqps://"))
    ]
    assert {name for name, _ in urls} >= {"bridge", "demo-engine", "demo-worker"}
    for service_name, url in urls:
        parts = urlsplit(url)
        assert parts.hostname in compose["services"], f"{service_name}: {url} points outside the stack"
        assert parts.username in users, f"{service_name}: AMQP user {parts.username!r} is not in the definitions"
        assert parts.password is not None
        assert _verify_rabbit_hash(users[parts.username]["password_hash"], parts.password), (
            f"{service_name}: the password in {url} does not match the definitions' hash"
        )
    trusted = _service_env(compose["services"]["bridge"]).get("BRIDGE_TRUSTED_USERS", "")
    for user in filter(None, (part.strip() for part in trusted.split(","))):
        assert user in users, f"trusted user {user!r} does not exist in RabbitMQ"


def test_compose_bridge_healthcheck_matches_its_http_port(compose: dict[str, Any]) -> None:
    bridge = compose["services"]["bridge"]
    port = _service_env(bridge).get("BRIDGE_HTTP_PORT") or str(Settings.model_fields["http_port"].default)
    test = bridge["healthcheck"]["test"]
    assert isinstance(test, list), "use the exec form (no shell, no curl in the image)"
    assert test[0] == "CMD"
    code = _python_code(test[1:])
    assert f"127.0.0.1:{port}/health/ready" in code
    published = [str(entry).rsplit(":", 1)[-1] for entry in bridge.get("ports") or []]
    assert port in published
    assert "no-new-privileges:true" in (bridge.get("security_opt") or [])


def test_compose_files_and_volumes_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, _ in _mounts(service):
            if source.startswith((".", "/")):
                assert (ROOT / source).is_file(), f"{name}: bind-mounted {source} does not exist"
            else:
                assert source in declared, f"{name}: named volume {source!r} is not declared"


def test_compose_keyinit_writes_the_bridges_keyring_once(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    keyinit, bridge = services["keyinit"], services["bridge"]
    keyring = PurePosixPath(_service_env(bridge)["BRIDGE_KEYRING"])
    shared = {src for src, dst in _mounts(keyinit) if dst == str(keyring.parent)}
    assert shared, f"keyinit does not mount {keyring.parent}"
    assert shared & {src for src, dst in _mounts(bridge) if dst == str(keyring.parent)}, "not the same volume"

    argv = list(keyinit.get("entrypoint") or []) + list(keyinit.get("command") or [])
    code = _python_code(argv)
    assert str(keyring) in code, "keyinit writes somewhere else than BRIDGE_KEYRING"
    code = code.replace(str(keyring), str(tmp_path / keyring.name))
    chowns: list[tuple[str, int, int]] = []
    monkeypatch.setattr(os, "chown", lambda path, uid, gid: chowns.append((str(path), uid, gid)))

    exec(compile(code, "<keyinit>", "exec"), {"__name__": "__main__"})
    written = tmp_path / keyring.name
    first = written.read_bytes()
    owners = set(load_keyring(written))
    assert owners >= DEV_USERS - {"queue-bridge"}  # the bridge itself owns no tasks
    demo_owners = {_service_env(services[name]).get("QB_OWNER") for name in ("demo-engine", "demo-worker")}
    assert demo_owners - {None} <= owners

    exec(compile(code, "<keyinit>", "exec"), {"__name__": "__main__"})
    assert written.read_bytes() == first, "keyinit must keep an existing key-ring"
    uid = _dockerfile_uid()
    assert (str(written), uid, uid) in chowns, "the key-ring must belong to the image's user"


def test_compose_demo_services_wait_for_the_bridge(compose: dict[str, Any]) -> None:
    for name in ("demo-engine", "demo-worker"):
        service = compose["services"][name]
        assert _depends_on(service)["bridge"]["condition"] == "service_healthy"
        env = _service_env(service)
        assert env.get("QB_AMQP_URL")
        assert env.get("QB_SERVICE")


# --------------------------------------------------------------------------------------------- RabbitMQ


def test_rabbitmq_definitions_create_the_dev_users(definitions: dict[str, Any]) -> None:
    users = {user["name"]: user for user in definitions["users"]}
    assert set(users) == DEV_USERS
    for name, user in users.items():
        assert user.get("hashing_algorithm") == "rabbit_password_hashing_sha256", name
        assert "password" not in user, f"{name}: plain-text password in the definitions"
        assert "tags" in user, f"{name}: RabbitMQ rejects a user without tags"
        assert _verify_rabbit_hash(user["password_hash"], name), f"{name}: hash does not match password {name!r}"
        assert not _verify_rabbit_hash(user["password_hash"], name + "x")
    assert {"name": "/"} in definitions["vhosts"]
    # Least privilege as shipped: each role exactly as `queue-bridge permissions` prints it; only the
    # admin (guest, for the management UI) has everything.
    from bridge.transport.permissions import role_permissions

    roles = role_permissions("queue-bridge", "queue-bridge.results", "queue-bridge", "queue-bridge.results")
    granted = {p["user"]: (p["configure"], p["write"], p["read"]) for p in definitions["permissions"]}
    assert granted.pop("guest") == (".*", ".*", ".*")
    assert all(p["vhost"] == "/" for p in definitions["permissions"])
    for user, role in ROLES.items():
        r = roles[role]
        assert granted[user] == (r.configure, r.write, r.read), user


def _rabbit_conf() -> dict[str, str]:
    settings = {}
    for line in RABBIT_CONF.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, sep, value = line.partition("=")
            assert sep, f"rabbitmq.conf: not `key = value`: {line}"
            settings[key.strip()] = value.strip()
    return settings


def test_rabbitmq_conf_loads_the_mounted_definitions(compose: dict[str, Any]) -> None:
    settings = _rabbit_conf()
    assert settings.get("loopback_users") == "none"
    mounts = {target: source for source, target in _mounts(compose["services"]["rabbitmq"])}
    target = settings.get("load_definitions")
    assert target in mounts, "load_definitions must name the path the definitions file is mounted at"
    assert (ROOT / mounts[target]).resolve() == RABBIT_DEFINITIONS
    conf_targets = [t for t, s in mounts.items() if (ROOT / s).resolve() == RABBIT_CONF]
    assert conf_targets, "rabbitmq.conf is not mounted"
    assert all(
        t == "/etc/rabbitmq/rabbitmq.conf" or (t.startswith("/etc/rabbitmq/conf.d/") and t.endswith(".conf"))
        for t in conf_targets
    ), conf_targets


MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # RabbitMQ 4.x's default; 3.x's (the image's 3.13) is 128 MiB


def test_rabbitmq_conf_bounds_the_message_size_above_what_the_bridge_sends(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bridge reads a whole delivery into memory before it checks its size (the AMQP library
    buffers the body): on the broker's 3.x default of 128 MiB, any tenant could have a bridge
    hold 128 MiB messages, a few at once. Found by a review. The bound must stay above what the
    bridge publishes itself: a result carries the add's token and the ack's result, each up to
    BRIDGE_MAX_VALUE_BYTES (requests are at most that + 64 KiB)."""
    assert int(_rabbit_conf().get("max_message_size", "0")) == MAX_MESSAGE_SIZE
    bridge_env = _service_env(compose["services"]["bridge"])
    limit = _assert_settings_env(bridge_env, monkeypatch, "docker-compose.yml bridge").max_value_bytes
    assert 2 * limit + 64 * 1024 < MAX_MESSAGE_SIZE


# --------------------------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """Every document of every deploy/kubernetes/*.yaml, by kind (one of each kind expected)."""
    by_kind: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is None:
                continue
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion and kind are required"
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} without a name"
            assert doc["kind"] not in by_kind, f"more than one {doc['kind']}"
            by_kind[doc["kind"]] = {**doc, "_file": path.name}
    return by_kind


def _configmap_data(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = k8s["ConfigMap"]["data"]
    return data


def _secret_data(k8s: dict[str, dict[str, Any]]) -> dict[str, str]:
    secret = k8s["Secret"]
    data = dict(secret.get("stringData") or {})
    data.update({key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()})
    return data


def _sidecar(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    sidecars = [c for c in pod.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    assert len(sidecars) == 1, "expected queue-bridge as one native sidecar (initContainer, restartPolicy: Always)"
    sidecar: dict[str, Any] = sidecars[0]
    return sidecar


def test_k8s_kustomization_lists_every_manifest(k8s: dict[str, dict[str, Any]]) -> None:
    assert {"ConfigMap", "Secret", "Deployment", "Kustomization"} <= set(k8s)
    resources = k8s["Kustomization"]["resources"]
    on_disk = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    # The Secret's placeholders are an example: applied, they would overwrite the real Secret.
    assert "secret.yaml" not in resources
    assert sorted(resources) == sorted(on_disk - {"secret.yaml"})


def test_k8s_configmap_holds_valid_bridge_settings(
    k8s: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _configmap_data(k8s)
    assert data
    not_strings = [key for key, value in data.items() if not isinstance(value, str)]
    assert not not_strings, f"ConfigMap values must be strings (quote them): {not_strings}"
    assert all(key.startswith(ENV_PREFIX) for key in data), "the ConfigMap is loaded with envFrom"
    secret = _secret_data(k8s)
    env = {**data, **{key: value for key, value in secret.items() if key.startswith(ENV_PREFIX)}}
    _assert_settings_env(env, monkeypatch, "deploy/kubernetes")


def test_k8s_secret_keyring_is_a_placeholder_that_cannot_be_used(k8s: dict[str, dict[str, Any]]) -> None:
    keyring = _configmap_data(k8s)["BRIDGE_KEYRING"]
    doc = json.loads(_secret_data(k8s)[PurePosixPath(keyring).name])
    assert "owners" in doc, "the placeholder should show the key-ring format"
    with pytest.raises(ValueError, match="base64"):
        parse_keyring(doc)  # a real key here would be a published key


def test_k8s_deployment_runs_the_bridge_as_a_native_sidecar(k8s: dict[str, dict[str, Any]]) -> None:
    deployment = k8s["Deployment"]
    template = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    pod = template["spec"]
    assert pod.get("containers"), "the worker (app) container is missing"
    sidecar = _sidecar(k8s)
    assert "queue-bridge" in sidecar["image"]

    config = _configmap_data(k8s)
    http_port = int(config.get("BRIDGE_HTTP_PORT", Settings.model_fields["http_port"].default))
    named_ports = {p["name"]: p["containerPort"] for p in sidecar.get("ports") or [] if "name" in p}
    expected = {"startupProbe": "/health/started", "readinessProbe": "/health/ready", "livenessProbe": "/health/live"}
    for probe_name, path in expected.items():
        probe = sidecar.get(probe_name)
        assert probe, f"sidecar has no {probe_name}"
        assert probe["httpGet"]["path"] == path, probe_name
        port = probe["httpGet"]["port"]
        assert named_ports.get(port, port) == http_port, f"{probe_name} does not probe BRIDGE_HTTP_PORT"

    grace = float(config.get("BRIDGE_SHUTDOWN_GRACE", Settings.model_fields["shutdown_grace"].default))
    assert pod.get("terminationGracePeriodSeconds", 30) > grace

    resources = sidecar.get("resources") or {}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(kind) or {}), f"sidecar resources.{kind}"


def test_k8s_sidecar_is_hardened(k8s: dict[str, dict[str, Any]]) -> None:
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    pod_ctx = pod.get("securityContext") or {}
    ctx = {**pod_ctx, **(_sidecar(k8s).get("securityContext") or {})}
    assert ctx.get("runAsNonRoot") is True
    assert ctx.get("runAsUser") == _dockerfile_uid()
    assert ctx.get("readOnlyRootFilesystem") is True
    assert ctx.get("allowPrivilegeEscalation") is False
    assert "ALL" in (ctx.get("capabilities") or {}).get("drop", [])
    assert (ctx.get("seccompProfile") or {}).get("type") == "RuntimeDefault"


def test_k8s_sidecar_takes_config_and_keys_from_the_manifests(
    k8s: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sidecar = _sidecar(k8s)
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    configmap, secret = k8s["ConfigMap"]["metadata"]["name"], k8s["Secret"]["metadata"]["name"]
    secret_data = _secret_data(k8s)

    refs = [src["configMapRef"]["name"] for src in sidecar.get("envFrom") or [] if "configMapRef" in src]
    assert configmap in refs, "the sidecar does not load the ConfigMap (envFrom)"
    env_names = [item["name"] for item in sidecar.get("env") or []]
    unknown = [n for n in env_names if n.startswith(ENV_PREFIX) and _field(n) not in Settings.model_fields]
    assert not unknown, f"not bridge settings: {unknown}"
    for item in sidecar.get("env") or []:
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret, item
            # An optional key (Cassandra credentials) is the user's to add.
            assert ref.get("optional") or ref["key"] in secret_data, f"the Secret has no key {ref['key']!r}"
    assert "BRIDGE_AMQP_URL" in env_names or "BRIDGE_AMQP_URL" in _configmap_data(k8s)

    keyring = PurePosixPath(_configmap_data(k8s)["BRIDGE_KEYRING"])
    mounts = {m["mountPath"]: m for m in sidecar.get("volumeMounts") or []}
    mount = mounts.get(str(keyring.parent))
    assert mount, f"nothing mounted at {keyring.parent}"
    assert "subPath" not in mount, "a subPath mount never sees Secret updates (no key rotation)"
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    source = volumes[mount["name"]].get("secret")
    assert source, "the key-ring must come from a Secret"
    assert source["secretName"] == secret
    items = {item["path"]: item["key"] for item in source.get("items") or []}
    key = items.get(keyring.name, keyring.name)
    assert key in secret_data, f"the Secret has no {key!r} for {keyring}"


def test_the_readme_permissions_are_the_ones_the_bridge_prints() -> None:
    """README's `rabbitmqctl set_permissions` lines for the default names are what `queue-bridge
    permissions` prints: they had fallen behind (no lifecycle, duty or hint queues), and a bridge
    given them could not start."""
    from bridge.transport.permissions import role_permissions

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    text = readme.replace("\\\n", " ")
    found = {
        parts[4]: tuple(parts[5:8])
        for line in text.splitlines()
        if line.strip().startswith("rabbitmqctl set_permissions") and len(parts := shlex.split(line.strip())) == 8
    }
    roles = role_permissions("queue-bridge", "queue-bridge.results", "queue-bridge", "queue-bridge.results")
    users = {"queue-bridge": "bridge", "engine": "engine", "tenant-a": "worker"}
    assert set(found) == set(users), found
    for user, role in users.items():
        r = roles[role]
        assert found[user] == (r.configure, r.write, r.read), user


def test_k8s_schema_is_created_once_by_a_job_and_the_sidecars_wait_for_it(k8s: dict[str, dict[str, Any]]) -> None:
    """Every worker pod starts a bridge: left to each, the fleet's first rollout ran one CREATE per
    sidecar at once (on Cassandra 5.0, a table created by several nodes at once can get two ids).
    The example runs `queue-bridge schema` once, in a Job of the same image and settings, and the
    sidecars never run DDL (BRIDGE_SCHEMA_MODE=verify) and wait for it (BRIDGE_START_TIMEOUT)."""
    config = _configmap_data(k8s)
    assert config.get("BRIDGE_SCHEMA_MODE") == "verify"
    assert float(config.get("BRIDGE_START_TIMEOUT", "0")) > 0, "a sidecar started before the Job must wait for it"
    job = k8s["Job"]["spec"]["template"]["spec"]
    (container,) = job["containers"]
    assert container["args"] == ["schema"]
    assert container["image"] == _sidecar(k8s)["image"]
    refs = [src["configMapRef"]["name"] for src in container.get("envFrom") or [] if "configMapRef" in src]
    assert k8s["ConfigMap"]["metadata"]["name"] in refs, "the Job must read the same keyspace settings"
    ctx = {**(job.get("securityContext") or {}), **(container.get("securityContext") or {})}
    assert ctx.get("runAsNonRoot") is True and ctx.get("readOnlyRootFilesystem") is True


def test_k8s_schema_job_is_named_for_its_release(k8s: dict[str, dict[str, Any]]) -> None:
    """A Job's pod template cannot be changed: with one name for every release, `kubectl apply -k`
    of a new image failed on the finished Job ("field is immutable") until it was deleted by hand,
    and an upgrade whose schema changed had sidecars waiting for a schema command nobody ran. The
    name carries the image's tag, so a new release is a new Job."""
    job = k8s["Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    tag = container["image"].rsplit(":", 1)[1]
    assert job["metadata"]["name"] == "queue-bridge-schema-" + re.sub(r"[^a-z0-9]+", "-", tag.lower()).strip("-")
    assert len(job["metadata"]["name"]) <= 63, "a Job's name becomes its pods' label value: 63 characters at most"
    assert job["spec"].get("ttlSecondsAfterFinished"), "finished Jobs of old releases would pile up"


def _secret_env(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        item["name"]: (ref["name"], ref["key"])
        for item in container.get("env") or []
        if (ref := (item.get("valueFrom") or {}).get("secretKeyRef"))
    }


def test_k8s_schema_job_connects_to_cassandra_as_the_sidecar_does(k8s: dict[str, dict[str, Any]]) -> None:
    """The Job loaded the sidecar's ConfigMap but had none of its secrets or files: with
    ``BRIDGE_CASSANDRA_TLS_CA_FILE`` set (the README's TLS advice) its settings were refused (no
    readable file) and it exited 2; with Cassandra credentials there was no place for them but the
    plain ConfigMap. The sidecars then waited for a schema that never came, and crash-looped:
    no worker container started anywhere in the fleet. Found by review, 2026-12-06."""
    sidecar = _sidecar(k8s)
    job_pod = k8s["Job"]["spec"]["template"]["spec"]
    (job,) = job_pod["containers"]
    missing = set(_secret_env(sidecar).items()) - set(_secret_env(job).items())
    assert not missing, f"secrets the sidecar reads and the Job does not: {sorted(missing)}"
    assert {"BRIDGE_CASSANDRA_USERNAME", "BRIDGE_CASSANDRA_PASSWORD"} <= set(_secret_env(job))
    config = _configmap_data(k8s)
    assert not [k for k in config if k.endswith(("PASSWORD", "USERNAME"))], "credentials belong in the Secret"
    pods = {"sidecar": (sidecar, k8s["Deployment"]["spec"]["template"]["spec"]), "job": (job, job_pod)}
    sources = {}
    for who, (container, pod) in pods.items():
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        sources[who] = {
            m["mountPath"]: {k: v for k, v in volumes[m["name"]].items() if k != "name"}
            for m in container.get("volumeMounts") or []
        }
    # Every mount of the sidecar's but its key-ring and scratch space: the TLS files.
    shared = {p: v for p, v in sources["sidecar"].items() if p not in ("/keys", "/tmp")}
    assert shared, "the sidecar mounts no TLS files"
    for path, source in shared.items():
        assert sources["job"].get(path) == source, f"the Job does not mount {path} as the sidecar does"
        assert (source.get("secret") or {}).get("optional") is True, "the TLS Secret is the user's to create"


@pytest.mark.parametrize("hosts", ["", "rabbit-0:5672,rabbit-1:5672,rabbit-2:5672"], ids=["one node", "three nodes"])
def test_k8s_startup_probe_outlasts_the_bridges_start_timeout_and_its_last_attempt(
    k8s: dict[str, dict[str, Any]], hosts: str
) -> None:
    """The bridge gives up starting only after an attempt failed past BRIDGE_START_TIMEOUT, and an
    attempt takes up to the Cassandra timeout then the AMQP connect timeout per node: at 170 s
    against a 180 s probe window, a bridge reaching both at 172 s was killed at 180 s and went
    into a crash-loop backoff. Found by review, 2026-12-06."""
    config = _configmap_data(k8s)
    fields = Settings.model_fields
    start = float(config["BRIDGE_START_TIMEOUT"])
    cassandra = float(config.get("BRIDGE_CASSANDRA_TIMEOUT", fields["cassandra_timeout"].default))
    amqp = float(config.get("BRIDGE_AMQP_CONNECT_TIMEOUT", fields["amqp_connect_timeout"].default))
    # The ConfigMap's own advice is to list a cluster's nodes: three must fit too.
    nodes = max(1, len([h for h in (str(config.get("BRIDGE_AMQP_HOSTS", "")) or hosts).split(",") if h.strip()]))
    probe = _sidecar(k8s)["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    needed = start + cassandra + amqp * nodes + probe["periodSeconds"]
    assert window >= needed, f"startupProbe window {window}s < {needed}s"


def test_k8s_pods_can_read_the_secret_files_they_mount(k8s: dict[str, dict[str, Any]]) -> None:
    """A Secret volume's files belong to root unless the pod sets ``fsGroup``: with a mode that
    gives others no read (0440), a container running as 10001 could not read them. The schema Job
    mounted the TLS files so, without an ``fsGroup``: a CA file setting made it exit 2 (no readable
    file). Found by review, 2026-12-06."""
    for kind in ("Deployment", "Job"):
        pod = k8s[kind]["spec"]["template"]["spec"]
        containers = (pod.get("initContainers") or []) + pod["containers"]
        for volume in pod.get("volumes") or []:
            secret = volume.get("secret")
            if secret is None or int(secret.get("defaultMode", 0o644)) & 0o004:
                continue
            for c in containers:
                if volume["name"] not in {m["name"] for m in c.get("volumeMounts") or []}:
                    continue
                group = (c.get("securityContext") or {}).get("runAsGroup")
                assert group is not None, f"{kind}/{c['name']}: no runAsGroup"
                assert (pod.get("securityContext") or {}).get("fsGroup") == group, (
                    f"{kind}: {volume['name']} (mode {oct(secret['defaultMode'])}) unreadable by {c['name']}"
                )


def test_k8s_network_policy_lets_only_prometheus_reach_the_unauthenticated_ops_port(
    k8s: dict[str, dict[str, Any]],
) -> None:
    """The ops port shows every tenant's request counts and queue depths without authentication:
    docs/security.md says only a NetworkPolicy keeps other pods from reading it, so one ships.
    It must select the worker's pods, isolate their ingress, and open the ops port to a selected
    source only (a rule without `from` admits every pod of the cluster; a namespaceSelector and a
    podSelector in two entries would admit a whole namespace)."""
    policy = k8s["NetworkPolicy"]["spec"]
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert "Ingress" in policy["policyTypes"]
    http_port = int(_configmap_data(k8s).get("BRIDGE_HTTP_PORT", Settings.model_fields["http_port"].default))
    named_ports = {p["name"]: p["containerPort"] for p in _sidecar(k8s).get("ports") or [] if "name" in p}
    rules = policy.get("ingress") or []
    assert rules, "no rule: Prometheus could not scrape the bridge"
    opened: set[int] = set()
    for rule in rules:
        sources = rule.get("from")
        assert sources, f"a rule open to every pod: {rule}"
        for source in sources:
            assert "podSelector" in source or "ipBlock" in source, f"a whole namespace admitted: {source}"
        ports = rule.get("ports")
        assert ports, f"a rule opening every port: {rule}"
        opened |= {named_ports.get(p["port"], p["port"]) for p in ports}
        # By number: some network plugins do not resolve the named ports of init containers.
        assert all(isinstance(p["port"], int) for p in ports), ports
    assert opened == {http_port}
    annotations = k8s["Deployment"]["spec"]["template"]["metadata"].get("annotations") or {}
    assert int(annotations["prometheus.io/port"]) == http_port


def test_the_readme_quotes_the_k8s_start_timeout_and_startup_probe_window(k8s: dict[str, dict[str, Any]]) -> None:
    """The README's BRIDGE_START_TIMEOUT row said "just under its startupProbe's 180 s" while the
    manifests set 150 s against 200 s: an operator copying the rule ("just under") got the
    crash-loop the setting exists to prevent. Found by review, 2026-12-06."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `BRIDGE_START_TIMEOUT`"))
    start = int(float(_configmap_data(k8s)["BRIDGE_START_TIMEOUT"]))
    probe = _sidecar(k8s)["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    assert f"{start} s" in row and f"{window} s" in row, row
