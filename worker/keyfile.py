"""Keys read from files: the service's (inline, from a file, or a development key created on
first start) and a producer's ``--key`` (``@FILE``, a path, or ``-`` for standard input;
never the key's text, which ``ps`` would show).

Shared by the service and the producers' tools; never prints or logs a key."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

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


def _read_key_file(settings: Settings, path: Path) -> ServiceKey:
    var = "FORGE_WORKER_SERVICE_KEY_FILE"
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{var}: cannot read {path}: {type(exc).__name__}") from None
    source = "file" if settings.service_key_file is not None else "development"
    return ServiceKey(_parse(text, f"{var} ({path})"), source, path)


def find_service_key(settings: Settings) -> ServiceKey:
    """The service signer ``run`` would use, acting as ``settings.service_did`` if given,
    without creating a development key and without logging (for ``forge-worker did``).

    Raises:
        ConfigError: no key is configured and no development key exists yet, or a key is
            malformed or its file unreadable.
    """
    if settings.service_key is not None:
        key = ServiceKey(_parse(settings.service_key, "FORGE_WORKER_SERVICE_KEY"), "inline")
    else:
        path = settings.key_path()
        if settings.service_key_file is None and not path.exists():
            raise ConfigError(
                "no service key: neither FORGE_WORKER_SERVICE_KEY nor "
                f"FORGE_WORKER_SERVICE_KEY_FILE is set and {str(path)!r} does not exist "
                "(forge-worker run creates a development key there on its first start)"
            )
        key = _read_key_file(settings, path)
    if settings.service_did is not None:
        key = ServiceKey(key.signer.with_did(settings.service_did), key.source, key.path)
    return key


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
            key = _read_key_file(settings, path)
            _warn_if_exposed(path, log)
            if key.source == "development":
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


#: how ``--key`` takes a key, named in every refusal (CONTRACT §7)
KEY_WAYS: Final = "a file holding it (@FILE or a path) or - to read it from standard input"
#: the refusal of a key's text given as a command-line value
KEY_ON_COMMAND_LINE: Final = (
    "a key's text on the command line is refused: ps shows every process's arguments to "
    f"every user of the machine; give {KEY_WAYS}"
)
#: the most ``--key -`` reads from standard input (a key file is under 200 bytes)
_MAX_KEY_INPUT: Final = 64 << 10
#: what a key's text could look like (base64, optionally multibase ``M``), never a path
_KEY_LIKE: Final = re.compile(r"M?[A-Za-z0-9+/]{40,}={0,2}")


def _looks_like_a_key(value: str) -> bool:
    """Whether ``value`` may be key material (so it must be neither used nor echoed)."""
    text = value.strip()
    if _KEY_LIKE.fullmatch(text) or text.startswith("{") or "key:" in text:
        return True
    try:
        Signer.parse(text)
    except UcanError:
        return False
    return True


def _key_source(value: str, flag: str) -> tuple[str, str]:
    """The text behind a ``--key`` value and a name for where it came from.

    Raises:
        ConfigError: the value is a key's text, or names no readable file.
    """
    if value == "-":
        try:
            return sys.stdin.read(_MAX_KEY_INPUT), "standard input"
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{flag}: cannot read standard input: {exc}") from None
    explicit = value.startswith("@")
    path = Path(value[1:] if explicit else value)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a name too long for a path, a NUL byte
        is_file = False
    if not is_file:
        if _looks_like_a_key(str(path)):  # "@" + a key's text too
            raise ConfigError(f"{flag}: {KEY_ON_COMMAND_LINE}")
        if explicit:
            raise ConfigError(f"{flag}: cannot read {str(path)!r}: not a file")
        raise ConfigError(f"{flag}: no such file {value!r}; give {KEY_WAYS}")
    try:
        return path.read_text(), repr(str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag}: cannot read {str(path)!r}: {exc}") from None


def read_key(value: str, flag: str = "--key") -> Signer:
    """A signer from ``--key``: ``@FILE`` or a path to a file, or ``-`` for standard input.

    The file (or input) holds the key in ucantone's format, or what ``keygen`` prints
    (its JSON document, or its ``key: ...`` line among others). A key's own text as the
    value is refused, without echoing it: ``ps`` shows arguments to every user.

    Raises:
        ConfigError: the value is a key's text, the file cannot be read, or it holds no key
            (never echoed).
    """
    text, where = _key_source(value, flag)
    text = text.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{flag}: {where} is JSON but not valid JSON") from None
        key = doc.get("key") if isinstance(doc, dict) else None
        if not isinstance(key, str):
            raise ConfigError(f'{flag}: the JSON has no "key" text (as keygen --json prints)')
        text = key
    else:
        # keygen's text output: a "key: ..." line among others
        lines = [ln for ln in text.splitlines() if ln.startswith("key:")]
        if len(lines) == 1:
            text = lines[0].removeprefix("key:").strip()
    try:
        return Signer.parse(text)
    except UcanError as exc:
        raise ConfigError(
            f"{flag}: not a ucantone Ed25519 or secp256k1 key in {where} ({exc})"
        ) from None
