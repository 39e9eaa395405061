"""``forge-worker inspect``: decode a request body, response or token file offline, validate
each invocation and verify each receipt's signature.

Offline, a did:plc issuer (an account's ``/provider/add``) cannot be verified: its keys are
in its document at the PLC directory. ``--plc-directory URL`` fetches the documents of the
file's did:plc issuers first (``GET URL/{did}``, as the worker does) and validates with them;
that is the one request ``inspect`` then makes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Final

import aiohttp

from worker.config import Settings
from worker.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE
from worker.ucan import (
    CID,
    DecodeError,
    Delegation,
    DidDocument,
    Invocation,
    Receipt,
    Request,
    Resolver,
    Signer,
    ValidationError,
    check_audience,
    decode_request,
    parse_plc_document,
    plc_did_problem,
    to_dag_json,
    validate_invocation,
    verify_signature,
)
from worker.ucan.plc import MAX_DOCUMENT_SIZE

#: the largest file ``inspect`` reads (a request body is at most 1 MiB by default)
MAX_FILE: Final = 16 << 20
#: most did:plc issuers of one file resolved with ``--plc-directory`` (the worker's bound)
MAX_PLC_DIDS: Final = 16
#: seconds each document may take (ucantone's resolver allows 10 s)
PLC_TIMEOUT: Final = 10.0


def _kind(tok: Invocation | Delegation | Receipt) -> str:
    if isinstance(tok, Delegation):
        return "delegation"
    if isinstance(tok, Receipt):
        return "receipt"
    return "invocation"


def _resolver(settings: Settings, service_did: str | None) -> Resolver:
    """did:key, plus the service's own key under a configured non-did:key service DID."""
    did = service_did or settings.service_did
    if not did or did.startswith("did:key:"):
        return Resolver()
    text: str | None = str(settings.service_key) if settings.service_key else None
    if text is None and settings.service_key_file is not None:
        try:
            text = settings.service_key_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            text = None
    if text is None:
        return Resolver()
    try:
        signer = Signer.parse(text)
    except DecodeError:
        return Resolver()
    return Resolver({did: [signer.public_key]})


def plc_documents(
    request: Request, directory: str
) -> tuple[dict[str, DidDocument], dict[str, str]]:
    """The documents of the request's did:plc issuers at ``directory``, and for each DID it
    could not give, the text a worker's receipt would carry (``unexpected status: 404``)."""
    dids = [
        did
        for did in dict.fromkeys(t.iss for t in request.tokens)
        if did.startswith("did:plc:") and plc_did_problem(did) is None
    ][:MAX_PLC_DIDS]
    if not dids:
        return {}, {}
    return asyncio.run(_fetch_documents(directory.rstrip("/"), dids))


async def _fetch_documents(
    directory: str, dids: list[str]
) -> tuple[dict[str, DidDocument], dict[str, str]]:
    documents: dict[str, DidDocument] = {}
    failures: dict[str, str] = {}
    timeout = aiohttp.ClientTimeout(total=PLC_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for did in dids:
            try:
                async with session.get(f"{directory}/{did}", allow_redirects=False) as resp:
                    body = await resp.content.read(MAX_DOCUMENT_SIZE + 1)
                    status = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failures[did] = f"performing HTTP request: {type(exc).__name__}: {exc}"
                continue
            if status != 200:
                failures[did] = f"unexpected status: {status} (the PLC directory at {directory})"
                continue
            try:
                documents[did] = parse_plc_document(body, did)
            except DecodeError as exc:
                failures[did] = f"{exc} (from {directory})"
    return documents, failures


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(MAX_FILE + 1)
    with Path(path).open("rb") as f:
        return f.read(MAX_FILE + 1)


def _receipt(receipt: Receipt, resolver: Resolver, service_did: str | None) -> dict[str, Any]:
    """One entry of ``receipts``: ``valid`` when its signature verifies against ``iss`` (and,
    given ``--service-did``, ``iss`` is that service); ``problem`` says why not."""
    problem: dict[str, str] | None = None
    try:
        if service_did is not None and receipt.iss != service_did:
            raise ValidationError(
                "InvalidIssuer", f"receipt issued by {receipt.iss!r}, not by {service_did!r}"
            )
        verify_signature(receipt, resolver)
    except ValidationError as exc:
        problem = {"name": exc.name, "message": exc.message}
    out: dict[str, Any]
    if receipt.error is not None:
        out = {
            "error": {
                "name": str(receipt.error.get("name", "")),
                "message": str(receipt.error.get("message", "")),
            }
        }
    else:
        out = {"ok": to_dag_json(receipt.ok)}
    return {
        "cid": str(receipt.cid),
        "iss": receipt.iss,
        "ran": str(receipt.ran),
        "out": out,
        "valid": problem is None,
        "problem": problem,
    }


def report(
    request: Request,
    *,
    now: int,
    clock_skew: int = 0,
    service_did: str | None = None,
    resolver: Resolver | None = None,
) -> dict[str, Any]:
    """The JSON document of CONTRACT §7 for a decoded request."""
    tokens = [
        {"kind": _kind(t), "cid": str(t.cid), "iss": t.iss, "cmd": t.cmd} for t in request.tokens
    ]
    proofs: dict[CID, Delegation] = request.delegations
    invocations = []
    for inv in request.invocations:
        error: dict[str, str] | None = None
        try:
            if service_did is not None:
                check_audience(inv, service_did)
            validate_invocation(inv, proofs, now=now, clock_skew=clock_skew, resolver=resolver)
        except ValidationError as exc:
            error = {"name": exc.name, "message": exc.message}
        invocations.append(
            {
                "cid": str(inv.cid),
                "task": str(inv.task_cid),
                "iss": inv.iss,
                "sub": inv.sub,
                "aud": inv.aud,
                "cmd": inv.cmd,
                "args": to_dag_json(inv.args),
                "valid": error is None,
                "error": error,
            }
        )
    checker = resolver or Resolver()
    receipts = [_receipt(r, checker, service_did) for r in request.receipts]
    return {"tokens": tokens, "invocations": invocations, "receipts": receipts}


def _receipt_line(r: dict[str, Any]) -> str:
    """One line per receipt (an error message's newlines stay inside its JSON string)."""
    verdict = "VALID" if r["valid"] else f"INVALID {r['problem']['name']}"
    line = f"receipt {r['cid']}: {verdict}  ran {r['ran']}  from {r['iss']}  out "
    line += json.dumps(r["out"], ensure_ascii=False)
    if not r["valid"]:
        line += f"  reason: {json.dumps(r['problem']['message'], ensure_ascii=False)}"
    return line


def _text(doc: dict[str, Any], dropped: list[str], now: int) -> str:
    lines = [f"{len(doc['tokens'])} token(s), validated at {now}:"]
    for t in doc["tokens"]:
        lines.append(f"  {t['kind']:<10} {t['cid']}  {t['cmd']}  from {t['iss']}")
    for reason in dropped:
        lines.append(f"  skipped    {reason}")
    for inv in doc["invocations"]:
        verdict = "VALID" if inv["valid"] else f"INVALID {inv['error']['name']}"
        lines.append("")
        lines.append(f"invocation {inv['cid']}: {verdict}")
        if not inv["valid"]:
            lines.append(f"  reason:  {inv['error']['message']}")
        lines.append(f"  task:    {inv['task']}")
        lines.append(f"  command: {inv['cmd']}")
        lines.append(f"  issuer:  {inv['iss']}")
        lines.append(f"  subject: {inv['sub']}")
        lines.append(f"  audience: {inv['aud'] if inv['aud'] is not None else '(none: subject)'}")
        lines.append(f"  args:    {json.dumps(inv['args'], ensure_ascii=False, sort_keys=False)}")
    if doc["receipts"]:
        lines.append("")
        lines.extend(_receipt_line(r) for r in doc["receipts"])
    if not doc["invocations"] and not doc["receipts"]:
        lines.append("no invocations")
    return "\n".join(lines)


def inspect_main(args: argparse.Namespace, settings: Settings) -> int:
    """Decode FILE, validate each invocation against the delegations beside it, verify each
    receipt's signature, print.

    Returns:
        0 when every invocation is valid and every receipt verifies (whether its outcome is
        ok or an error), 1 when one does not or nothing can be decoded, 2 when the file
        cannot be read.
    """
    try:
        body = _read(args.file)
    except OSError as exc:
        print(
            f"forge-worker inspect: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr
        )
        return EXIT_USAGE
    if len(body) > MAX_FILE:
        print(
            f"forge-worker inspect: cannot read {args.file}: larger than {MAX_FILE} bytes",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        request = decode_request(body, max_size=MAX_FILE)
    except DecodeError as exc:
        print(f"forge-worker inspect: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    if not request.tokens:
        reason = request.dropped[0] if request.dropped else "the container is empty"
        print(f"forge-worker inspect: no readable token: {reason}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    now = int(time.time()) if args.now is None else int(args.now)
    skew = int(getattr(args, "clock_skew", 0) or 0)
    resolver = _resolver(settings, args.service_did)
    directory = getattr(args, "plc_directory", None)
    if directory:
        resolver = resolver.with_documents(*plc_documents(request, directory))
    doc = report(
        request,
        now=now,
        clock_skew=skew,
        service_did=args.service_did,
        resolver=resolver,
    )
    if args.json:
        for reason in request.dropped:
            print(f"forge-worker inspect: skipped {reason}", file=sys.stderr)
        print(json.dumps(doc, ensure_ascii=False))
    else:
        print(_text(doc, request.dropped, now))
    # an error receipt that verifies is a valid receipt: only signatures decide here
    valid = all(i["valid"] for i in doc["invocations"]) and all(r["valid"] for r in doc["receipts"])
    return EXIT_OK if valid else EXIT_CHECK_FAILED
