"""The local deployment scripts' process handling (deploy/local/cassandra.sh), run in bash.

No server is started: the launch helper is exercised with ``sleep``, which is all it needs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASSANDRA_SH = ROOT / "deploy" / "local" / "cassandra.sh"

# Launches a detached process 300 times, and checks at once (as cassandra_wait does) that the pid
# runs the command, not the shell it was forked from.
LAUNCHES = """
set -u
source "$1"
missed=0
for i in $(seq 300); do
  qb_spawn_detached /dev/null sleep 1000.4242 || { echo "died $i"; exit 3; }
  tr '\\0' ' ' <"/proc/$QB_SPAWNED_PID/cmdline" | grep -qF 1000.4242 || missed=$((missed + 1))
  kill "$QB_SPAWNED_PID"
done
echo "missed $missed"
"""


def _run_with_cassandra_sh(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash with deploy/local/cassandra.sh as its first argument."""
    path = tmp_path / "script.sh"
    path.write_text(script)
    return subprocess.run(
        ["bash", str(path), str(CASSANDRA_SH)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "QB_STATE_DIR": str(tmp_path / "state")},
    )


def test_a_detached_launch_returns_once_the_pid_runs_the_command(tmp_path: Path) -> None:
    # A CI run's 3-node cluster start failed with "the server we started is not running any
    # more" and an empty log: the pid was checked before setsid had exec'd (9% of bare launches
    # on an idle 2-core machine).
    out = _run_with_cassandra_sh(tmp_path, LAUNCHES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "missed 0"


def test_a_detached_launch_that_dies_at_once_is_reported(tmp_path: Path) -> None:
    out = _run_with_cassandra_sh(tmp_path, 'source "$1"\nqb_spawn_detached /dev/null false && echo ok || echo failed\n')
    assert out.stdout.strip() == "failed", out.stdout + out.stderr


def test_the_brokers_state_goes_where_its_user_can_reach_it(tmp_path: Path) -> None:
    """A checkout in root's home (0700 on Debian): the broker, run as `rabbitmq`, could not reach
    deploy/local/state, and the README's first command failed ("set QB_STATE_DIR elsewhere")."""
    rabbitmq_sh = ROOT / "deploy" / "local" / "rabbitmq.sh"
    home = tmp_path / "home"
    (home / "checkout").mkdir(parents=True)
    home.chmod(0o700)
    script = 'source "$1"; echo "$R_DIR"; QB_STATE_DIR="$2"; rabbitmq_paths; echo "$R_DIR"'
    runs = [
        subprocess.run(
            ["bash", "-c", script, "x", str(rabbitmq_sh), str(state)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "QB_STATE_DIR": str(state)},
        )
        for state in (home / "checkout" / "state", home / "checkout" / "state")
    ]
    for out in runs:
        assert out.returncode == 0, out.stderr
    hidden = runs[0].stdout.split()
    assert hidden[0].startswith("/var/tmp/queue-bridge-rabbitmq-"), hidden
    assert hidden[0] == hidden[1] == runs[1].stdout.split()[0], "the same folder at every call"
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    out = subprocess.run(
        ["bash", "-c", script, "x", str(rabbitmq_sh), str(open_dir / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "QB_STATE_DIR": str(open_dir / "state")},
    )
    reachable = all(oct(p.stat().st_mode)[-1] in "1357" for p in [open_dir, *open_dir.parents] if str(p) != "/")
    expected = str(open_dir / "state" / "rabbitmq") if reachable else "/var/tmp/queue-bridge-rabbitmq-"
    assert out.stdout.split()[1].startswith(expected), out.stdout


RABBITMQ_SH = ROOT / "deploy" / "local" / "rabbitmq.sh"
MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # as deploy/compose/rabbitmq.conf (tests/unit/test_deploy_files.py)


def _run_with_rabbitmq_sh(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash after sourcing deploy/local/rabbitmq.sh, its broker folder (R_DIR) in
    ``tmp_path``; ``rabbitmqctl`` is a stub on PATH that records its arguments in ``ctl.log``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    ctl = bin_dir / "rabbitmqctl"
    ctl.write_text(f'#!/bin/sh\necho "$@" >>{tmp_path / "ctl.log"}\n')
    ctl.chmod(0o755)
    prelude = (
        'source "$1"; R_DIR="$2/rabbitmq"; R_MNESIA="$R_DIR/mnesia"; R_LOGS="$R_DIR/logs"\n'
        # The broker's user is not needed to render its config (nor may exist on this machine).
        "chown() { :; }; su() { :; }\n"
    )
    return subprocess.run(
        ["bash", "-c", prelude + script, "x", str(RABBITMQ_SH), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin:/usr/sbin:/sbin", "QB_STATE_DIR": str(tmp_path / "state")},
    )


def test_the_local_brokers_config_bounds_the_message_size(tmp_path: Path) -> None:
    """RabbitMQ 3.x takes message bodies up to 128 MiB, and a bridge reads a whole delivery into
    memory before it can check its size: the local broker (and each node of rabbitmq-cluster.sh,
    which runs rabbitmq.sh) is started with RabbitMQ 4.x's 16 MiB, as the compose file's."""
    out = _run_with_rabbitmq_sh(tmp_path, 'rabbitmq_prepare_state && cat "$R_DIR/rabbitmq.conf"')
    assert out.returncode == 0, out.stderr
    conf = dict(line.split(" = ", 1) for line in out.stdout.splitlines() if " = " in line)
    assert conf.get("max_message_size") == str(MAX_MESSAGE_SIZE), out.stdout


def test_a_running_broker_started_on_an_older_config_gets_the_message_size_bound_live(tmp_path: Path) -> None:
    """`stack.sh up` leaves a broker these scripts started running, on the config rendered for its
    start: the bound is applied to it live (each new channel reads it), and only when its config
    differs from the one rendered now."""
    older = 'mkdir -p "$R_DIR"; echo "listeners.tcp.default = 127.0.0.1:5672" >"$R_DIR/rabbitmq.conf"\n'
    out = _run_with_rabbitmq_sh(tmp_path, older + "rabbitmq_apply_conf_live")
    assert out.returncode == 0, out.stderr
    applied = (tmp_path / "ctl.log").read_text()
    assert f"application:set_env(rabbit, max_message_size, {MAX_MESSAGE_SIZE})." in applied, applied
    (tmp_path / "ctl.log").unlink()
    out = _run_with_rabbitmq_sh(tmp_path, "rabbitmq_prepare_state && rabbitmq_apply_conf_live")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "ctl.log").exists(), "a broker on the current config is left alone"


def test_a_broker_these_scripts_did_not_start_gets_no_dev_users_unless_asked(tmp_path: Path) -> None:
    """`stack.sh up` found something answering AMQP (Debian's own rabbitmq-server, on every
    interface) and still added the dev users to it, each with its name as password: anyone on
    the network could publish into that broker as queue-bridge (found by review, 2026-12-07). An
    external broker is left as it is, and told what to run, unless QB_RABBITMQ_USERS_ON_EXTERNAL=1."""
    external = 'mkdir -p "$R_DIR"; R_OWNER="$R_DIR/owner"; echo external >"$R_OWNER"\n'
    out = _run_with_rabbitmq_sh(tmp_path, external + "rabbitmq_users")
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "ctl.log").read_text()
    assert "add_user" not in calls and "set_permissions" not in calls, calls
    assert "QB_RABBITMQ_USERS_ON_EXTERNAL=1" in out.stderr + out.stdout
    assert "rabbitmqctl add_user queue-bridge queue-bridge" in out.stderr + out.stdout, "the commands to run"
    out = _run_with_rabbitmq_sh(tmp_path, external + "QB_RABBITMQ_USERS_ON_EXTERNAL=1 rabbitmq_users")
    assert out.returncode == 0, out.stderr
    assert "add_user queue-bridge queue-bridge" in (tmp_path / "ctl.log").read_text()
    # A broker these scripts started gets them, as before.
    (tmp_path / "ctl.log").unlink()
    started = 'mkdir -p "$R_DIR"; R_OWNER="$R_DIR/owner"; echo started >"$R_OWNER"\n'
    out = _run_with_rabbitmq_sh(tmp_path, started + "rabbitmq_users")
    assert out.returncode == 0, out.stderr
    assert "add_user queue-bridge queue-bridge" in (tmp_path / "ctl.log").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="the scripts run as root; the folder's owner is checked against root")
@pytest.mark.parametrize(
    ("made_by_another", "ok"),
    [("missing", True), ("mode 0755", True), ("mode 0777", False), ("a symlink", False)],
)
def test_the_brokers_var_tmp_folder_is_used_only_if_these_scripts_could_have_made_it(
    tmp_path: Path, made_by_another: str, ok: bool
) -> None:
    """The /var/tmp fallback's name can be computed by anyone: a folder another local user made
    there first, with symlinks in it, had root write through them (the config, the apt log).
    Found by review, 2026-12-06."""
    import shutil
    import uuid

    r_dir = Path(f"/var/tmp/queue-bridge-rabbitmq-test-{uuid.uuid4().hex[:8]}")
    target = tmp_path / "elsewhere"
    target.mkdir()
    try:
        if made_by_another.startswith("mode"):
            r_dir.mkdir()
            r_dir.chmod(int(made_by_another.split()[1], 8))
        elif made_by_another == "a symlink":
            r_dir.symlink_to(target)
        out = _run_with_rabbitmq_sh(tmp_path, f'R_DIR="{r_dir}"; rabbitmq_dir && echo usable')
        assert ("usable" in out.stdout) == ok, out.stdout + out.stderr
        if ok and made_by_another == "missing":
            assert r_dir.is_dir() and oct(r_dir.stat().st_mode & 0o777) == "0o750"
        if not ok:
            assert "not made by these scripts" in out.stderr or "is not a folder" in out.stderr, out.stderr
    finally:
        if r_dir.is_symlink():
            r_dir.unlink()
        elif r_dir.exists():
            shutil.rmtree(r_dir)
