"""``keygen``, ``did`` and ``delegate``: new identities, the DID a key signs as, and
delegations signed with a key."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Final

from worker.config import Settings
from worker.errors import EXIT_OK, ConfigError
from worker.keyfile import find_service_key, read_key
from worker.produce.options import check_command, check_did, policy_statements, write_atomically
from worker.ucan import (
    CID,
    Signer,
    encode_container,
    encode_delegation,
)

#: seconds a delegation lives unless ``--expires-in`` or ``--no-expiry`` says otherwise: a
#: year. There is no revocation (SECURITY.md), so ``exp`` is the only bound on what a leaked
#: holder key (Hilt's) can do with its chain; a year is short enough to bound that and long
#: enough that re-delegating is a yearly routine rather than a frequent outage risk.
DEFAULT_DELEGATION_LIFETIME: Final = 365 * 24 * 3600


def keygen_main(args: argparse.Namespace, settings: Settings) -> int:
    """``keygen``: a new key and its did:key (the only command that prints a key).

    ``--type ed25519`` (the default: services, Hilt, spaces) or ``secp256k1`` (a did:plc's
    rotation and signing key, as Hilt makes for each tenant: ``plc create``). The key is in
    ucantone's format: base64 (padded) of ``0x80 0x26`` + the Ed25519 seed, or ``0x81 0x26``
    + the secp256k1 scalar (what Hilt keeps in its vault).
    """
    signer = Signer.generate(args.key_type)
    if args.json:
        print(json.dumps({"did": signer.did, "key": signer.export()}))
    else:
        print(f"did: {signer.did}")
        print(f"key: {signer.export()}")
    return EXIT_OK


def did_main(args: argparse.Namespace, settings: Settings) -> int:
    """``did``: the DID a key signs as, so a producer can be told what ``--service`` is.

    With ``--key``, that key's did:key. Without it, the service's: its key found as ``run``
    finds it (``FORGE_WORKER_SERVICE_KEY``, ``FORGE_WORKER_SERVICE_KEY_FILE``, else
    ``.forge-worker/service.key``), acting as ``FORGE_WORKER_SERVICE_DID`` when set. A
    development key is never created here: with none, a usage error (exit 2). The key itself
    is never printed. Text: the DID alone on standard output (for ``$(...)``), and when it is
    not the key's own did:key, that did:key on standard error.
    """
    if args.key is not None:
        signer = read_key(args.key)
        note = None
    else:
        service = find_service_key(settings)
        signer = service.signer
        note = (
            f"a development key ({service.path}): configure FORGE_WORKER_SERVICE_KEY(_FILE) "
            "for production"
            if service.source == "development"
            else None
        )
    if args.json:
        print(json.dumps({"did": signer.did, "key_did": signer.key_did}))
    else:
        print(signer.did)
        if signer.did != signer.key_did:
            print(
                f"forge-worker did: signs with the key of {signer.key_did} (producers verify "
                "its receipts with --service-key-did)",
                file=sys.stderr,
            )
    if note is not None:
        print(f"forge-worker did: {note}", file=sys.stderr)
    return EXIT_OK


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
        raise ConfigError(
            f"--expires-in: expected a positive number, got {args.expires_in} "
            "(--no-expiry for a delegation that never expires)"
        )
    lifetime = DEFAULT_DELEGATION_LIFETIME if args.expires_in is None else args.expires_in
    exp = None if args.no_expiry else int(time.time()) + lifetime
    token = encode_delegation(
        signer,
        aud=audience,
        sub=subject,
        cmd=check_command(args.delegated_command),
        pol=policy_statements(args.policy),
        exp=exp,
    )
    body = encode_container([token], header=0x42 if args.base64 else None)
    out = Path(args.out)
    write_atomically(out, body, "--out")
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
