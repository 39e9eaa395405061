"""Settings: defaults, precedence, and one clear line per bad value."""

from __future__ import annotations

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
