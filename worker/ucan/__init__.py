"""UCAN 1.0 as fil-forge/ucantone speaks it: pure code, no I/O.

May import: nothing of the project outside ``worker.ucan`` (it could be its own library).

Public API (other packages import only these names from ``worker.ucan``):

Errors (``errors.py``)
    ``UcanError``                      root
    ``DecodeError(UcanError)``         bytes are not a token/container we can read; str() is one line
    ``ValidationError(UcanError)``     ``.name`` (ucantone's error name, e.g. "Expired") and
                                       ``.message`` (a sentence a person can act on)

CIDs (``cid.py``)
    ``CID``                            frozen; ``.raw`` binary CIDv1; ``str(cid)`` base32 ``bafy…``;
                                       ``CID.parse(text)`` (base32 ``b…`` or base58btc ``z…``);
                                       ``CID.dag_cbor(data: bytes) -> CID`` sha2-256 dag-cbor CID;
                                       hashable, ordered by ``raw``

Keys (``keys.py``)
    ``Signer``                         Ed25519 signing identity
        ``Signer.generate() -> Signer``
        ``Signer.parse(key: str) -> Signer``  ucantone format: base64pad of 0x80 0x26 + seed,
                                       optional multibase ``M`` prefix; DecodeError on bad input,
                                       never echoing the key
        ``.did`` the DID it acts as (its did:key, or the one given to ``with_did``)
        ``.key_did`` always its did:key
        ``.with_did(did: str) -> Signer`` act as e.g. did:web:upload.example with this key
        ``.export() -> str``           the key in ucantone format (base64pad, no prefix)
        ``.sign(msg: bytes) -> bytes`` 64-byte Ed25519 signature
        ``repr()`` never shows the key
    ``Resolver``                       DID -> Ed25519 public keys: did:key computed; a static
                                       ``{did: [32-byte public key]}`` map for others (did:web)
        ``Resolver(static: Mapping[str, Sequence[bytes]] | None = None, *, cache_verified=True)``
        ``.verify(did: str, msg: bytes, sig: bytes) -> bool``
        with ``cache_verified`` it remembers (bounded, by CID) delegations whose signature
        verified, so a proof that rides along with every request is verified once

Tokens (``envelope.py``)
    ``Invocation``, ``Delegation``, ``Receipt`` (a Receipt *is* an Invocation), frozen; common
    fields ``raw`` (envelope bytes as received), ``cid``, ``tag``, ``header`` (varsig bytes),
    ``signature``, ``payload_raw`` (the signed SigPayload span), ``iss``, ``sub`` (``None`` =
    powerline, delegations only), ``aud`` (``None`` when absent), ``cmd``, ``exp`` (``None`` =
    no expiry), ``nonce``, ``meta``.
        ``Invocation``: ``args`` (decoded, plain Python: dict/list/str/int/bytes/bool/None/CID),
                        ``args_raw`` (bytes exactly as received), ``prf: tuple[CID, ...]`` root
                        first, ``iat``, ``cause``, ``task_cid: CID`` over {cmd, sub, args raw, nonce},
                        ``audience`` (``aud``, else ``sub``)
        ``Delegation``: ``pol`` (parsed Policy), ``nbf``
        ``Receipt``: ``ran: CID``, ``ok`` (value or None), ``error`` (``{"name", "message"}`` or None)
    ``decode_token(raw: bytes, *, max_size: int = 1 << 20) -> Invocation | Delegation | Receipt``
    ``encode_invocation(signer, *, sub, cmd, args_raw: bytes, aud=None, exp: int | None,
                        iat=None, nonce: bytes | None = None, prf=(), meta=None) -> bytes``
        ``args_raw`` is written verbatim (it may be Go-ordered, like Hilt's ``details``)
    ``encode_delegation(signer, *, aud, sub: str | None, cmd, pol=(), exp: int | None,
                        nbf=None, nonce=None, meta=None) -> bytes``
    ``task_cid(cmd: str, sub: str, args_raw: bytes, nonce: bytes) -> CID``
    ``verify_signature(token, resolver: Resolver) -> None``   raises ValidationError

Containers (``container.py``)
    ``Request``: ``invocations: list[Invocation]``, ``delegations: dict[CID, Delegation]``,
                 ``receipts: list[Receipt]``, ``dropped: list[str]`` (why each unreadable token
                 inside the container was skipped, as ucantone skips them), ``tokens`` (all
                 decoded tokens in container order)
    ``decode_request(body: bytes, *, max_size: int = 1 << 20) -> Request``  every form of
        CONTRACT §4: raw ``{"ctn-v1": [...]}``, header bytes 0x40/0x42/0x43/0x44-0x46/0x4D/0x4F/
        0x50, or a bare token. Raises DecodeError when the body is none of these.
    ``encode_container(tokens: Iterable[bytes], *, header: int | None = None) -> bytes``
        sorted bytewise, deduplicated; no header byte by default (what ucantone's HTTP sends)

Validation (``validate.py``)
    ``validate_invocation(inv, proofs: Mapping[CID, Delegation], *, now: int,
                          clock_skew: int = 0, resolver: Resolver | None = None) -> None``
        ucantone's ValidateInvocation: signature, time bounds (leeway ``clock_skew``), proof
        chain root first, principal/subject alignment, command attenuation, policies.
        Raises ValidationError with ucantone's error name.
    ``check_audience(inv, service_did: str) -> None``   (aud or sub) == service; InvalidAudience

Receipts (``receipt.py``)
    ``build_receipt(signer, *, ran: CID, ok: object = None, error: tuple[str, str] | None = None,
                    iat: int, exp: int | None = None, nonce: bytes | None = None) -> bytes``
        CONTRACT §4: cmd /ucan/assert/receipt, iss = sub = signer.did, no aud, prf [], 16-byte
        nonce, args {out: {ok: ...} | {error: {name, message}}, ran}; ``ok`` None means ``{}``
    ``receipt_args(*, ran, ok=None, error=None) -> bytes``   just the canonical args

``/customer/add`` (``customer.py``)
    ``customer_add_args(customer, product, details: Mapping[str, str], external_account=None)
        -> bytes``  byte for byte as libforge encodes them: keys details, product, customer,
        externalAccount; details keys in Go ``sort.Strings`` order (not canonical, on purpose)
    ``CUSTOMER_ADD = "/customer/add"``

Policies (``policy.py``, ``selector.py``)
    ``parse_policy(value: object) -> Policy``; ``match_policy(policy, args) -> None`` raises
    ValidationError("MatchError"); ``parse_selector(text)``, ``select(selector, value)``

CBOR (``cbor.py``)
    ``decode(data: bytes, *, max_depth: int = 64) -> object``  DAG-CBOR except map-key order
    (cbor2's C decoder, then the decoded value re-encoded in wire order must equal the input);
    ``encode(value: object) -> bytes``  canonical DAG-CBOR; ``to_dag_json(value) -> object``
    JSON-ready (bytes as {"/": {"bytes": b64}}, links as {"/": cid})
"""

from worker.ucan.cbor import decode, encode, to_dag_json
from worker.ucan.cid import CID
from worker.ucan.container import Request, decode_request, encode_container
from worker.ucan.customer import CUSTOMER_ADD, customer_add_args
from worker.ucan.envelope import (
    DELEGATION_TAG,
    INVOCATION_TAG,
    RECEIPT_COMMAND,
    Delegation,
    Invocation,
    Receipt,
    Token,
    decode_token,
    encode_delegation,
    encode_invocation,
    task_cid,
    verify_signature,
)
from worker.ucan.errors import DecodeError, UcanError, ValidationError
from worker.ucan.keys import Resolver, Signer
from worker.ucan.policy import Policy, match_policy, parse_policy
from worker.ucan.receipt import build_receipt, receipt_args
from worker.ucan.selector import Selector, parse_selector, select
from worker.ucan.validate import check_audience, validate_invocation

__all__ = [
    "CID",
    "CUSTOMER_ADD",
    "DELEGATION_TAG",
    "INVOCATION_TAG",
    "RECEIPT_COMMAND",
    "DecodeError",
    "Delegation",
    "Invocation",
    "Policy",
    "Receipt",
    "Request",
    "Resolver",
    "Selector",
    "Signer",
    "Token",
    "UcanError",
    "ValidationError",
    "build_receipt",
    "check_audience",
    "customer_add_args",
    "decode",
    "decode_request",
    "decode_token",
    "encode",
    "encode_container",
    "encode_delegation",
    "encode_invocation",
    "match_policy",
    "parse_policy",
    "parse_selector",
    "receipt_args",
    "select",
    "task_cid",
    "to_dag_json",
    "validate_invocation",
    "verify_signature",
]
