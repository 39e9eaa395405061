"""The producer commands' own values: DIDs, ``--detail K=V``, policies, commands, output files."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.errors import ConfigError
from worker.produce.invocations import ProofError, load_proofs
from worker.ucan import (
    Delegation,
    UcanError,
    parse_policy,
)


def check_did(value: str, what: str) -> str:
    """``value`` when it looks like a DID.

    Raises:
        ValueError: it does not.
    """
    if not isinstance(value, str) or not value.startswith("did:") or value.count(":") < 2:
        raise ValueError(f"{what} must be a DID such as did:plc:…, got {value!r}")
    if any(c.isspace() for c in value):
        raise ValueError(f"{what} must not contain spaces, got {value!r}")
    return value


def parse_details(pairs: Sequence[str]) -> dict[str, str]:
    """``--detail K=V`` values as a map (a later key wins).

    Raises:
        ConfigError: a value has no ``=`` or an empty key.
    """
    details: dict[str, str] = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--detail: expected KEY=VALUE, got {pair!r}")
        details[key] = val
    return details


def policy_statements(value: str | None) -> list[Any]:
    if value is None:
        return []
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            raise ConfigError(f"--policy: cannot read {value[1:]!r}: {exc.strerror}") from None
    try:
        statements = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--policy: not JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(statements, list):
        raise ConfigError("--policy: expected a JSON array of statements")
    try:
        parse_policy(statements)
    except UcanError as exc:
        raise ConfigError(f"--policy: {exc}") from None
    return statements


def check_command(cmd: str) -> str:
    if not cmd.startswith("/") or cmd != cmd.lower() or (len(cmd) > 1 and cmd.endswith("/")):
        raise ConfigError(f"--command: expected a lowercase /path with no trailing /, got {cmd!r}")
    return cmd


def write_atomically(path: Path, data: bytes, flag: str) -> None:
    """Write ``data`` to ``path`` whole or not at all (through a temporary file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write {str(path)!r}: {exc.strerror}") from None


def proofs_option(path: str | None) -> list[Delegation]:
    """The delegations of ``--proof FILE`` (none without the flag).

    Raises:
        ConfigError: the file cannot be read or holds no delegation.
    """
    if not path:
        return []
    try:
        return load_proofs(path)
    except ProofError as exc:
        raise ConfigError(f"--proof: {exc}") from None
