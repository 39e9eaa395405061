"""Keys read from files: the service's (inline, from a file, or a development key created on
first start) and a producer's ``--key`` (``@PATH``, a file, what ``keygen`` prints).

Shared by the service and the producers' tools; never prints or logs a key."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from worker.config import Settings
from worker.errors import ConfigError
from worker.ucan import DecodeError, Signer, UcanError


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """The signer the worker answers with, and where it came from."""

    signer: Signer
    #: ``inline``, ``file`` or ``development`` (created here, not for production)
    source: str
    path: Path | None = None


def _parse(text: str, where: str) -> Signer:
    try:
        return Signer.parse(text.strip())
    except DecodeError:
        # never echo the key: name only where it came from
        raise ConfigError(f"{where}: invalid value (not a valid key)") from None


def _create_dev_key(path: Path) -> Signer:
    signer = Signer.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # O_EXCL: two workers starting together in one directory must not overwrite each other
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(signer.export() + "\n")
    return signer


def _warn_if_exposed(path: Path, log: FilteringBoundLogger) -> None:
    """Warn when group or others may read (or write) the key file: one leak from public."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "service_key_file_exposed",
            path=str(path),
            mode=f"{mode:04o}",
            note="group or others can access the service key: chmod 600 it",
        )


def load_service_key(settings: Settings, log: FilteringBoundLogger) -> ServiceKey:
    """The service signer from the settings, acting as ``settings.service_did`` if given.

    Order: ``FORGE_WORKER_SERVICE_KEY``; else ``FORGE_WORKER_SERVICE_KEY_FILE``; else
    ``.forge-worker/service.key``, created (mode 0600) when absent, with a warning that
    it is a development identity. A key file that group or others can access draws a
    warning. The key itself is never logged.

    Raises:
        ConfigError: a key is malformed or its file unreadable.
    """
    if settings.service_key is not None:
        key = ServiceKey(_parse(settings.service_key, "FORGE_WORKER_SERVICE_KEY"), "inline")
    else:
        path = settings.key_path()
        var = "FORGE_WORKER_SERVICE_KEY_FILE"
        if settings.service_key_file is None and not path.exists():
            try:
                signer = _create_dev_key(path)
            except FileExistsError:
                signer = _parse(path.read_text(encoding="ascii"), str(path))
            except OSError as exc:
                raise ConfigError(f"cannot create a development key at {path}: {exc}") from None
            key = ServiceKey(signer, "development", path)
            log.warning(
                "development_key_created",
                path=str(path),
                did=signer.did,
                note="a development identity: configure FORGE_WORKER_SERVICE_KEY(_FILE) "
                "for production",
            )
        else:
            try:
                text = path.read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{var}: cannot read {path}: {type(exc).__name__}") from None
            source = "file" if settings.service_key_file is not None else "development"
            key = ServiceKey(_parse(text, f"{var} ({path})"), source, path)
            _warn_if_exposed(path, log)
            if source == "development":
                log.warning(
                    "development_key_loaded",
                    path=str(path),
                    did=key.signer.did,
                    note="a development identity: configure FORGE_WORKER_SERVICE_KEY(_FILE) "
                    "for production",
                )
    if settings.service_did is not None:
        key = ServiceKey(key.signer.with_did(settings.service_did), key.source, key.path)
    return key


def read_key(value: str) -> Signer:
    """A signer from ``--key``: ``@PATH``, a path to an existing file, or the key itself.

    Raises:
        ConfigError: the file cannot be read or the text is not a key (never echoed).
    """
    text = value
    path: Path | None = None
    if value.startswith("@"):
        path = Path(value[1:])
    elif len(value) < 4096 and Path(value).is_file():
        path = Path(value)
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--key: cannot read {str(path)!r}: {exc}") from None
    text = text.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError("--key: the file is JSON but not valid JSON") from None
        key = doc.get("key") if isinstance(doc, dict) else None
        if not isinstance(key, str):
            raise ConfigError('--key: the JSON has no "key" text (as keygen --json prints)')
        text = key
    else:
        # keygen's text output: a "key: ..." line among others
        lines = [ln for ln in text.splitlines() if ln.startswith("key:")]
        if len(lines) == 1:
            text = lines[0].removeprefix("key:").strip()
    try:
        return Signer.parse(text)
    except UcanError as exc:
        where = f" in {str(path)!r}" if path is not None else ""
        raise ConfigError(f"--key: not a ucantone Ed25519 key{where} ({exc})") from None
