"""Settings: the only reader of the environment.

Every setting has an environment variable (``FORGE_WORKER_*``) and a ``run`` flag of the
same name (``--amqp-url`` for ``FORGE_WORKER_AMQP_URL``); a flag wins over the variable.
A bad value raises :class:`~worker.errors.ConfigError` with one line naming the variable.
The service key is held as a secret: it never appears in ``repr`` or in an error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from worker.amqp.topology import DEFAULT_DELIVERY_LIMIT, DEFAULT_RETRY_DELAYS
from worker.errors import ConfigError

PREFIX: Final = "FORGE_WORKER_"
DEFAULT_KEY_PATH: Final = Path(".forge-worker/service.key")


class Secret(str):
    """A string that does not show itself in ``repr`` or ``str`` of containers."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"expected a {'/'.join(schemes)} URL with a host")
        return raw

    return parse


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer from {lo} to {hi}, got {value}")
        return value

    return parse


def _delays(raw: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in raw.replace(" ", "").split(",") if p)
    except ValueError:
        raise ValueError(f"expected comma-separated seconds such as 1,5,30, got {raw!r}") from None
    if not values or any(v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise ValueError(f"expected increasing positive seconds such as 1,5,30, got {raw!r}")
    return values


def _queue_name(raw: str) -> str:
    name = raw.strip()
    if not name or len(name) > 200 or name.startswith("amq."):
        raise ValueError(f"expected a queue name (1-200 chars, not amq.*), got {raw!r}")
    return name


def _did(raw: str) -> str:
    if not raw.startswith("did:") or raw.count(":") < 2 or any(c.isspace() for c in raw):
        raise ValueError(f"expected a DID such as did:web:upload.example, got {raw!r}")
    return raw


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _log_format(raw: str) -> str:
    if raw not in ("json", "console"):
        raise ValueError(f"expected json or console, got {raw!r}")
    return raw


#: ``FORGE_WORKER_DATABASE_POOLER``: what sits between the worker and Postgres
POOLERS: Final = ("none", "pgbouncer")


def _pooler(raw: str) -> str:
    value = raw.strip().lower()
    if value not in POOLERS:
        raise ValueError(f"expected {' or '.join(POOLERS)}, got {raw!r}")
    return value


def _secret(raw: str) -> Secret:
    if not raw.strip():
        raise ValueError("is empty")
    return Secret(raw.strip())


def _path(raw: str) -> Path:
    return Path(raw)


def _default_log_format() -> str:
    return "console" if sys.stderr.isatty() else "json"


#: ``flag`` rules of a setting given as a command-line flag, where ``ps`` shows it to every
#: user: ``url`` refuses a password inside the URL and reads ``@FILE``; ``never`` refuses it
FLAG_URL: Final = "url"
FLAG_NEVER: Final = "never"


def _opt(
    env: str, parse: Callable[[str], Any], help: str, *, flag: str | None = None, **kw: Any
) -> Any:
    return field(metadata={"env": env, "parse": parse, "help": help, "flag": flag}, **kw)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the worker and its commands are configured with."""

    amqp_url: str = _opt(
        "AMQP_URL",
        _url(("amqp", "amqps")),
        "broker URL",
        flag=FLAG_URL,
        default="amqp://guest:guest@127.0.0.1:5672/",
    )
    database_url: str = _opt(
        "DATABASE_URL",
        _url(("postgresql", "postgres")),
        "upload service database",
        flag=FLAG_URL,
        default="postgresql://postgres@127.0.0.1:5432/postgres",
    )
    database_pooler: str = _opt(
        "DATABASE_POOLER",
        _pooler,
        "none (Postgres itself, or a pooler in session mode) or pgbouncer (PgBouncer in "
        "transaction pooling mode: no named prepared statements)",
        default="none",
    )
    service_key: Secret | None = _opt(
        "SERVICE_KEY",
        _secret,
        "service Ed25519 private key (ucantone format)",
        flag=FLAG_NEVER,
        default=None,
        repr=False,
    )
    service_key_file: Path | None = _opt(
        "SERVICE_KEY_FILE", _path, "file holding the service key", default=None
    )
    service_did: str | None = _opt(
        "SERVICE_DID",
        _did,
        "identity the worker acts as (default: the key's did:key)",
        default=None,
    )
    queue: str = _opt("QUEUE", _queue_name, "inbox queue", default="ucan.invocations")
    receipt_queue: str = _opt(
        "RECEIPT_QUEUE",
        _queue_name,
        "receipts for requests without reply_to",
        default="ucan.receipts",
    )
    http_port: int = _opt(
        "HTTP_PORT",
        _int_range(0, 65535),
        "metrics/health port on 127.0.0.1; 0 turns it off",
        default=9464,
    )
    clock_skew: int = _opt(
        "CLOCK_SKEW",
        _int_range(0, 3600),
        "seconds of leeway on exp/nbf (0: ucantone's rule, never executed after exp)",
        default=0,
    )
    plc_directory: str = _opt(
        "PLC_DIRECTORY",
        _url(("https", "http")),
        "PLC directory did:plc issuers are resolved from (GET {directory}/{did})",
        default="https://plc.directory",
    )
    did_cache_ttl: int = _opt(
        "DID_CACHE_TTL",
        _int_range(0, 7 * 86400),
        "seconds a resolved DID document is kept (failures are not kept)",
        default=10800,
    )
    allow_provision_without_plan: bool = _opt(
        "ALLOW_PROVISION_WITHOUT_PLAN",
        _flag,
        "allow /provider/add for an account with no customer row",
        default=False,
    )
    processes: int = _opt(
        "PROCESSES",
        _int_range(0, 256),
        "worker processes run starts, each a competing consumer (0: one per core)",
        default=1,
    )
    log_format: str = _opt(
        "LOG_FORMAT", _log_format, "json or console", default_factory=_default_log_format
    )
    max_message_size: int = _opt(
        "MAX_MESSAGE_SIZE",
        _int_range(1024, 64 << 20),
        "largest request body accepted (bytes)",
        default=1 << 20,
    )
    prefetch: int = _opt(
        "PREFETCH", _int_range(1, 2000), "unacknowledged messages per consumer", default=200
    )
    delivery_limit: int = _opt(
        "DELIVERY_LIMIT",
        _int_range(1, 1000),
        "broker redeliveries before dead-lettering",
        default=DEFAULT_DELIVERY_LIMIT,
    )
    retry_delays: tuple[int, ...] = _opt(
        "RETRY_DELAYS",
        _delays,
        "seconds of each retry tier, comma-separated",
        default=DEFAULT_RETRY_DELAYS,
    )
    shutdown_timeout: int = _opt(
        "SHUTDOWN_TIMEOUT",
        _int_range(0, 3600),
        "seconds to drain in-flight work on stop",
        default=30,
    )

    def key_path(self) -> Path:
        """Where the service key is read from when it is not given inline."""
        return self.service_key_file or DEFAULT_KEY_PATH


def setting_fields() -> list[tuple[str, str, str]]:
    """(attribute, environment variable, help) of every setting, in declaration order; the
    help of a setting a flag must not carry as text says so."""
    out = []
    for f in fields(Settings):
        var = PREFIX + f.metadata["env"]
        text = f.metadata["help"]
        if f.metadata["flag"] == FLAG_NEVER:
            text += f"; refused as a flag (ps shows it): set {var} or use --service-key-file"
        elif f.metadata["flag"] == FLAG_URL:
            text += (
                "; no password in the flag (ps shows it): put it in the environment variable, "
                "or give @FILE to read the URL from a file"
            )
        out.append((f.name, var, text))
    return out


def _flag_name(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def _has_password(raw: str) -> bool:
    """Whether a URL (or a comma-separated list of them) carries a non-empty password."""
    for part in raw.split(","):
        try:
            if urlsplit(part.strip()).password:
                return True
        except ValueError:  # e.g. a bad port: the parser says what is wrong
            continue
    return False


def _from_flag(attr: str, rule: str | None, raw: str) -> str:
    """The raw value of a setting given as a flag, once the flag rules allow it.

    Raises:
        ConfigError: a secret in the flag's own text (``ps`` shows every process's
            arguments to every user), or an ``@FILE`` that cannot be read.
    """
    flag, var = _flag_name(attr), PREFIX + _ENV[attr]
    if rule == FLAG_NEVER:
        raise ConfigError(
            f"{flag}: a key on the command line is refused (ps shows every process's "
            f"arguments to every user): set {var} or use --service-key-file"
        )
    if rule != FLAG_URL:
        return raw
    if raw.startswith("@"):
        try:
            return Path(raw[1:]).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"{flag}: cannot read {raw[1:]!r}: {reason}") from None
    if _has_password(raw):
        raise ConfigError(
            f"{flag}: a password in a command-line flag is refused (ps shows every process's "
            f"arguments to every user): set {var}, or put the URL in a file and give "
            f"{flag} @FILE"
        )
    return raw


#: attribute -> the variable's name after the prefix
_ENV: Final = {f.name: f.metadata["env"] for f in fields(Settings)}


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def process_environ(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a process that is to run on ``settings``: this process's own
    without any ``FORGE_WORKER_*`` variable, then every setting's (:func:`environ_of`), then
    ``extra`` (names as given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    env.update(environ_of(settings))
    env.update(extra)
    return env


def environ_of(settings: Settings) -> dict[str, str]:
    """The ``FORGE_WORKER_*`` variables that :func:`load` turns back into ``settings``
    (a setting that is ``None`` has none): how ``run --processes N`` hands its settings,
    flags included, to its worker processes without putting a secret in their arguments."""
    out: dict[str, str] = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if value is not None:
            out[PREFIX + f.metadata["env"]] = _format(value)
    return out


def load(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, str | None] | None = None
) -> Settings:
    """Build :class:`Settings` from the environment, with flag values (raw strings) on top.

    Args:
        environ: the environment to read (default ``os.environ``).
        overrides: attribute name to raw flag value; ``None`` means not given. A flag may
            not carry a secret, since ``ps`` shows it: ``service_key`` is refused, and a
            URL with a password too (``@FILE`` reads the URL from a file instead).

    Raises:
        ConfigError: a value is malformed, or a flag carries a secret; the message names
            its variable or flag, never a secret.
    """
    env = os.environ if environ is None else environ
    rules = {f.name: f.metadata["flag"] for f in fields(Settings)}
    given = {
        k: _from_flag(k, rules.get(k), v) for k, v in (overrides or {}).items() if v is not None
    }
    values: dict[str, Any] = {}
    for f in fields(Settings):
        var = PREFIX + f.metadata["env"]
        raw = given.get(f.name, env.get(var))
        if raw is None or (raw == "" and f.name not in given):
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as exc:
            shown = "" if f.name == "service_key" else f" ({exc})"
            if f.name == "service_key":
                shown = f" ({exc})" if str(exc) == "is empty" else " (not a valid key)"
            raise ConfigError(f"{var}: invalid value{shown}") from None
    if "service_key" in values and "service_key_file" in values:
        raise ConfigError(
            f"{PREFIX}SERVICE_KEY and {PREFIX}SERVICE_KEY_FILE: give one or the other, not both"
        )
    return Settings(**values)
