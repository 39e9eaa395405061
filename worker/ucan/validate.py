"""ucantone's ``ValidateInvocation``: signature, time bounds, proof chain, attenuation, policy.

The checks, their order and their error names follow ucantone (ucan-wire §2.5). The one
addition is a clock-skew leeway ``s``: a token is expired iff ``exp + s <= now`` and too
early iff ``nbf != 0 and now + s <= nbf``; ``s = 0`` is exactly ucantone.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Final

from worker.ucan.cid import CID
from worker.ucan.envelope import Delegation, Invocation, Token, verify_signature
from worker.ucan.errors import ValidationError, quote
from worker.ucan.keys import Resolver
from worker.ucan.policy import Policy, Statement, match_policy

_DEFAULT_RESOLVER = Resolver()
#: most proofs one invocation may name (Hilt sends one). ucantone has no bound; without
#: one, a holder of any delegation could make each message walk a chain as long as the
#: message allows (a cycle of its own delegations, each repeating its policy statements)
MAX_PROOFS: Final = 16


def proves(granted: str, wanted: str) -> bool:
    """Whether command ``granted`` covers ``wanted`` (``/`` covers all; ``/a`` covers ``/a/b``)."""
    if granted == "/" or granted == wanted:
        return True
    return wanted.startswith(granted + "/")


def _when(t: int) -> str:
    try:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(t)


def _check_token(token: Token, *, now: int, clock_skew: int, resolver: Resolver) -> None:
    verify_signature(token, resolver, now=now)
    if token.exp is not None and token.exp + clock_skew <= now:
        kind = "invocation" if isinstance(token, Invocation) else "proof"
        raise ValidationError(
            "Expired", f"{kind} {quote(str(token.cid))} has expired on {_when(token.exp)}"
        )
    if isinstance(token, Delegation) and token.nbf and now + clock_skew <= token.nbf:
        raise ValidationError(
            "TooEarly", f"proof {quote(str(token.cid))} is not valid before {_when(token.nbf)}"
        )


def validate_invocation(
    inv: Invocation,
    proofs: Mapping[CID, Delegation],
    *,
    now: int,
    clock_skew: int = 0,
    resolver: Resolver | None = None,
) -> None:
    """Validate ``inv`` as ucantone's ``ValidateInvocation`` does.

    Args:
        inv: the invocation.
        proofs: delegations by CID (e.g. those in the same container).
        now: the validation time, unix seconds.
        clock_skew: leeway in seconds on ``exp`` and ``nbf`` (0 = exactly ucantone).
        resolver: DID → keys; default resolves did:key only. For did:plc issuers, a
            ``Resolver.with_documents`` view holding the batch's resolved documents.

    Raises:
        ValidationError: with ucantone's error name (``InvalidSignature``, ``Expired``,
            ``TooEarly``, ``UnavailableProof``, ``InvalidClaim``, ``InvalidSubject``,
            ``InvalidAudience``, ``ImpossibleAttenuation``, ``MatchError``, ``UnknownError``);
            ``InvalidClaim`` too for a chain longer than :data:`MAX_PROOFS`.
    """
    res = resolver or _DEFAULT_RESOLVER
    _check_token(inv, now=now, clock_skew=clock_skew, resolver=res)
    if len(inv.prf) > MAX_PROOFS:
        raise ValidationError(
            "InvalidClaim",
            f"invocation {quote(str(inv.cid))} names {len(inv.prf)} proofs; "
            f"a chain of at most {MAX_PROOFS} is accepted",
        )
    chain: list[Delegation] = []
    for link in inv.prf:
        prf = proofs.get(link)
        if prf is None:
            raise ValidationError(
                "UnavailableProof",
                f"linked proof {quote(str(link))} could not be resolved: "
                "proof not found in container",
            )
        chain.append(prf)
    authority = inv.sub
    command = "/"
    statements: list[Statement] = []
    for i, prf in enumerate(chain):
        _check_token(prf, now=now, clock_skew=clock_skew, resolver=res)
        if i == 0 and prf.sub is None:
            raise ValidationError("InvalidClaim", "root delegation subject is null")
        if prf.sub is not None and prf.sub != inv.sub:
            raise ValidationError(
                "InvalidSubject",
                f"delegation {quote(str(prf.cid))} subject is {quote(prf.sub)} "
                f"not {quote(str(inv.sub))}",
            )
        if prf.iss != authority:
            raise ValidationError(
                "InvalidAudience",
                f"delegation {quote(str(prf.cid))} issuer is {quote(str(authority))} "
                f"not {quote(prf.iss)}",
            )
        authority = prf.aud
        if proves(command, prf.cmd):
            command = prf.cmd
        elif not proves(prf.cmd, command):
            raise ValidationError(
                "ImpossibleAttenuation",
                f"cannot attenuate capability from command {command} to command {prf.cmd}",
            )
        statements.extend(prf.pol.statements)
    if authority != inv.iss:
        if not chain:
            raise ValidationError(
                "InvalidClaim",
                f"invocation {inv.cid} is not issued by subject and has no proofs",
            )
        raise ValidationError(
            "InvalidAudience",
            f"invocation {quote(str(inv.cid))} issuer is {quote(str(authority))} "
            f"not {quote(inv.iss)}",
        )
    if not proves(command, inv.cmd):
        raise ValidationError(
            "UnknownError", f"capability command {command} does not prove given command {inv.cmd}"
        )
    match_policy(Policy(tuple(statements)), inv.args)


def check_audience(inv: Invocation, service_did: str) -> None:
    """The dispatcher's check: the effective audience (``aud``, else ``sub``) is the service.

    Raises:
        ValidationError: ``InvalidAudience``.
    """
    if inv.audience != service_did:
        raise ValidationError(
            "InvalidAudience",
            f"invocation {quote(str(inv.cid))} is addressed to {quote(inv.audience)}, "
            f"not {quote(service_did)}",
        )
