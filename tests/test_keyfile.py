"""The service key: inline, from a file, or a development key created once (mode 0600)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from worker.config import Secret, Settings
from worker.errors import ConfigError
from worker.keyfile import load_service_key
from worker.log import get_logger
from worker.ucan import Signer


def test_development_key_is_created_once_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with capture_logs() as logs:
        first = load_service_key(Settings(), get_logger())
    path = tmp_path / ".forge-worker" / "service.key"
    assert first.source == "development"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Signer.parse(path.read_text().strip()).did == first.signer.did
    [event] = logs
    assert event["event"] == "development_key_created" and event["log_level"] == "warning"
    assert event["did"] == first.signer.did
    assert path.read_text().strip() not in repr(event)
    again = load_service_key(Settings(), get_logger())
    assert again.signer.did == first.signer.did


def test_inline_and_file_keys_and_acting_as_another_did(tmp_path: Path) -> None:
    signer = Signer.generate()
    inline = load_service_key(Settings(service_key=Secret(signer.export())), get_logger())
    assert (inline.source, inline.signer.did) == ("inline", signer.did)
    f = tmp_path / "k"
    f.write_text("M" + signer.export() + "\n")
    from_file = load_service_key(Settings(service_key_file=f), get_logger())
    assert (from_file.source, from_file.signer.did) == ("file", signer.did)
    web = load_service_key(
        Settings(service_key=Secret(signer.export()), service_did="did:web:upload.example"),
        get_logger(),
    )
    assert web.signer.did == "did:web:upload.example"
    assert web.signer.key_did == signer.did


def test_a_bad_key_names_its_source_and_never_echoes_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_service_key(Settings(service_key=Secret("bm90IGEga2V5")), get_logger())
    assert "FORGE_WORKER_SERVICE_KEY" in str(err.value) and "bm90" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_service_key(Settings(service_key_file=tmp_path / "missing"), get_logger())
    assert "FORGE_WORKER_SERVICE_KEY_FILE" in str(err.value)
