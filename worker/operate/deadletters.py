"""Dead letters described for people and selected (by id, reason, first-death time).

**Dead-letter id**: the message's ``message_id`` when it has one; otherwise ``h:`` and the
first 16 hex digits of SHA-256 over the body, a NUL byte and the first-death time in unix
seconds (empty when unknown). Stable across listings; the same id can name several copies
(the broker's at-least-once dead-lettering may duplicate), and ``--id`` selects them all."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractConnection, AbstractMessage

from worker.amqp import topology
from worker.operate.scan import scanning


@dataclass(frozen=True, slots=True)
class InvocationSummary:
    """What an operator needs to know about one invocation inside a dead letter."""

    cid: str
    iss: str
    cmd: str
    sub: str | None
    customer: str | None
    args: object = None

    def to_json(self, *, args: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "cid": self.cid,
            "iss": self.iss,
            "sub": self.sub,
            "cmd": self.cmd,
            "customer": self.customer,
        }
        if args:
            out["args"] = self.args
        return out


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in the dead-letter queue, decoded for people."""

    id: str
    reason: str
    first_death_at: datetime | None
    attempts: int | None
    origin_queue: str | None
    error: str | None
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    timestamp: datetime | None
    replay_count: int
    size: int
    invocations: tuple[InvocationSummary, ...]
    decode_error: str | None
    headers: Mapping[str, Any] = field(repr=False)
    body: bytes = field(repr=False)

    @property
    def invocation_cids(self) -> list[str]:
        return [i.cid for i in self.invocations]

    def to_json(self, *, full: bool = False) -> dict[str, object]:
        """A JSON-ready dict; ``full`` adds headers, arguments and the body (base64)."""
        out: dict[str, object] = {
            "id": self.id,
            "reason": self.reason,
            "first_death_at": iso(self.first_death_at),
            "attempts": self.attempts,
            "origin_queue": self.origin_queue,
            "error": self.error,
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "reply_to": self.reply_to,
            "timestamp": iso(self.timestamp),
            "replay_count": self.replay_count,
            "size": self.size,
            "invocation_cids": self.invocation_cids,
            "issuers": _unique(i.iss for i in self.invocations),
            "commands": _unique(i.cmd for i in self.invocations),
            "customers": _unique(i.customer for i in self.invocations if i.customer),
            "invocations": [i.to_json(args=full) for i in self.invocations],
            "decode_error": self.decode_error,
        }
        if full:
            out["headers"] = _json_safe(dict(self.headers))
            out["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return out


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json_safe(value: object) -> object:
    """Header values as JSON: datetimes as ISO 8601, bytes as base64, the rest as is."""
    if isinstance(value, datetime):
        return iso(value if value.tzinfo else value.replace(tzinfo=UTC))
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _dag_json(value: object, cid_type: type) -> object:
    """Decoded DAG-CBOR as DAG-JSON: bytes as ``{"/": {"bytes": ...}}``, links as ``{"/": cid}``."""
    if isinstance(value, bytes):
        return {"/": {"bytes": base64.b64encode(value).decode("ascii").rstrip("=")}}
    if isinstance(value, cid_type):
        return {"/": str(value)}
    if isinstance(value, Mapping):
        return {str(k): _dag_json(v, cid_type) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dag_json(v, cid_type) for v in value]
    return value


def _as_datetime(value: object) -> datetime | None:
    """A header's time: unix seconds (int, float or text) or a timestamp, as aware UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _as_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _x_deaths(headers: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    deaths = headers.get("x-death")
    if not isinstance(deaths, list | tuple):
        return []
    return [d for d in deaths if isinstance(d, Mapping)]


def by_broker(headers: Mapping[str, Any]) -> bool:
    """Whether the broker dead-lettered this message (it wrote ``x-death``): then the
    worker's ``forge-*`` headers on it are the publisher's, not the worker's (the worker's
    own dead letters are copies it publishes, which never carry ``x-death``)."""
    return bool(
        _x_deaths(headers)
        or headers.get("x-last-death-reason")
        or headers.get("x-first-death-reason")
    )


def _ours(headers: Mapping[str, Any], name: str) -> Any:
    """One of the worker's own headers, unless a publisher wrote it (see :func:`by_broker`)."""
    return None if by_broker(headers) else headers.get(name)


def death_reason(headers: Mapping[str, Any]) -> str:
    """Why a message was dead-lettered: the broker's reason when the broker dead-lettered it
    (``rejected``, ``expired``, ``maxlen``, ``delivery_limit``; the latest death is the one
    that put it in the dead-letter queue), else the worker's own header."""
    for value in (
        headers.get("x-last-death-reason"),
        next((d.get("reason") for d in _x_deaths(headers)), None),
        headers.get("x-first-death-reason"),
        _ours(headers, topology.H_REASON),
    ):
        text = _as_text(value)
        if text:
            return text
    return "unknown"


def first_death_time(headers: Mapping[str, Any]) -> datetime | None:
    """When the message was first dead-lettered: the earliest ``x-death`` time when the
    broker dead-lettered it (each entry's time is the first for its queue and reason), else
    the worker's own header."""
    times = [t for t in (_as_datetime(d.get("time")) for d in _x_deaths(headers)) if t]
    if times:
        return min(times)
    return _as_datetime(_ours(headers, topology.H_DEAD_LETTERED_AT))


def dead_letter_id(message_id: str | None, body: bytes, first_death: datetime | None) -> str:
    """The stable id of a dead letter (see the module docstring)."""
    if message_id:
        return message_id
    when = b"" if first_death is None else str(int(first_death.timestamp())).encode()
    return "h:" + hashlib.sha256(body + b"\0" + when).hexdigest()[:16]


def summarise_body(
    body: bytes, *, max_size: int = 1 << 20
) -> tuple[list[InvocationSummary], str | None]:
    """The invocations in a request body, or why none could be read."""
    from worker.ucan import CID, DecodeError, decode_request

    try:
        request = decode_request(body, max_size=max_size)
    except DecodeError as exc:
        return [], str(exc) or "cannot decode the body"
    except Exception as exc:  # a dead letter is often one that broke the decoder
        return [], f"cannot decode the body: {type(exc).__name__}: {exc}"
    out: list[InvocationSummary] = []
    for inv in request.invocations:
        args = inv.args
        customer = args.get("customer") if isinstance(args, Mapping) else None
        args_json = _dag_json(args, CID)
        out.append(
            InvocationSummary(
                cid=str(inv.cid),
                iss=inv.iss,
                cmd=inv.cmd,
                sub=inv.sub,
                customer=customer if isinstance(customer, str) else None,
                args=args_json,
            )
        )
    return out, None


def describe(message: AbstractMessage, *, max_size: int = 1 << 20) -> DeadLetter:
    """Decode one dead letter's headers, properties and body."""
    headers: Mapping[str, Any] = message.headers or {}
    first = first_death_time(headers)
    invocations, error = summarise_body(message.body, max_size=max_size)
    timestamp = message.timestamp
    if timestamp is not None and timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return DeadLetter(
        id=dead_letter_id(message.message_id, message.body, first),
        reason=death_reason(headers),
        first_death_at=first,
        attempts=as_int(_ours(headers, topology.H_ATTEMPT)),
        origin_queue=_as_text(_ours(headers, topology.H_ORIGIN_QUEUE))
        or _as_text(headers.get("x-first-death-queue")),
        error=_as_text(_ours(headers, topology.H_ERROR)),
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=timestamp,
        replay_count=as_int(headers.get(topology.H_REPLAY_COUNT)) or 0,
        size=len(message.body),
        invocations=tuple(invocations),
        decode_error=error,
        headers=dict(headers),
        body=message.body,
    )


# --------------------------------------------------------------------------- selecting


def _norm_reason(reason: str) -> str:
    return reason.strip().lower().replace("_", "-")


def parse_since(raw: str) -> datetime:
    """``--since``: unix seconds or ISO 8601 (UTC when no offset is given).

    Raises:
        ValueError: neither.
    """
    text = raw.strip()
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected unix seconds or ISO 8601, got {raw!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command acts on; empty filters select every one.

    ``reason`` matches case-insensitively with ``_`` and ``-`` alike, so ``delivery-limit``
    selects the broker's ``delivery_limit`` too. ``since`` excludes dead letters whose
    first-death time is unknown.
    """

    ids: frozenset[str] = frozenset()
    reason: str | None = None
    since: datetime | None = None
    limit: int | None = None

    @property
    def filtered(self) -> bool:
        return bool(self.ids) or self.reason is not None or self.since is not None

    def matches(self, dl: DeadLetter) -> bool:
        if self.ids and dl.id not in self.ids:
            return False
        if self.reason is not None and _norm_reason(dl.reason) != _norm_reason(self.reason):
            return False
        return self.since is None or (
            dl.first_death_at is not None and dl.first_death_at >= self.since
        )

    def full(self, taken: int) -> bool:
        return self.limit is not None and taken >= self.limit


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_dead_letters(dls: Sequence[DeadLetter]) -> str:
    """The readable listing: one line per dead letter, one indented line per invocation."""
    if not dls:
        return "no dead letters"
    header = ("ID", "REASON", "FIRST DEATH", "ATTEMPTS", "REPLAYS", "ERROR")
    rows = [header]
    for dl in dls:
        error = dl.error or dl.decode_error or ""
        rows.append(
            (
                dl.id,
                dl.reason,
                _when(dl.first_death_at),
                "-" if dl.attempts is None else str(dl.attempts),
                str(dl.replay_count),
                error if len(error) <= 60 else error[:57] + "...",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines: list[str] = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            continue
        for inv in dls[n - 1].invocations:
            customer = f" customer={inv.customer}" if inv.customer else ""
            lines.append(f"    {inv.cid} {inv.cmd} iss={inv.iss}{customer}")
    return "\n".join(lines)


async def read_dead_letters(
    connection: AbstractConnection,
    dead_letter_queue: str,
    *,
    selection: Selection | None = None,
    max_size: int = 1 << 20,
) -> list[DeadLetter]:
    """The dead letters (those ``selection`` picks), read and all put back."""
    sel = selection or Selection()
    out: list[DeadLetter] = []
    async with scanning(connection, dead_letter_queue) as scan:
        async for msg in scan.messages():
            scan.held.append(msg)
            dl = describe(msg, max_size=max_size)
            if sel.matches(dl):
                out.append(dl)
                if sel.full(len(out)):
                    break
    return out
