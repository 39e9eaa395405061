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
    ``Signer``                         signing identity, Ed25519 or secp256k1
        ``Signer(secret: bytes, did=None, *, kind="ed25519")`` 32-byte seed or scalar
        ``Signer.generate(kind: "ed25519" | "secp256k1" = "ed25519") -> Signer``
        ``Signer.parse(key: str) -> Signer``  ucantone format: base64pad of 0x80 0x26 + Ed25519
                                       seed or 0x81 0x26 + secp256k1 scalar (0 and >= n refused),
                                       optional multibase ``M`` prefix; DecodeError on bad input,
                                       never echoing the key
        ``.kind`` "ed25519" | "secp256k1"; ``.public_key: PublicKey``
        ``.did`` the DID it acts as (its did:key, or the one given to ``with_did``)
        ``.key_did`` always its did:key (``did:key:z6Mk…`` / ``did:key:zQ3s…``)
        ``.varsig_header`` ``3401ed01ed011371`` / ``3401ec01e7011271``
        ``.with_did(did: str) -> Signer`` act as e.g. did:web:upload.example or a did:plc
        ``.export() -> str``           the key in ucantone format (base64pad, no prefix)
        ``.sign(msg: bytes) -> bytes`` 64 bytes: Ed25519, or secp256k1 ECDSA over SHA-256(msg),
                                       RFC 6979, low-S, ``r‖s``
        ``repr()`` never shows the key
    ``PublicKey``                      frozen; ``.kind``, ``.raw`` (32 bytes / 33-byte compressed
                                       point), ``.multicodec``, ``.multibase`` (``z…``),
                                       ``.did_key``, ``.verify(msg, sig) -> bool`` (secp256k1:
                                       high-S and r, s outside [1, n-1] refused, as ucantone)
        ``PublicKey.from_raw(kind, raw)``, ``.from_multicodec(data)``, ``.from_multibase(text)``,
        ``.from_did_key(did)``        DecodeError for anything that is not a key of either kind
    ``did_key_public(did: str) -> PublicKey``  the key of a did:key of either kind
    ``VerificationMethod``             frozen: ``id``, ``type``, ``key`` (None unless a decodable
                                       Multikey), ``problem`` (why a Multikey's key is None),
                                       ``expires``, ``revoked`` (unix seconds or None)
    ``DidDocument``                    frozen: ``id``, ``methods`` (document order),
                                       ``invocation``/``delegation`` (capability relationships
                                       when declared, else None: all methods count), ``.keys``
    ``plc_did_problem(did: str) -> str | None``  ucantone's ``plc.Parse`` refusal text
                                       (``did:plc:`` + 24 of ``a-z2-7``), None when valid
    ``Resolver``                       DID -> verification methods, no I/O. Sources in order:
                                       the static map; did:plc documents and failures handed
                                       over by the caller; did:key of both kinds, computed
        ``Resolver(static: Mapping[str, Sequence[PublicKey | bytes]] | None = None, *,
                   cache_verified=True, documents=None, failures=None)``
                                       static keys typed, or 32-byte raw Ed25519 (as before)
        ``.with_documents(documents: Mapping[str, DidDocument], failures: Mapping[str, str]
                          | None = None) -> Resolver``
                                       a view sharing the static keys and both caches, for one
                                       batch: the service resolves the batch's did:plc issuers
                                       over HTTP first (``parse_plc_document`` on each 200
                                       body; a failure as the text ucantone gives, e.g.
                                       ``unexpected status: 404`` or ``parsing DID document
                                       JSON: …``), then validates with the view, so validation
                                       stays a pure function of bytes, documents and clock
        ``.resolve(did) -> DidDocument``  ValidationError: ``UnknownError`` with a failure's
                                       text unwrapped, a malformed did:plc (``plc_did_problem``,
                                       never looked up) or an undecodable did:key;
                                       ``DIDKeyResolutionError`` when no source knows the DID
        ``.check(did, msg, sig, *, delegation=False, now=None) -> list[(method id, reason)] |
                 None``                every method tried in document order, as ucantone; None
                                       when one verified
        ``.verify(did: str, msg: bytes, sig: bytes) -> bool``
        with ``cache_verified`` it remembers (bounded, by CID) delegations whose signature
        verified with a static or did:key key (not did:plc, whose keys rotate), so a proof
        that rides along with every request is verified once

did:plc (``plc.py``)
    ``parse_plc_document(data: bytes, did: str) -> DidDocument``  a directory's JSON document
        with ucantone's checks; ``id`` must equal ``did``; at most ``MAX_DOCUMENT_SIZE`` (64
        KiB), nesting ``MAX_DEPTH`` (16), ``MAX_METHODS`` (64); DecodeError, never another
        exception
    ``PlcOperation``                   frozen: ``rotation_keys``, ``verification_methods``
                                       ((name, did:key), ...), ``also_known_as``, ``services``
                                       ((name, type, endpoint), ...), ``prev``, ``sig``;
                                       ``.unsigned_cbor``, ``.signed_cbor``, ``.did``, ``.cid``,
                                       ``.signature``, ``.to_dag_json()``, ``.value()``
    ``create_genesis_op(signer, *, rotation_keys=None, verification_methods=None,
                        also_known_as=(), services=()) -> PlcOperation``
                                       signed as Hilt does: default rotation key and method
                                       ``hilt`` = the secp256k1 signer's did:key
    ``parse_plc_operation(data: bytes) -> PlcOperation``  the DAG-JSON body POSTed to the
                                       directory, bounded as documents
    ``verify_genesis_op(op, did) -> None``  no prev, secp256k1 keys, sig by a rotation key,
                                       ``did`` = its hash; DecodeError naming what fails
    ``render_plc_document(did, op) -> bytes``  the document in plc.directory's current format

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
        varsig header Ed25519 (``3401ed01ed011371``) or secp256k1 (``3401ec01e7011271``) over
        DAG-CBOR; any other is refused by name (DecodeError)
    ``encode_invocation(signer, *, sub, cmd, args_raw: bytes, aud=None, exp: int | None,
                        iat=None, nonce: bytes | None = None, prf=(), meta=None) -> bytes``
        ``args_raw`` is written verbatim (it may be Go-ordered, like Hilt's ``details``)
    ``encode_delegation(signer, *, aud, sub: str | None, cmd, pol=(), exp: int | None,
                        nbf=None, nonce=None, meta=None) -> bytes``
    ``task_cid(cmd: str, sub: str, args_raw: bytes, nonce: bytes) -> CID``
    ``verify_signature(token, resolver: Resolver, *, now: int | None = None) -> None``
        raises ValidationError: ``InvalidSignature`` with ucantone's message (``proof "<cid>"
        does not have a valid signature from "<iss>"`` and a line per method tried), or the
        resolver's errors
    ``invalid_signature_message(token, rejections) -> str``  that message

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
        ``resolver``: for did:plc issuers, a ``Resolver.with_documents`` view of the batch.
        Raises ValidationError with ucantone's error name.
    ``check_audience(inv, service_did: str) -> None``   (aud or sub) == service; InvalidAudience

Receipts (``receipt.py``)
    ``build_receipt(signer, *, ran: CID, ok: object = None, error: tuple[str, str] | None = None,
                    iat: int, exp: int | None = None, nonce: bytes | None = None) -> bytes``
        CONTRACT §4: cmd /ucan/assert/receipt, iss = sub = signer.did, no aud, prf [], 16-byte
        nonce, args {out: {ok: ...} | {error: {name, message}}, ran}; ``ok`` None means ``{}``;
        signed with the signer's key and varsig header (the service's, usually Ed25519)
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
    invalid_signature_message,
    task_cid,
    verify_signature,
)
from worker.ucan.errors import DecodeError, UcanError, ValidationError
from worker.ucan.keys import (
    DidDocument,
    PublicKey,
    Resolver,
    Signer,
    VerificationMethod,
    did_key_public,
    plc_did_problem,
)
from worker.ucan.plc import (
    PlcOperation,
    create_genesis_op,
    parse_plc_document,
    parse_plc_operation,
    render_plc_document,
    verify_genesis_op,
)
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
    "DidDocument",
    "Invocation",
    "PlcOperation",
    "Policy",
    "PublicKey",
    "Receipt",
    "Request",
    "Resolver",
    "Selector",
    "Signer",
    "Token",
    "UcanError",
    "ValidationError",
    "VerificationMethod",
    "build_receipt",
    "check_audience",
    "create_genesis_op",
    "customer_add_args",
    "decode",
    "decode_request",
    "decode_token",
    "did_key_public",
    "encode",
    "encode_container",
    "encode_delegation",
    "encode_invocation",
    "invalid_signature_message",
    "match_policy",
    "parse_plc_document",
    "parse_plc_operation",
    "parse_policy",
    "parse_selector",
    "plc_did_problem",
    "receipt_args",
    "render_plc_document",
    "select",
    "task_cid",
    "to_dag_json",
    "validate_invocation",
    "verify_genesis_op",
    "verify_signature",
]
