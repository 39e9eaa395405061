"""Settings: defaults, precedence, and one clear line per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import config
from worker.errors import ConfigError


def test_defaults_match_the_contract() -> None:
    s = config.load({})
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert (s.queue, s.receipt_queue, s.http_port, s.clock_skew) == (
        "ucan.invocations",
        "ucan.receipts",
        9464,
        0,
    )
    assert s.service_key is None and s.service_did is None


def test_flag_wins_over_environment() -> None:
    s = config.load({"FORGE_WORKER_QUEUE": "from-env"}, {"queue": "from-flag"})
    assert s.queue == "from-flag"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FORGE_WORKER_HTTP_PORT", "nine"),
        ("FORGE_WORKER_HTTP_PORT", "70000"),
        ("FORGE_WORKER_AMQP_URL", "http://x"),
        ("FORGE_WORKER_CLOCK_SKEW", "-1"),
        ("FORGE_WORKER_SERVICE_DID", "upload.example"),
        ("FORGE_WORKER_LOG_FORMAT", "xml"),
        ("FORGE_WORKER_RETRY_DELAYS", "5,1"),
    ],
)
def test_bad_value_names_its_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load({var: value})
    assert str(info.value).startswith(var + ":")
    assert "\n" not in str(info.value)


def test_key_never_shown() -> None:
    secret = "gCa9UfZv+yI5/rvUIt21DaGI7EZJlzFO1uDc5AyJ30c6/w=="
    s = config.load({"FORGE_WORKER_SERVICE_KEY": secret})
    assert s.service_key == secret
    assert secret not in repr(s) and secret not in str(s)


def test_key_and_key_file_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="SERVICE_KEY"):
        config.load({"FORGE_WORKER_SERVICE_KEY": "k", "FORGE_WORKER_SERVICE_KEY_FILE": "/x"})


# --- secrets in flags (CONTRACT §7: ps shows every process's arguments) -------------------


def test_a_service_key_flag_is_refused_and_names_the_ways() -> None:
    secret = "gCa9UfZv+yI5/rvUIt21DaGI7EZJlzFO1uDc5AyJ30c6/w=="
    with pytest.raises(ConfigError) as info:
        config.load({}, {"service_key": secret})
    message = str(info.value)
    assert message.startswith("--service-key:") and secret not in message
    assert "FORGE_WORKER_SERVICE_KEY" in message and "--service-key-file" in message
    # the environment variable and the file stay the ways to give it
    assert config.load({"FORGE_WORKER_SERVICE_KEY": secret}).service_key == secret
    assert config.load({}, {"service_key_file": "/k"}).service_key_file is not None


@pytest.mark.parametrize(
    ("attr", "url", "var"),
    [
        ("amqp_url", "amqp://hilt:s3cret-pw@broker:5672/", "FORGE_WORKER_AMQP_URL"),
        ("database_url", "postgresql://forge:s3cret-pw@db/upload", "FORGE_WORKER_DATABASE_URL"),
        ("amqp_url", "amqp://a@n1/,amqp://hilt:s3cret-pw@n2/", "FORGE_WORKER_AMQP_URL"),
    ],
)
def test_a_password_in_a_url_flag_is_refused(attr: str, url: str, var: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load({}, {attr: url})
    message = str(info.value)
    flag = "--" + attr.replace("_", "-")
    assert message.startswith(flag + ":") and "s3cret-pw" not in message
    assert var in message and "@FILE" in message
    # in the environment it is fine
    assert getattr(config.load({var: url} if "," not in url else {}), attr)


def test_a_url_flag_without_a_password_or_from_a_file_is_taken(tmp_path: Path) -> None:
    assert config.load({}, {"amqp_url": "amqp://guest@h/"}).amqp_url == "amqp://guest@h/"
    assert config.load({}, {"amqp_url": "amqp://guest:@h/"}).amqp_url == "amqp://guest:@h/"
    path = tmp_path / "amqp.url"
    path.write_text("amqp://hilt:s3cret-pw@broker:5672/\n")
    s = config.load({}, {"amqp_url": f"@{path}", "database_url": None})
    assert s.amqp_url == "amqp://hilt:s3cret-pw@broker:5672/"
    with pytest.raises(ConfigError, match="--database-url: cannot read"):
        config.load({}, {"database_url": f"@{tmp_path / 'missing'}"})


def test_setting_help_says_where_secrets_go() -> None:
    helps = {attr: text for attr, _, text in config.setting_fields()}
    assert "refused as a flag" in helps["service_key"]
    assert "no password in the flag" in helps["amqp_url"] and "@FILE" in helps["amqp_url"]
    assert "no password in the flag" in helps["database_url"]


def test_settings_go_to_a_child_process_as_variables_and_come_back_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``run --processes N`` hands its settings, flags included, to its worker processes as
    FORGE_WORKER_* variables: load() of them gives the same settings (secrets too, never
    in an argument)."""
    from worker.ucan import Signer

    key = Signer.generate().export()
    s = config.load(
        {"FORGE_WORKER_SERVICE_KEY": key, "FORGE_WORKER_RETRY_DELAYS": "2,7"},
        {
            "amqp_url": "amqp://guest@broker:5672/",
            "database_pooler": "pgbouncer",
            "processes": "3",
            "allow_provision_without_plan": "true",
            "service_did": "did:web:upload.example",
            "log_format": "console",
        },
    )
    env = config.environ_of(s)
    assert config.load(env) == s
    assert env["FORGE_WORKER_SERVICE_KEY"] == key and "FORGE_WORKER_SERVICE_KEY_FILE" not in env
    assert env["FORGE_WORKER_RETRY_DELAYS"] == "2,7"
    assert config.load(config.environ_of(config.Settings())) == config.Settings()

    monkeypatch.setenv("FORGE_WORKER_QUEUE", "inherited")
    monkeypatch.setenv("UNRELATED", "kept")
    child = config.process_environ(s, FORGE_WORKER_PROCESSES="1")
    assert child["FORGE_WORKER_QUEUE"] == "ucan.invocations"  # the settings', not inherited
    assert child["UNRELATED"] == "kept" and child["FORGE_WORKER_PROCESSES"] == "1"


@pytest.mark.parametrize(
    ("var", "raw", "attr", "value"),
    [
        ("FORGE_WORKER_PROCESSES", "0", "processes", 0),
        ("FORGE_WORKER_PROCESSES", "4", "processes", 4),
        ("FORGE_WORKER_DATABASE_POOLER", "PgBouncer", "database_pooler", "pgbouncer"),
        ("FORGE_WORKER_DATABASE_POOLER", "none", "database_pooler", "none"),
    ],
)
def test_processes_and_pooler(var: str, raw: str, attr: str, value: object) -> None:
    assert getattr(config.load({var: raw}), attr) == value
    assert config.Settings().processes == 1 and config.Settings().database_pooler == "none"


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("FORGE_WORKER_PROCESSES", "-1"),
        ("FORGE_WORKER_PROCESSES", "many"),
        ("FORGE_WORKER_DATABASE_POOLER", "pgpool"),
    ],
)
def test_bad_processes_and_pooler_name_their_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=var):
        config.load({var: raw})
