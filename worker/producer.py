"""``keygen``, ``delegate`` and ``enqueue``: the producer's commands, over :mod:`worker.client`.

Keys (``--key KEY``): ``@PATH`` reads the key from the file at PATH; otherwise, a value that
names an existing file is read from that file; otherwise the value is the key itself
(ucantone format). A file may hold the bare key, or what ``keygen`` or ``keygen --json`` prints.
Prefer a file: a key on the command line is visible to other users of the machine. Keys are
never printed, except by ``keygen`` itself.

Bulk input (``enqueue --from FILE``): NDJSON (``.ndjson``, ``.jsonl``, ``.json``, or any file
whose first character is ``{``), one object per line with ``customer``, ``product``,
optional ``external_account`` (or ``externalAccount``) and ``details`` (an object of text);
or CSV with a header row naming ``customer``, ``product``, optional ``external_account``,
``details`` (a JSON object) and/or ``detail.<KEY>`` columns (an empty cell leaves the key
out). A bad row is recorded as an ``InvalidInput`` failure and the batch goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, TextIO

from worker.cli import EXIT_CHECK_FAILED, EXIT_OK
from worker.client import (
    Client,
    ClientError,
    CustomerAdd,
    ProofError,
    ReceiptError,
    SignedRequest,
    build_customer_add,
    load_proofs,
)
from worker.config import Settings
from worker.errors import ConfigError
from worker.ucan import (
    CID,
    Delegation,
    Signer,
    UcanError,
    encode_container,
    encode_delegation,
    parse_policy,
)

#: the name recorded for a row of the input file that cannot be used
INVALID_INPUT: Final = "InvalidInput"
_NDJSON_SUFFIXES: Final = (".ndjson", ".jsonl", ".json")
_CSV_FIELDS: Final = frozenset({"customer", "product", "external_account", "details"})
_JSON_FIELDS: Final = frozenset(
    {"customer", "product", "external_account", "externalAccount", "details"}
)


# --- keys, details, DIDs -----------------------------------------------------------------


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


def _text_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object of text values, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise ValueError(f"{what}[{k!r}] must be text, got {type(v).__name__}")
    return dict(value)


# --- bulk input --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One registration read from a bulk file, or why it cannot be used."""

    #: 1-based line number in the file (CSV: the line the record ends on)
    line: int
    args: CustomerAdd | None
    error: str | None = None


def _registration(
    customer: object, product: object, details: object, external: object
) -> CustomerAdd:
    if external is not None and not isinstance(external, str):
        raise ValueError(f"external_account must be text, got {type(external).__name__}")
    return CustomerAdd(
        customer=check_did(customer, "customer"),  # type: ignore[arg-type]
        product=check_did(product, "product"),  # type: ignore[arg-type]
        details=_text_map({} if details is None else details, "details"),
        external_account=external or None,
    )


def read_ndjson(stream: IO[str]) -> Iterator[Row]:
    """Rows of an NDJSON stream; blank lines are skipped."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
            if not isinstance(doc, dict):
                raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
            unknown = set(doc) - _JSON_FIELDS
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            external = doc.get("external_account", doc.get("externalAccount"))
            yield Row(
                number,
                _registration(
                    doc.get("customer"), doc.get("product"), doc.get("details"), external
                ),
            )
        except ValueError as exc:
            yield Row(number, None, str(exc))


def read_csv(stream: IO[str]) -> Iterator[Row]:
    """Rows of a CSV stream with a header row.

    Raises:
        ConfigError: the header lacks ``customer`` or ``product`` or names unknown columns.
    """
    reader = csv.DictReader(stream)
    header = reader.fieldnames or []
    unknown = [c for c in header if c not in _CSV_FIELDS and not c.startswith("detail.")]
    if unknown or not {"customer", "product"} <= set(header):
        raise ConfigError(
            "--from: a CSV header needs customer and product, and may add external_account, "
            f"details and detail.<KEY>; got {header!r}"
        )
    for record in reader:
        number = reader.line_num
        try:
            if None in record:
                raise ValueError("more cells than header columns")
            details: dict[str, str] = {}
            if record.get("details"):
                try:
                    parsed = json.loads(record["details"])
                except json.JSONDecodeError as exc:
                    raise ValueError(f"details is not JSON: {exc.msg}") from None
                details.update(_text_map(parsed, "details"))
            for col, cell in record.items():
                if col.startswith("detail.") and cell:
                    details[col.removeprefix("detail.")] = cell
            yield Row(
                number,
                _registration(
                    record.get("customer") or None,
                    record.get("product") or None,
                    details,
                    record.get("external_account") or None,
                ),
            )
        except ValueError as exc:
            yield Row(number, None, str(exc))


def read_rows(path: Path) -> list[Row]:
    """Every row of a bulk file, NDJSON or CSV (see the module docstring).

    Raises:
        ConfigError: the file cannot be read or is not a CSV with a usable header.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            first = stream.read(4096).lstrip()[:1]
            stream.seek(0)
            if path.suffix.lower() in _NDJSON_SUFFIXES or (
                path.suffix.lower() != ".csv" and first == "{"
            ):
                return list(read_ndjson(stream))
            return list(read_csv(stream))
    except OSError as exc:
        raise ConfigError(f"--from: cannot read {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--from: {str(path)!r} is not UTF-8 text") from None


# --- keygen, delegate --------------------------------------------------------------------


def keygen_main(args: argparse.Namespace, settings: Settings) -> int:
    """``keygen``: a new Ed25519 key and its did:key (the only command that prints a key)."""
    signer = Signer.generate()
    if args.json:
        print(json.dumps({"did": signer.did, "key": signer.export()}))
    else:
        print(f"did: {signer.did}")
        print(f"key: {signer.export()}")
    return EXIT_OK


def _policy(value: str | None) -> list[Any]:
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


def _check_command(cmd: str) -> str:
    if not cmd.startswith("/") or cmd != cmd.lower() or (len(cmd) > 1 and cmd.endswith("/")):
        raise ConfigError(f"--command: expected a lowercase /path with no trailing /, got {cmd!r}")
    return cmd


def _write(path: Path, data: bytes, flag: str) -> None:
    """Write ``data`` to ``path`` whole or not at all (through a temporary file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write {str(path)!r}: {exc.strerror}") from None


def delegate_main(args: argparse.Namespace, settings: Settings) -> int:
    """``delegate``: the issuer's key signs a delegation; ``--out`` gets it as a container."""
    signer = read_key(args.key)
    try:
        if args.issuer_did:
            signer = signer.with_did(check_did(args.issuer_did, "--issuer-did"))
        audience = check_did(args.to, "--to")
        subject = check_did(args.subject, "--subject") if args.subject else signer.did
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.expires_in is not None and args.expires_in <= 0:
        raise ConfigError(f"--expires-in: expected a positive number, got {args.expires_in}")
    exp = None if args.expires_in is None else int(time.time()) + args.expires_in
    token = encode_delegation(
        signer,
        aud=audience,
        sub=subject,
        cmd=_check_command(args.delegated_command),
        pol=_policy(args.policy),
        exp=exp,
    )
    body = encode_container([token], header=0x42 if args.base64 else None)
    out = Path(args.out)
    _write(out, body, "--out")
    doc = {
        "cid": str(CID.dag_cbor(token)),
        "iss": signer.did,
        "aud": audience,
        "sub": subject,
        "cmd": args.delegated_command,
        "exp": exp,
        "out": str(out),
    }
    if args.json:
        print(json.dumps(doc))
    else:
        never = "never" if exp is None else f"at {exp}"
        print(f"wrote {out}: delegation {doc['cid']}")
        print(f"  {signer.did} -> {audience}: {args.delegated_command} on {subject}")
        print(f"  expires {never}")
    return EXIT_OK


# --- enqueue -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Setup:
    signer: Signer
    service: str
    proofs: list[Delegation]


def _setup(args: argparse.Namespace) -> _Setup:
    signer = read_key(args.key)
    try:
        if args.issuer_did:
            signer = signer.with_did(check_did(args.issuer_did, "--issuer-did"))
        service = check_did(args.service, "--service")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    proofs: list[Delegation] = []
    if args.proof:
        try:
            proofs = load_proofs(args.proof)
        except ProofError as exc:
            raise ConfigError(f"--proof: {exc}") from None
    # fail before connecting when the proofs cannot authorize the key at all
    try:
        build_customer_add(
            signer, service, CustomerAdd("did:x:probe", "did:x:probe"), proofs=proofs
        )
    except ProofError as exc:
        raise ConfigError(f"--proof: {exc}") from None
    return _Setup(signer, service, proofs)


def _client(
    args: argparse.Namespace, settings: Settings, setup: _Setup, *, replies: bool
) -> Client:
    try:
        return Client(
            settings.amqp_url,
            signer=setup.signer,
            service_did=setup.service,
            proofs=setup.proofs,
            queue=settings.queue,
            lifetime=args.expires_in,
            timeout=args.timeout,
            service_key_did=args.service_key_did,
            replies=replies,
            client_id=args.client_id,
        )
    except UcanError as exc:
        raise ConfigError(f"--service-key-did: {exc}") from None


def outcome_record(
    line: int | None,
    customer: str | None,
    request: SignedRequest | None,
    error: tuple[str, str] | None,
) -> dict[str, Any]:
    """One line of the results file (and of ``enqueue --json``)."""
    return {
        "line": line,
        "customer": customer,
        "task": None if request is None else str(request.task),
        "invocation": None if request is None else str(request.cid),
        "ok": error is None,
        "error": None if error is None else {"name": error[0], "message": error[1]},
    }


def enqueue_main(args: argparse.Namespace, settings: Settings) -> int:
    """``enqueue``: one registration (``--customer``...) or many (``--from FILE``)."""
    if args.timeout <= 0 or args.concurrency < 1 or args.attempts < 1:
        raise ConfigError("--timeout, --concurrency and --attempts must be positive")
    if args.expires_in is not None and args.expires_in <= 0:
        raise ConfigError(f"--expires-in: expected a positive number, got {args.expires_in}")
    if args.receipt and not args.wait:
        raise ConfigError("--receipt needs --wait")
    if args.from_file:
        if args.customer or args.product or args.detail or args.external_account or args.receipt:
            raise ConfigError("--from: give registrations in the file or as flags, not both")
        rows = read_rows(Path(args.from_file))
        setup = _setup(args)
        results: IO[str] | None = None
        if args.results:
            try:
                results = Path(args.results).open("w", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(
                    f"--results: cannot write {args.results!r}: {exc.strerror}"
                ) from None
        try:
            return asyncio.run(_bulk(args, settings, setup, rows, results))
        finally:
            if results is not None:
                results.close()
    if not args.customer or not args.product:
        raise ConfigError("enqueue: --customer and --product are required (or --from FILE)")
    try:
        registration = CustomerAdd(
            check_did(args.customer, "--customer"),
            check_did(args.product, "--product"),
            parse_details(args.detail),
            args.external_account,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    setup = _setup(args)
    return asyncio.run(_single(args, settings, setup, registration))


async def _single(
    args: argparse.Namespace, settings: Settings, setup: _Setup, registration: CustomerAdd
) -> int:
    async with _client(args, settings, setup, replies=args.wait) as client:
        request = client.build(registration)
        error: tuple[str, str] | None = None
        receipt: bytes | None = None
        try:
            if args.wait:
                receipt = (await client.call(request, attempts=args.attempts)).receipt.raw
            else:
                await client.publish(request, reply=False)
        except ReceiptError as exc:
            error, receipt = (exc.name, exc.message), exc.receipt.raw
        except ClientError as exc:
            error = (exc.name, exc.message)
    if args.receipt and receipt is not None:
        _write(Path(args.receipt), receipt, "--receipt")
    record = outcome_record(None, registration.customer, request, error)
    del record["line"]
    if not args.wait:
        record["ok"] = None if error is None else False
    if args.json:
        print(json.dumps(record))
    elif error is not None:
        print(f"error {error[0]}: {error[1]} (task {request.task})", file=sys.stderr)
    elif args.wait:
        print(f"ok: task {request.task} (invocation {request.cid})")
    else:
        print(
            f"enqueued: task {request.task} (invocation {request.cid}); receipt to "
            f"{settings.receipt_queue!r}"
        )
    return EXIT_OK if error is None else EXIT_CHECK_FAILED


class Progress:
    """A one-line progress bar on a terminal; silent elsewhere."""

    WIDTH: Final = 30

    def __init__(self, total: int, stream: TextIO, *, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream
        self.enabled = enabled
        self._last = 0.0

    def advance(self, *, ok: bool) -> None:
        """Count one outcome and redraw at most ten times a second (always at the end)."""
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or self.done == self.total):
            self._last = now
            filled = self.WIDTH * self.done // max(self.total, 1)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(
                f"\r[{bar}] {self.done}/{self.total} ok {self.done - self.failed} "
                f"failed {self.failed}"
            )
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


async def _bulk(
    args: argparse.Namespace,
    settings: Settings,
    setup: _Setup,
    rows: Sequence[Row],
    results: IO[str] | None,
) -> int:
    progress = Progress(len(rows), sys.stderr, enabled=sys.stderr.isatty())
    names: Counter[str] = Counter()
    pending = iter(rows)

    def record(row: Row, request: SignedRequest | None, error: tuple[str, str] | None) -> None:
        customer = None if row.args is None else row.args.customer
        line = outcome_record(row.line, customer, request, error)
        if error is not None:
            names[error[0]] += 1
        if results is not None:
            results.write(json.dumps(line) + "\n")
            results.flush()
        elif error is not None and not progress.enabled:
            print(json.dumps(line), file=sys.stderr)
        progress.advance(ok=error is None)

    async def lane(client: Client) -> None:
        for row in pending:  # the lanes share one iterator: each row is taken once
            if row.args is None:
                record(row, None, (INVALID_INPUT, row.error or "unusable row"))
                continue
            request: SignedRequest | None = None
            try:
                request = client.build(row.args)
                await client.call(request, attempts=args.attempts)
            except ClientError as exc:
                record(row, request, (exc.name, exc.message))
            else:
                record(row, request, None)

    async with _client(args, settings, setup, replies=True) as client:
        lanes = min(args.concurrency, max(len(rows), 1))
        await asyncio.gather(*(lane(client) for _ in range(lanes)))
    failed = sum(names.values())
    summary = {
        "total": len(rows),
        "ok": len(rows) - failed,
        "failed": failed,
        "errors": dict(names),
        "results": args.results,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        detail = ", ".join(f"{n} {name}" for name, n in names.most_common())
        print(
            f"enqueued {summary['total']}: {summary['ok']} ok, {failed} failed"
            + (f" ({detail})" if detail else "")
            + (f"; outcomes in {args.results}" if args.results else ""),
            file=sys.stderr,
        )
    return EXIT_OK if failed == 0 else EXIT_CHECK_FAILED


__all__ = [
    "INVALID_INPUT",
    "Progress",
    "Row",
    "check_did",
    "delegate_main",
    "enqueue_main",
    "keygen_main",
    "outcome_record",
    "parse_details",
    "read_csv",
    "read_key",
    "read_ndjson",
    "read_rows",
]
