"""worker.amqp.failover without a broker: the URL list, redaction, and what a list of
nodes that all refuse the connection raises (tests/cluster/ has the real failovers)."""

from __future__ import annotations

import socket
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from worker.amqp.failover import (
    FailoverConnection,
    NoBrokerReachable,
    connect_any,
    connect_failover,
    node_of,
    parse_urls,
    redact,
)
from worker.errors import ConfigError, Unreachable

SECRET = "s3cr3t-pw"


def test_parse_urls_strips_each_item_and_keeps_the_order() -> None:
    got = parse_urls(" amqp://app:pw@rabbit-1:5672/ ,amqps://rabbit-2/vh,\tamqp://[::1]:5681 ")
    assert got == ("amqp://app:pw@rabbit-1:5672/", "amqps://rabbit-2/vh", "amqp://[::1]:5681")
    assert parse_urls(["amqp://a", "amqp://b"]) == ("amqp://a", "amqp://b")
    assert parse_urls("amqp://only-one/") == ("amqp://only-one/",)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "no broker URL given"),
        (" , ", "no broker URL given"),
        ("amqp://a,", "item 2 is empty"),
        ("amqp://a,,amqp://b", "item 2 is empty"),
        (",amqp://a", "item 1 is empty"),
        ("http://a", "item 1 is not an amqp:// or amqps:// URL (scheme 'http')"),
        ("rabbit-1:5672", "item 1 is not an amqp:// or amqps:// URL (no scheme"),
        ("amqp:///vhost", "item 1 has no host"),
        ("amqp://a:notaport/", "item 1 has a malformed host or port"),
        ("amqp://a:99999999/", "item 1 has a malformed host or port"),
        ("amqp://a,amqp://x:y@A:5672/", "item 2 names a:5672, as item 1 does"),
        ("amqps://a,amqps://a:5671", "item 2 names a:5671, as item 1 does"),
    ],
)
def test_parse_urls_rejects_with_the_variable_and_the_item(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_urls(value, variable="FORGE_WORKER_AMQP_URL")
    assert str(err.value).startswith("FORGE_WORKER_AMQP_URL: ")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "value",
    [
        # a raw comma in a password splits the item: neither half may be echoed
        f"amqp://app:{SECRET[:4]},{SECRET[4:]}@rabbit-1/",
        f"amqp://app:{SECRET}@rabbit-1:port/",
        f"amqp://app:{SECRET}@rabbit-1/,amqp://app:{SECRET}@rabbit-1/",
        f"amqp://app:{SECRET}@rabbit-1/,,",
        f"ftp://app:{SECRET}@rabbit-1/",
        f"app:{SECRET}@rabbit-1",
    ],
)
def test_parse_errors_never_show_a_password(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_urls(value)
    text = str(err.value)
    for fragment in (SECRET, SECRET[:4], SECRET[4:]):
        assert fragment not in text, text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@127.0.0.1:5681/", "amqp://guest:***@127.0.0.1:5681/"),
        (
            "amqps://app:p%2Cw@[::1]:5671/vh?heartbeat=5",
            "amqps://app:***@[::1]:5671/vh?heartbeat=5",
        ),
        ("amqp://app:@rabbit/", "amqp://app:***@rabbit/"),
        ("amqp://app:p@ss@rabbit:1/", "amqp://app:***@rabbit:1/"),
        # malformed (a raw "/" in the password): hidden through the last "@"
        ("amqp://app:pa/ss@rabbit/", "amqp://app:***@rabbit/"),
        # no password: unchanged
        ("amqp://app@rabbit/", "amqp://app@rabbit/"),
        ("amqp://rabbit:5672/%2F", "amqp://rabbit:5672/%2F"),
        # not a URL at all
        ("app:pw@rabbit", "***@rabbit"),
        ("rabbit", "rabbit"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


@given(st.text(min_size=1, max_size=40))
def test_redact_hides_any_percent_encoded_password(password: str) -> None:
    url = f"amqp://app:{quote(password, safe='')}@rabbit-2:5682/vh"
    assert redact(url) == "amqp://app:***@rabbit-2:5682/vh"


def test_node_of() -> None:
    assert node_of("amqp://u:p@Rabbit-1/") == "rabbit-1:5672"
    assert node_of("amqps://rabbit-1") == "rabbit-1:5671"
    assert node_of("amqp://[::1]:5681/") == "[::1]:5681"
    assert node_of("amqp://u:p@h:bad/") == "?"


def closed_ports(n: int) -> list[int]:
    """Loopback ports that nothing listens on (bound, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def refusing_urls(n: int) -> list[str]:
    return [f"amqp://app:{SECRET}@127.0.0.1:{port}/" for port in closed_ports(n)]


async def test_connect_any_names_every_node_tried_without_the_password() -> None:
    urls = refusing_urls(3)
    with capture_logs() as logs, pytest.raises(NoBrokerReachable) as err:
        await connect_any(",".join(urls), timeout=5)
    assert isinstance(err.value, Unreachable)
    assert [url for url, _ in err.value.attempts] == [redact(u) for u in urls]
    text = str(err.value)
    assert "3 tried" in text and SECRET not in text
    for url in urls:
        assert redact(url) in text
    failed = [e for e in logs if e["event"] == "broker_connect_failed"]
    assert [e["node"] for e in failed] == [node_of(u) for u in urls]
    assert SECRET not in repr(logs)


async def test_failover_connection_with_no_node_up_raises_and_is_closed() -> None:
    urls = refusing_urls(2)
    with capture_logs() as logs, pytest.raises(NoBrokerReachable) as err:
        await connect_failover(urls, timeout=5)
    assert [url for url, _ in err.value.attempts] == [redact(u) for u in urls]
    assert SECRET not in str(err.value) and SECRET not in repr(logs)
    assert not any(e["event"] == "broker_connected" for e in logs)


async def test_failover_connection_rejects_an_empty_list() -> None:
    with pytest.raises(ValueError, match="at least one URL"):
        FailoverConnection([])
