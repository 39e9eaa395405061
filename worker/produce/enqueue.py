"""``enqueue``: one ``/customer/add`` (``--customer`` ...) or many (``--from FILE``), over
:mod:`worker.produce.client`; or, with ``--out FILE``, the signed request written to a file
(:mod:`worker.produce.offline`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from worker.config import Settings
from worker.errors import EXIT_CHECK_FAILED, EXIT_OK, ConfigError
from worker.keyfile import read_key
from worker.produce.bulk import INVALID_INPUT, Progress, Row, read_rows
from worker.produce.client import (
    DEFAULT_REPLY,
    Client,
    ClientError,
    CustomerAdd,
    ProofError,
    ReceiptError,
    SignedRequest,
    build_customer_add,
)
from worker.produce.offline import check_out, write_request
from worker.produce.options import check_did, parse_details, proofs_option, write_atomically
from worker.ucan import (
    Delegation,
    Signer,
    UcanError,
)


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
    proofs = proofs_option(args.proof)
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
            reply=getattr(args, "reply", None) or DEFAULT_REPLY,
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
    if args.out:
        check_out(args)
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
    if args.out:
        return _write(args, settings, setup, registration)
    return asyncio.run(_single(args, settings, setup, registration))


def _write(
    args: argparse.Namespace, settings: Settings, setup: _Setup, registration: CustomerAdd
) -> int:
    """``--out FILE``: sign as :meth:`Client.build` would and write the body; no broker."""
    request = build_customer_add(
        setup.signer,
        setup.service,
        registration,
        proofs=setup.proofs,
        lifetime=args.expires_in,
    )
    written = write_request(args.out, request)
    if args.json:
        record = outcome_record(None, registration.customer, request, None)
        del record["line"]
        record["ok"] = None  # not sent: no outcome yet
        print(json.dumps({**record, **written.to_json()}))
    else:
        print(written.line(settings.queue))
    return EXIT_OK


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
        write_atomically(Path(args.receipt), receipt, "--receipt")
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
