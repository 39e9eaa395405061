"""Log set-up: one JSON object per line with bound context; secrets masked."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from worker import log


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_json_lines_with_bound_context_and_masked_secrets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log.configure("json")
    structlog.contextvars.bind_contextvars(invocation="bafyinv")
    log.get_logger(component="test").info("invocation_answered", outcome="ok", key="s3cr3t")
    [line] = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert event["event"] == "invocation_answered"
    assert event["invocation"] == "bafyinv" and event["component"] == "test"
    assert event["outcome"] == "ok" and event["level"] == "info" and "timestamp" in event
    assert event["key"] == "***" and "s3cr3t" not in line


def test_console_format_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("console")
    log.get_logger().warning("something_happened", n=1)
    out = capsys.readouterr().err
    assert "something_happened" in out
    with pytest.raises(ValueError):
        json.loads(out)


def test_library_records_are_json_lines_too(capsys: pytest.CaptureFixture[str]) -> None:
    """aio-pika, aiormq and asyncpg log through the stdlib; their lines must parse as JSON."""
    import logging

    log.configure("json")
    try:
        raise ConnectionError("refused")
    except ConnectionError:
        logging.getLogger("aiormq.connection").error("cannot connect", exc_info=True)
    logging.getLogger("asyncpg.pool").info("below the level: not written")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "cannot connect" and event["logger"] == "aiormq.connection"
    assert event["level"] == "error" and "ConnectionError: refused" in event["exception"]


def test_timestamps_are_utc_iso_8601_with_microseconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import re
    import time
    from datetime import datetime

    log.configure("json")
    before = time.time()
    for _ in range(3):
        log.get_logger().info("something_happened")
    after = time.time()
    stamps = [json.loads(line)["timestamp"] for line in capsys.readouterr().err.splitlines()]
    assert len(stamps) == 3
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        assert before - 1e-6 <= at <= after + 1e-6
    assert stamps == sorted(stamps)
