"""Configuration: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from bridge.config import ConfigError, load_settings
from bridge.crypto import generate_keyring, write_keyring
from tests.conftest import ROOT


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in __import__("os").environ if v.startswith("BRIDGE_")]:
        monkeypatch.delenv(var)
    s = load_settings(_env_file=None)
    assert s.task_ttl == timedelta(days=7)
    assert s.default_time_to_recover_ms == 60_000
    assert s.max_value_bytes == 1_048_576
    assert s.exchange == "queue-bridge"


def test_lists_and_durations_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_CASSANDRA_HOSTS", "10.0.0.1, 10.0.0.2")
    monkeypatch.setenv("BRIDGE_TRUSTED_USERS", "engine,flow")
    monkeypatch.setenv("BRIDGE_TASK_TTL", "P1D")
    s = load_settings(_env_file=None)
    assert s.cassandra_hosts == ["10.0.0.1", "10.0.0.2"]
    assert s.trusted_users == ["engine", "flow"]
    assert s.task_ttl_seconds == 86_400


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("BRIDGE_TASK_TTL", "0"),
        ("BRIDGE_CASSANDRA_PORT", "99999"),
        ("BRIDGE_PREFETCH", "many"),
        ("BRIDGE_CASSANDRA_KEYSPACE", "bad-name"),
        ("BRIDGE_LOG_LEVEL", "LOUD"),
        # JSON's quotes are no CQL: accepted, Cassandra refused them at the first start (a
        # traceback; in verify mode every sidecar crash-looped on a failed schema Job).
        ("BRIDGE_CASSANDRA_REPLICATION", '{"class": "NetworkTopologyStrategy", "dc1": 3}'),
        ("BRIDGE_CASSANDRA_REPLICATION", "{'replication_factor': 3}"),
        ("BRIDGE_CASSANDRA_REPLICATION", "{'class': 'SimpleStrategy', 'replication_factor': 1}; DROP TABLE t"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert var in str(err.value)


def test_both_key_sources_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("BRIDGE_KEYRING", str(tmp_path / "k.json"))
    monkeypatch.setenv("BRIDGE_KEY_SERVER_URL", "http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="BRIDGE_KEY_SERVER_URL"):
        load_settings(_env_file=None)


def test_run_fails_at_start_naming_the_variable() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "run"],
        env={"BRIDGE_TASK_TTL": "-5", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "BRIDGE_TASK_TTL" in proc.stderr
    assert "Traceback" not in proc.stderr


SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"


@pytest.mark.parametrize(
    ("variable", "present"),
    [
        ("BRIDGE_CASSANDRA_TLS_CA_FILE", {}),
        ("BRIDGE_CASSANDRA_TLS_CERT_FILE", {"BRIDGE_CASSANDRA_TLS_CA_FILE": SYSTEM_CA}),
        (
            "BRIDGE_CASSANDRA_TLS_KEY_FILE",
            {"BRIDGE_CASSANDRA_TLS_CA_FILE": SYSTEM_CA, "BRIDGE_CASSANDRA_TLS_CERT_FILE": SYSTEM_CA},
        ),
    ],
)
def test_run_with_a_cassandra_tls_file_missing_names_the_variable(
    tmp_path: Path, variable: str, present: dict[str, str]
) -> None:
    """README "Configuration": invalid values stop the bridge at start with a message naming the
    variable, exit code 2 (as a missing BRIDGE_KEYRING file does).

    Defect: the Cassandra TLS files were read only when the session connected (``_tls_options``
    in bridge/storage/acsylla_session.py; the datastax driver's ``tls_context`` alike): a path not
    matching the mounted Secret (deploy/kubernetes/README.md) made ``run`` die there with a
    FileNotFoundError rich traceback, exit code 1, naming no variable. Settings now checks that
    each is a readable file."""
    if not Path(SYSTEM_CA).is_file():
        pytest.skip(f"no {SYSTEM_CA} on this machine")
    keyring = tmp_path / "keyring.json"
    write_keyring(keyring, generate_keyring(["worker-a", "engine"]))
    missing = str(tmp_path / "not-mounted" / "tls.pem")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        {
            "BRIDGE_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
            "BRIDGE_CASSANDRA_HOSTS": "127.0.0.1",
            "BRIDGE_CASSANDRA_PORT": "1",
            "BRIDGE_CASSANDRA_TIMEOUT": "1",
            "BRIDGE_KEYRING": str(keyring),
            "BRIDGE_HTTP_PORT": "0",
            "BRIDGE_LOG_FORMAT": "json",
            "COLUMNS": "200",
            **present,
            variable: missing,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "run"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, f"a traceback instead of a configuration error:\n{out[-1500:]}"
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out[-1500:]}"
    assert f"{variable}: Value error, no readable file: {missing}" in proc.stderr, proc.stderr[-1500:]


def test_a_cassandra_tls_path_that_is_a_directory_is_invalid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRIDGE_CASSANDRA_TLS_CA_FILE", str(tmp_path))
    with pytest.raises(ConfigError, match="BRIDGE_CASSANDRA_TLS_CA_FILE: Value error, not a file: "):
        load_settings(_env_file=None)


@pytest.mark.parametrize("var", ["BRIDGE_CASSANDRA_TLS_CA_FILE", "BRIDGE_CASSANDRA_TLS_CERT_FILE"])
def test_an_empty_tls_file_variable_means_none(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    """A manifest that sets the variable empty (a template's placeholder) means no file, as for the
    other optional paths: read as the path ".", it stopped the bridge as "not a file"."""
    monkeypatch.setenv(var, "")
    settings = load_settings()
    assert getattr(settings, var.removeprefix("BRIDGE_").lower()) is None


@pytest.mark.parametrize(
    "value",
    [
        "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        "{'class': 'NetworkTopologyStrategy', 'datacenter1': 3}",
        "{ 'class' : 'org.apache.cassandra.locator.NetworkTopologyStrategy', 'dc-east': '3', 'dc_west': 2 }",
        "{'class': 'NetworkTopologyStrategy', 'dc 1': '3/1', 'eu:west': 2}",  # spaces, transient replicas
    ],
)
def test_cql_replication_maps_are_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("BRIDGE_CASSANDRA_REPLICATION", value)
    assert load_settings(_env_file=None).cassandra_replication == value


def test_a_default_lease_above_the_maximum_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted, every fetch without a timeToRecover silently got the maximum instead."""
    monkeypatch.setenv("BRIDGE_DEFAULT_TIME_TO_RECOVER_MS", "120000")
    monkeypatch.setenv("BRIDGE_MAX_TIME_TO_RECOVER_MS", "60000")
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert "BRIDGE_DEFAULT_TIME_TO_RECOVER_MS" in str(err.value) and "BRIDGE_MAX_TIME_TO_RECOVER_MS" in str(err.value)


def test_a_maximum_lease_set_alone_below_the_default_still_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment that lowered only the maximum (below the 60 s default) starts as before,
    its default lease the maximum: refusing it would crash-loop every bridge at the upgrade."""
    monkeypatch.setenv("BRIDGE_MAX_TIME_TO_RECOVER_MS", "30000")
    settings = load_settings(_env_file=None)
    assert settings.max_time_to_recover_ms == 30_000


def test_a_default_lease_raised_alone_above_the_maximum_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused only with both set: a default of 50,000,000 ms alone (above the 12 h maximum) was
    taken and silently capped, where the README says it is refused. Found by review."""
    monkeypatch.setenv("BRIDGE_DEFAULT_TIME_TO_RECOVER_MS", "50000000")
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert "BRIDGE_DEFAULT_TIME_TO_RECOVER_MS" in str(err.value)


def test_a_value_limit_whose_results_do_not_fit_the_brokers_message_size_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A result carries a token and a result of up to the value limit each: with values of 9 MiB
    on a broker taking 16 MiB, every such result was refused by the broker, which closed the
    results channel at every retry of the relay (found by review, 2026-12-07)."""
    monkeypatch.setenv("BRIDGE_MAX_VALUE_BYTES", str(9 * 1024 * 1024))
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert "BRIDGE_BROKER_MAX_MESSAGE_BYTES" in str(err.value) and "BRIDGE_MAX_VALUE_BYTES" in str(err.value)
    monkeypatch.setenv("BRIDGE_BROKER_MAX_MESSAGE_BYTES", str(32 * 1024 * 1024))  # the broker raised with it
    assert load_settings(_env_file=None).max_value_bytes == 9 * 1024 * 1024
    monkeypatch.delenv("BRIDGE_BROKER_MAX_MESSAGE_BYTES")
    monkeypatch.setenv("BRIDGE_MAX_VALUE_BYTES", str(8 * 1024 * 1024 - 65_536))  # the largest that fits 16 MiB
    assert load_settings(_env_file=None).broker_max_message_bytes == 16 * 1024 * 1024


def test_a_keyspace_is_named_as_cassandra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unquoted, Cassandra folds the name to lower case (tests/integration/test_schema_modes.py)."""
    monkeypatch.setenv("BRIDGE_CASSANDRA_KEYSPACE", "QueueBridge")
    assert load_settings(_env_file=None).cassandra_keyspace == "queuebridge"


@pytest.mark.parametrize("hosts", ["cass-0:9042", "cass-0,cass-1:9042", "[::1]:9042", "10.0.0.1:"])
def test_cassandra_hosts_with_a_port_are_refused(monkeypatch: pytest.MonkeyPatch, hosts: str) -> None:
    """BRIDGE_AMQP_HOSTS takes host[:port]; these do not, and "cass-0:9042" was taken for a host
    name: the start failed with "cannot connect", naming no format problem. Found by review."""
    monkeypatch.setenv("BRIDGE_CASSANDRA_HOSTS", hosts)
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert "BRIDGE_CASSANDRA_HOSTS" in str(err.value) and "BRIDGE_CASSANDRA_PORT" in str(err.value)


@pytest.mark.parametrize("hosts", ["cass-0,cass-1", "10.0.0.1", "::1", "fe80::1"])
def test_cassandra_hosts_and_ipv6_addresses_are_accepted(monkeypatch: pytest.MonkeyPatch, hosts: str) -> None:
    monkeypatch.setenv("BRIDGE_CASSANDRA_HOSTS", hosts)
    assert load_settings(_env_file=None).cassandra_hosts == hosts.split(",")


@pytest.mark.parametrize(
    "url", ["rabbit:5672", "http://u:s3cret@rabbit/", "amqp://u:s3cret@:5672/", "amqp://u:s3cret@rabbit:99999/"]
)
def test_an_amqp_url_that_does_not_parse_is_refused_without_its_password(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """Loaded as any string: "rabbit:5672" started, and `queue-bridge permissions` printed vhost
    "672" for it; a port out of range failed later, naming no variable. Found by review."""
    monkeypatch.setenv("BRIDGE_AMQP_URL", url)
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert "BRIDGE_AMQP_URL" in str(err.value)
    assert "s3cret" not in str(err.value)


def test_a_misspelt_variable_is_named_with_the_setting_it_may_mean() -> None:
    """Ignored in silence, BRIDGE_CASSANDRA_HOST=cass-0 left the hosts at 127.0.0.1. Found by
    review. `run` logs each such variable at start."""
    from bridge.config import unknown_variables

    said = unknown_variables({"BRIDGE_CASSANDRA_HOST": "cass-0", "BRIDGE_AMQP_URL": "amqp://x/", "PATH": "/bin"})
    assert said == [
        "BRIDGE_CASSANDRA_HOST is not a setting of this bridge (did you mean BRIDGE_CASSANDRA_HOSTS?): ignored"
    ]


@pytest.mark.parametrize("level", ["ONE", "LOCAL_ONE", "ANY", "TWO"])
def test_a_consistency_below_a_quorum_is_refused(monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    """docs/storage.md, "Consistency": a read sees every acknowledged write because reads and
    writes both take a quorum (R + W > RF). ONE and LOCAL_ONE were accepted: a write acknowledged
    by one replica, a read answered by another, and the queue read a lease or a ready row as it
    was before the write (a task handed out twice, a completion unseen)."""
    monkeypatch.setenv("BRIDGE_CASSANDRA_CONSISTENCY", level)
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert "BRIDGE_CASSANDRA_CONSISTENCY" in str(err.value)
    assert "quorum" in str(err.value).lower()


@pytest.mark.parametrize("level", ["LOCAL_QUORUM", "QUORUM"])
def test_a_quorum_consistency_is_accepted(monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    monkeypatch.setenv("BRIDGE_CASSANDRA_CONSISTENCY", level)
    assert load_settings(_env_file=None).cassandra_consistency == level


@pytest.mark.parametrize("value", ["0.1", "0.05", "0.199"])
def test_a_reconnect_delay_below_the_drivers_first_wait_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """Both drivers start reconnecting 0.2 s after a loss and refuse a longest wait below it
    (acsylla CassErrorLibBadParams, cassandra-driver ValueError): accepted here, the bridge died
    at connect with a traceback naming no variable."""
    monkeypatch.setenv("BRIDGE_CASSANDRA_RECONNECT_MAX_DELAY", value)
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert "BRIDGE_CASSANDRA_RECONNECT_MAX_DELAY" in str(err.value) and "0.2" in str(err.value)


def test_a_reconnect_delay_of_the_drivers_first_wait_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_CASSANDRA_RECONNECT_MAX_DELAY", "0.2")
    assert load_settings(_env_file=None).cassandra_reconnect_max_delay == 0.2


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BRIDGE_TRUSTED_USERS", '["engine","engine-2"]', ["engine", "engine-2"]),
        ("BRIDGE_TRUSTED_USERS", "engine, engine-2", ["engine", "engine-2"]),
        ("BRIDGE_AMQP_HOSTS", '["rabbit-0", "rabbit-1:5673"]', ["rabbit-0", "rabbit-1:5673"]),
        ("BRIDGE_CASSANDRA_HOSTS", '["cass-0","cass-1"]', ["cass-0", "cass-1"]),
    ],
)
def test_a_list_setting_is_read_comma_separated_or_as_a_json_list(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: list[str]
) -> None:
    """A JSON list (pydantic-settings' own list format, and BRIDGE_SERVICE_MAX_DELIVERIES's)
    loaded as the users '["engine"' and '"engine-2"]': every engine add naming an owner was
    refused ``unauthorized`` and dead-lettered, pod by pod as a ConfigMap rolled out. Found by
    review, 2026-12-07."""
    monkeypatch.setenv(name, value)
    assert getattr(load_settings(_env_file=None), name.removeprefix("BRIDGE_").lower()) == expected


@pytest.mark.parametrize("value", ['["engine"', '["engine", 2]', '"engine"'])
def test_a_list_setting_that_is_neither_form_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("BRIDGE_TRUSTED_USERS", value)
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert "BRIDGE_TRUSTED_USERS" in str(err.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BRIDGE_CASSANDRA_TIMEOUT", "inf"),
        ("BRIDGE_SHUTDOWN_GRACE", "inf"),
        ("BRIDGE_KEY_CACHE_SECONDS", "nan"),
        ("BRIDGE_RESULT_REPUBLISH_AFTER", "inf"),
    ],
)
def test_an_infinite_or_nan_number_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """``inf`` passed the bounds (``gt=0``) and the start crashed with a traceback (``int(inf *
    1000)``), exit 1 instead of the configuration error's exit 2 naming it. Found by review."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert name in str(err.value)


def test_a_result_republished_after_its_outbox_row_is_gone_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay reads an outbox bucket BRIDGE_RESULT_REPUBLISH_AFTER after it ends; an outbox row
    lives the task's remaining life plus a day: set past that, a result whose first publish failed
    was never sent again nor reported. Found by review, 2026-12-07."""
    monkeypatch.setenv("BRIDGE_TASK_TTL", "86400")
    monkeypatch.setenv("BRIDGE_RESULT_REPUBLISH_AFTER", str(3 * 86400))
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None)
    assert "BRIDGE_RESULT_REPUBLISH_AFTER" in str(err.value)


def test_a_misspelt_variable_in_the_env_file_is_named_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings read ``.env`` as well; a misspelt name there (BRIDGE_CASANDRA_HOSTS) was
    dropped without the warning the README promises. Found by review, 2026-12-07."""
    from bridge.config import configured_variables, unknown_variables

    (tmp_path / ".env").write_text("BRIDGE_CASANDRA_HOSTS=cass-1\nBRIDGE_CASSANDRA_PORT=9042\n")
    monkeypatch.chdir(tmp_path)
    said = unknown_variables(configured_variables({"PATH": "/bin"}))
    assert said == [
        "BRIDGE_CASANDRA_HOSTS is not a setting of this bridge (did you mean BRIDGE_CASSANDRA_HOSTS?): ignored"
    ]


@pytest.mark.parametrize("option", ["cafile", "certfile", "keyfile", "capath"])
def test_a_tls_file_the_amqp_url_names_and_nobody_mounted_is_a_configuration_error(option: str, tmp_path: Path) -> None:
    """aiormq opens the URL's TLS files at each connect: a missing one raised a FileNotFoundError
    naming no file, read as "RabbitMQ cannot be reached", retried until the start timed out, then
    exit 1 (a pod whose optional TLS Secret was missing crash-looped). Found by review, 2026-12-07."""
    keyring = tmp_path / "keyring.json"
    write_keyring(keyring, generate_keyring(["worker-a", "engine"]))
    missing = str(tmp_path / "not-mounted" / "rabbit.pem")
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    query = f"certfile={cert}&keyfile={missing}" if option == "keyfile" else f"{option}={missing}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        {
            "BRIDGE_AMQP_URL": f"amqps://guest:guest@127.0.0.1:1/?{query}",
            "BRIDGE_CASSANDRA_HOSTS": "127.0.0.1",
            "BRIDGE_CASSANDRA_PORT": "1",
            "BRIDGE_KEYRING": str(keyring),
            "BRIDGE_HTTP_PORT": "0",
            "COLUMNS": "200",
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "run"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-1500:]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out[-1500:]}"
    assert "BRIDGE_AMQP_URL" in proc.stderr and f"?{option}= names" in proc.stderr and missing in proc.stderr
    assert "guest:guest" not in proc.stderr


def test_tls_files_are_checked_as_aiormq_opens_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only for amqps (a plain amqp:// URL opens none), the first of a repeated option, and the
    key file only with a certificate: refused otherwise, a URL that connects was refused at load
    (found by the re-review, 2026-12-07)."""
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    missing = tmp_path / "missing.pem"
    for url in (
        f"amqp://u:p@rabbit/?cafile={missing}",
        f"amqps://u:p@rabbit/?cafile={ca}&cafile={missing}",
        f"amqps://u:p@rabbit/?cafile={ca}&keyfile={missing}",
    ):
        monkeypatch.setenv("BRIDGE_AMQP_URL", url)
        load_settings(_env_file=None)
    monkeypatch.setenv("BRIDGE_AMQP_URL", f"amqps://u:p@rabbit/?certfile={ca}&keyfile={missing}")
    with pytest.raises(ConfigError, match="keyfile= names no readable file"):
        load_settings(_env_file=None)
