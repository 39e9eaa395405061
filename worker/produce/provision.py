"""``provision`` (one ``/provider/add``, as Hilt's ``ProvisionSpace``) and ``space-info``
(``/space/info``), over :mod:`worker.produce.client`; ``provision --out FILE`` writes the
signed request to a file instead (:mod:`worker.produce.offline`).

Both follow ``enqueue``'s conventions: keys from files or standard input, one JSON document
with ``--json``, errors as ``error NAME: message`` on standard error, exit 1 for an error
receipt or a failed wait, 2 for usage, 3 for a broker that cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from worker.config import Settings
from worker.errors import EXIT_CHECK_FAILED, EXIT_OK, ConfigError
from worker.keyfile import read_key
from worker.produce.client import (
    Client,
    ClientError,
    ProofError,
    Provisioned,
    ReceiptError,
    SignedRequest,
    SpaceInfo,
    build_provider_add,
    build_space_info,
)
from worker.produce.offline import check_out, write_request
from worker.produce.options import check_did, proofs_option, write_atomically
from worker.ucan import Delegation, Signer, UcanError

#: provision's flags that need the broker, refused with ``--out``
_BROKER_FLAGS = {"wait": "--wait", "receipt": "--receipt"}


def _check_numbers(args: argparse.Namespace) -> None:
    if args.timeout <= 0 or args.attempts < 1:
        raise ConfigError("--timeout and --attempts must be positive")
    if args.expires_in <= 0:
        raise ConfigError(f"--expires-in: expected a positive number, got {args.expires_in}")


def _signer(args: argparse.Namespace) -> Signer:
    """``--key``, acting as ``--as`` when given."""
    signer = read_key(args.key)
    if args.as_did:
        try:
            signer = signer.with_did(check_did(args.as_did, "--as"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return signer


def _dids(args: argparse.Namespace, *names: str) -> list[str]:
    try:
        return [check_did(getattr(args, name), f"--{name}") for name in names]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _client(
    args: argparse.Namespace,
    settings: Settings,
    signer: Signer,
    service: str,
    *,
    proofs: list[Delegation] | None = None,
    replies: bool,
) -> Client:
    try:
        return Client(
            settings.amqp_url,
            signer=signer,
            service_did=service,
            proofs=proofs or [],
            queue=settings.queue,
            lifetime=args.expires_in,
            timeout=args.timeout,
            service_key_did=args.service_key_did,
            replies=replies,
            client_id=args.client_id,
        )
    except UcanError as exc:
        raise ConfigError(f"--service-key-did: {exc}") from None


def _record(request: SignedRequest, error: tuple[str, str] | None) -> dict[str, Any]:
    return {
        "task": str(request.task),
        "invocation": str(request.cid),
        "ok": error is None,
        "error": None if error is None else {"name": error[0], "message": error[1]},
    }


# --- provision ---------------------------------------------------------------------------


def provision_main(args: argparse.Namespace, settings: Settings) -> int:
    """``provision``: one ``/provider/add`` of ``--space`` by the account ``--as``."""
    _check_numbers(args)
    if args.out:
        check_out(args, _BROKER_FLAGS)
    if args.receipt and not args.wait:
        raise ConfigError("--receipt needs --wait")
    service, space = _dids(args, "service", "space")
    provider = _dids(args, "provider")[0] if args.provider else service
    signer = _signer(args)
    if args.out:
        request = build_provider_add(signer, service, space, provider, lifetime=args.expires_in)
        written = write_request(args.out, request)
        doc: dict[str, Any] = {"account": signer.did, "space": space, "provider": provider}
        doc |= _record(request, None) | {"ok": None, "subscription": None}  # not sent yet
        if args.json:
            print(json.dumps(doc | written.to_json()))
        else:
            print(written.line(settings.queue))
        return EXIT_OK
    return asyncio.run(_provision(args, settings, signer, service, space, provider))


async def _provision(
    args: argparse.Namespace,
    settings: Settings,
    signer: Signer,
    service: str,
    space: str,
    provider: str,
) -> int:
    error: tuple[str, str] | None = None
    receipt: bytes | None = None
    subscription: str | None = None
    async with _client(args, settings, signer, service, replies=args.wait) as client:
        request = client.build_provision(space, provider)
        try:
            if args.wait:
                outcome = Provisioned.of(await client.call(request, attempts=args.attempts))
                subscription, receipt = outcome.subscription, outcome.receipt.raw
            else:
                await client.publish(request, reply=False)
        except ReceiptError as exc:
            error, receipt = (exc.name, exc.message), exc.receipt.raw
        except ClientError as exc:
            error = (exc.name, exc.message)
    if args.receipt and receipt is not None:
        write_atomically(Path(args.receipt), receipt, "--receipt")
    doc: dict[str, Any] = {"account": signer.did, "space": space, "provider": provider}
    doc |= _record(request, error) | {"subscription": subscription}
    if not args.wait:
        doc["ok"] = None if error is None else False
    if args.json:
        print(json.dumps(doc))
    elif error is not None:
        print(f"error {error[0]}: {error[1]} (task {request.task})", file=sys.stderr)
    elif args.wait:
        print(
            f"ok: {space} provisioned by {provider} for {signer.did}: subscription "
            f"{subscription} (task {request.task})"
        )
    else:
        print(
            f"enqueued: task {request.task} (invocation {request.cid}); receipt to "
            f"{settings.receipt_queue!r}"
        )
    return EXIT_OK if error is None else EXIT_CHECK_FAILED


# --- space-info --------------------------------------------------------------------------


def space_info_main(args: argparse.Namespace, settings: Settings) -> int:
    """``space-info``: ask ``/space/info`` about ``--space`` and print its providers."""
    _check_numbers(args)
    service, space = _dids(args, "service", "space")
    signer = _signer(args)
    proofs = proofs_option(args.proof)
    # fail before connecting when the key cannot speak for the space at all
    try:
        build_space_info(signer, service, space, proofs=proofs)
    except ProofError as exc:
        raise ConfigError(
            f"--proof: {exc} (sign with the space's own key, or give a delegation from it)"
        ) from None
    return asyncio.run(_space_info(args, settings, signer, service, space, proofs))


async def _space_info(
    args: argparse.Namespace,
    settings: Settings,
    signer: Signer,
    service: str,
    space: str,
    proofs: list[Delegation],
) -> int:
    error: tuple[str, str] | None = None
    providers: list[str] | None = None
    async with _client(args, settings, signer, service, proofs=proofs, replies=True) as client:
        request = client.build_space_info(space)
        try:
            outcome = SpaceInfo.of(await client.call(request, attempts=args.attempts))
            providers = list(outcome.providers)
        except ClientError as exc:
            error = (exc.name, exc.message)
    if args.json:
        print(json.dumps({"space": space, "providers": providers} | _record(request, error)))
    elif error is not None:
        print(f"error {error[0]}: {error[1]} (task {request.task})", file=sys.stderr)
    else:
        for provider in providers or ():
            print(provider)
    return EXIT_OK if error is None else EXIT_CHECK_FAILED
