"""The service key never appears in logs, errors, ``repr(settings)`` or a bad-key message;
a key file that group or others can read draws a warning at start-up."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog
from aio_pika.abc import AbstractRobustConnection

from tests.security.helpers import dlg, inv
from worker import config
from worker.config import Secret, Settings
from worker.errors import ConfigError
from worker.keyfile import load_service_key
from worker.log import get_logger
from worker.service.app import running
from worker.ucan import DecodeError, Signer, encode_container

KEY_SIGNER = Signer.generate()
KEY = KEY_SIGNER.export()
SEED = base64.b64decode(KEY)[2:]


def key_forms(key: str) -> list[str]:
    """Every way the key (or its seed) could show up in text."""
    raw = base64.b64decode(key)
    seed = raw[2:]
    return [
        key,
        key.rstrip("="),
        "M" + key,
        raw.hex(),
        seed.hex(),
        base64.b64encode(seed).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        repr(seed)[2:40],
    ]


def assert_no_key(text: str, key: str = KEY) -> None:
    for form in key_forms(key):
        assert form not in text, f"key material {form[:6]}… found"


def near_misses(key: str) -> Iterator[str]:
    """Keys one mistake away from valid: the message must not echo them either."""
    raw = base64.b64decode(key)
    yield key[:-2]  # cut
    yield base64.b64encode(b"\x80\x27" + raw[2:]).decode()  # wrong multicodec
    yield base64.b64encode(raw + b"\x00").decode()  # a byte too long
    yield "M" + key[:-4] + "!!!="  # bad base64 behind the multibase prefix
    yield key.replace("=", "") + "@"


def test_repr_of_settings_and_keys_hides_the_key() -> None:
    settings = config.load({"FORGE_WORKER_SERVICE_KEY": KEY})
    assert settings.service_key == KEY  # it is loaded ...
    for text in (
        repr(settings),
        str(settings),
        f"{settings!r}",
        repr(dataclasses.asdict(settings)),
    ):
        assert_no_key(text)  # ... and never shown
    key = load_service_key(settings, get_logger())
    assert_no_key(repr(key))
    assert_no_key(repr(key.signer))
    assert_no_key(repr(Secret(KEY)))


@pytest.mark.parametrize("bad", list(near_misses(KEY)))
def test_a_bad_key_is_refused_without_echo(bad: str, tmp_path: Path) -> None:
    try:
        settings = config.load({"FORGE_WORKER_SERVICE_KEY": bad})
    except ConfigError as exc:
        assert_no_key(str(exc), KEY)
        assert bad not in str(exc)
        return
    with pytest.raises(ConfigError) as info:
        load_service_key(settings, get_logger())
    assert "FORGE_WORKER_SERVICE_KEY" in str(info.value)
    assert bad not in str(info.value) and bad[4:-4] not in str(info.value)
    assert_no_key(str(info.value))
    with pytest.raises(DecodeError) as decode_info:
        Signer.parse(bad)
    assert bad[4:-4] not in str(decode_info.value)
    # from a file: the file is named, its content is not
    path = tmp_path / "service.key"
    path.write_text(bad)
    path.chmod(0o600)
    file_settings = Settings(service_key_file=path)
    with pytest.raises(ConfigError) as file_info:
        load_service_key(file_settings, get_logger())
    assert str(path) in str(file_info.value) and bad[4:-4] not in str(file_info.value)


@pytest.mark.parametrize(
    ("mode", "warned"),
    [(0o600, False), (0o400, False), (0o640, True), (0o644, True), (0o604, True), (0o660, True)],
)
def test_a_key_file_others_can_read_draws_a_warning(
    tmp_path: Path, mode: int, warned: bool
) -> None:
    path = tmp_path / "service.key"
    path.write_text(KEY + "\n")
    path.chmod(mode)
    with structlog.testing.capture_logs() as logs:
        key = load_service_key(Settings(service_key_file=path), get_logger())
    assert key.signer.did == KEY_SIGNER.did
    exposed = [e for e in logs if e["event"] == "service_key_file_exposed"]
    assert bool(exposed) == warned
    if warned:
        assert exposed[0]["log_level"] == "warning" and exposed[0]["mode"] == f"{mode:04o}"
    assert_no_key(repr(logs))


# --- the running worker: in-process capture and a real subprocess --------------------------


def traffic(service: Signer) -> list[bytes]:
    """A valid request, a refused one, a tampered one and garbage: every log path."""
    hilt = Signer.generate()
    root = dlg(service, hilt, sub=service.did)
    exp = int(time.time()) + 300
    good = encode_container([inv(hilt, service.did, [root], exp=exp), root])
    refused = inv(hilt, service.did, exp=exp)  # no proof
    token = inv(service, service.did, exp=exp)
    tampered = token[:3] + bytes([token[3] ^ 1]) + token[4:]
    return [good, refused, tampered, b"\xa1garbage"]


async def _send(conn: AbstractRobustConnection, queue: str, bodies: list[bytes]) -> None:
    ch = await conn.channel()
    for body in bodies:
        await ch.default_exchange.publish(aio_pika.Message(body), queue)
    await ch.close()


@pytest.mark.integration
async def test_the_worker_never_logs_the_key(
    worker_settings: Settings, amqp: AbstractRobustConnection, service: Signer
) -> None:
    key = service.export()
    with structlog.testing.capture_logs() as logs:
        async with running(worker_settings) as app:
            assert app.consumer is not None
            await _send(amqp, worker_settings.queue, traffic(service))
            await app.consumer.wait_for("dead_lettered", 1)
            await app.consumer.wait_for("ok", 1)
            await app.consumer.wait_for("InvalidSignature", 1)
    events = {e["event"] for e in logs}
    assert {"worker_starting", "invocation_answered", "request_dead_lettered"} <= events
    assert_no_key(repr(logs), key)


async def _read_until(
    stream: asyncio.StreamReader, wanted: dict[bytes, int], out: list[bytes]
) -> None:
    """Read lines into ``out`` until each event in ``wanted`` was seen as often as asked."""
    seen = dict.fromkeys(wanted, 0)
    while any(seen[e] < n for e, n in wanted.items()):
        line = await stream.readline()
        if not line:
            raise AssertionError(f"worker exited early: {b''.join(out)[-2000:]!r}")
        out.append(line)
        for event in wanted:
            seen[event] += event in line


@pytest.mark.integration
async def test_forge_worker_run_logs_no_key_and_warns_about_an_exposed_file(
    worker_settings: Settings, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    signer = Signer.generate()
    key = signer.export()
    path = tmp_path / "service.key"
    path.write_text(key + "\n")
    path.chmod(0o644)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FORGE_WORKER_")},
        "FORGE_WORKER_AMQP_URL": worker_settings.amqp_url,
        "FORGE_WORKER_DATABASE_URL": worker_settings.database_url,
        "FORGE_WORKER_SERVICE_KEY_FILE": str(path),
        "FORGE_WORKER_QUEUE": worker_settings.queue,
        "FORGE_WORKER_RECEIPT_QUEUE": worker_settings.receipt_queue,
        "FORGE_WORKER_HTTP_PORT": "0",
        "FORGE_WORKER_LOG_FORMAT": "json",
        "FORGE_WORKER_RETRY_DELAYS": "1,2",
    }
    exe = Path(sys.executable).parent / "forge-worker"
    proc = await asyncio.create_subprocess_exec(
        str(exe), "run", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None and proc.stdout is not None
    lines: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            await _read_until(proc.stderr, {b'"worker_started"': 1}, lines)
            await _send(amqp, worker_settings.queue, traffic(signer))
            events = {b'"request_dead_lettered"': 1, b'"invocation_answered"': 3}
            await _read_until(proc.stderr, events, lines)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest, out = await proc.stderr.read(), await proc.stdout.read()
            await proc.wait()
    text = (b"".join(lines) + rest + out).decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert '"service_key_file_exposed"' in text
    assert '"worker_stopped"' in text
    assert_no_key(text, key)


@pytest.mark.integration
async def test_forge_worker_run_with_a_bad_key_says_which_variable_and_not_the_key() -> None:
    exe = Path(sys.executable).parent / "forge-worker"
    for bad in near_misses(KEY):
        env: dict[str, Any] = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FORGE_WORKER_")},
            "FORGE_WORKER_SERVICE_KEY": bad,
            "FORGE_WORKER_HTTP_PORT": "0",
        }
        proc = await asyncio.create_subprocess_exec(
            str(exe), "run", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        text = (out + err).decode(errors="replace")
        assert proc.returncode == 2, text
        assert "FORGE_WORKER_SERVICE_KEY" in text
        assert bad not in text and bad[4:-4] not in text
        assert_no_key(text)
