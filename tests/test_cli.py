"""The argument tree: secrets are refused as command-line values (CONTRACT §7), before
anything connects, with one line that says where to put them instead."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from worker import cli
from worker.ucan import Signer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No configured key, and a scratch directory: were a refusal missing, ``run`` would
    make its development key here and meet closed ports, never the shared services."""
    for var in ("FORGE_WORKER_SERVICE_KEY", "FORGE_WORKER_SERVICE_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def test_run_refuses_the_service_key_as_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    key = Signer.generate().export()
    # a broker nobody listens on: were the key taken, run would exit 3, not 2
    url = f"amqp://guest@127.0.0.1:{_closed_port()}/"
    assert cli.main(["run", "--service-key", key, "--amqp-url", url]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("forge-worker: --service-key:") and err.count("\n") == 1
    assert "FORGE_WORKER_SERVICE_KEY" in err and "--service-key-file" in err
    assert key not in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["status"], "--amqp-url"),
        (["dlq", "list"], "--amqp-url"),
        (["migrate"], "--database-url"),
        (["run"], "--database-url"),
    ],
)
def test_a_password_in_a_url_flag_exits_2_before_connecting(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _closed_port()
    url = {
        "--amqp-url": f"amqp://guest:pw-in-argv@127.0.0.1:{port}/",
        "--database-url": f"postgresql://postgres:pw-in-argv@127.0.0.1:{port}/x",
    }[flag]
    if argv == ["run"]:
        argv = [*argv, "--amqp-url", f"amqp://guest@127.0.0.1:{port}/"]
    assert cli.main([*argv, flag, url]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"forge-worker: {flag}: a password") and "pw-in-argv" not in err
    assert "@FILE" in err and "FORGE_WORKER_" in err


def test_help_of_run_says_where_secrets_go(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "refused as a flag (ps shows it): set FORGE_WORKER_SERVICE_KEY" in text
    assert "no password in the flag (ps shows it)" in text
