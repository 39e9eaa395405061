"""did:plc without I/O: DID documents as the PLC directory serves them, and genesis operations
as Hilt creates them.

Documents (``parse_plc_document``) are read with the checks of ucantone's ``did.Document``
(``@context`` first entry, ``id`` a DID, every method typed, methods deduplicated by id) and
turned into a :class:`~worker.ucan.keys.DidDocument` whose Multikey methods the validator
tries in order. The bytes come from a directory over the network, so everything is bounded
(size, nesting, number of methods) and anything unexpected is one :class:`DecodeError`.

A genesis operation is ``{type: "plc_operation", rotationKeys, verificationMethods,
alsoKnownAs, services, prev: null, sig}``; ``sig`` is the base64url (unpadded) low-S ECDSA
signature of the DAG-CBOR of the operation without ``sig``, by one of its rotation keys; the
DID is ``did:plc:`` + the first 24 characters of base32lower(sha256(DAG-CBOR of the signed
operation)). Maps inside the operation are encoded in DAG-CBOR order here, as the directory
re-encodes them; ucantone's cbor-gen writes them in Go ``sort.Strings`` order, which is the
same for Hilt's operations (one verification method, no services).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from worker.ucan import cbor
from worker.ucan.cid import CID, b32encode
from worker.ucan.errors import DecodeError, quote
from worker.ucan.keys import DidDocument, PublicKey, Signer, VerificationMethod, plc_did_problem

#: largest document or operation read (the directory's are under 1 KiB)
MAX_DOCUMENT_SIZE: Final = 64 * 1024
#: deepest JSON nesting read (a directory document nests 3 levels)
MAX_DEPTH: Final = 16
#: most verification methods (and relationship entries) read from one document
MAX_METHODS: Final = 64
#: the contexts ucantone accepts first (did.CoreContextV1, did.CoreContext)
CORE_CONTEXTS: Final = ("https://www.w3.org/ns/did/v1", "https://www.w3.org/ns/did/v1.1")
OPERATION_TYPE: Final = "plc_operation"

_MULTIKEY_CONTEXT: Final = "https://w3id.org/security/multikey/v1"
_SECP256K1_CONTEXT: Final = "https://w3id.org/security/suites/secp256k1-2019/v1"
_RFC3339: Final = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})", re.ASCII
)
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*", re.ASCII)


# --------------------------------------------------------------------------- JSON, bounded


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load_json(data: bytes, what: str) -> Any:
    """JSON of at most :data:`MAX_DOCUMENT_SIZE` bytes nested at most :data:`MAX_DEPTH`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"cannot parse {what}: expected bytes")
    if len(data) > MAX_DOCUMENT_SIZE:
        raise DecodeError(
            f"cannot parse {what}: {len(data)} bytes exceeds the limit of {MAX_DOCUMENT_SIZE}"
        )
    try:
        # a 64 KiB array of arrays stops at the recursion limit, in C, before MAX_DEPTH
        value = json.loads(bytes(data), parse_constant=_no_constant)
    except RecursionError:
        raise DecodeError(f"cannot parse {what}: nested deeper than {MAX_DEPTH}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN
        raise DecodeError(f"cannot parse {what}: invalid JSON: {exc}") from None
    _check_depth(value, what)
    return value


def _check_depth(value: Any, what: str) -> None:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if type(v) is dict:
            children: Iterable[Any] = v.values()
        elif type(v) is list:
            children = v
        else:
            continue
        if depth > MAX_DEPTH:
            raise DecodeError(f"cannot parse {what}: nested deeper than {MAX_DEPTH}")
        stack.extend((c, depth + 1) for c in children)


def _is_did(v: Any) -> bool:
    return type(v) is str and v.startswith("did:")


def _short(v: Any) -> str:
    return quote(v[:80]) if type(v) is str else type(v).__name__


# --------------------------------------------------------------------------- documents


def parse_plc_document(data: bytes, did: str) -> DidDocument:
    """The verification methods of the DID document ``data`` served for ``did``.

    The checks are ucantone's (``did.Document``, ``did.VerificationMethod``): a JSON object;
    ``@context``, if present, a string or list of strings whose first is DID core v1 or
    v1.1; ``id`` a DID; ``controller``, ``alsoKnownAs``, ``service`` and the relationships of
    the right types; every method an object with a text ``id`` and ``type``, methods with the
    same id identical. Only ``Multikey`` methods carry keys; one whose
    ``publicKeyMultibase`` is missing or not an Ed25519/secp256k1 key is kept with the reason,
    which stops a validation that reaches it (UnknownError), as in ucantone.

    One addition: ``id`` must be ``did``. ucantone's resolver does not compare them; a
    directory answering for another DID is refused here rather than trusted.

    Raises:
        DecodeError: anything else, in one line (never another exception).
    """
    what = "DID document"
    doc = _load_json(data, what)
    if type(doc) is not dict:
        raise DecodeError(f"cannot parse {what}: not a JSON object")
    _check_document_fields(doc, did, what)
    methods: dict[str, tuple[VerificationMethod, dict[str, Any]]] = {}
    raw_methods = doc.get("verificationMethod")
    if raw_methods is not None:
        if type(raw_methods) is not list:
            raise DecodeError(f"cannot parse {what}: verificationMethod must be a list")
        _bounded(raw_methods, "verificationMethod", what)
        for i, obj in enumerate(raw_methods):
            _add_method(methods, obj, f"verificationMethod[{i}]", what)
    # read both before resolving either: an embedded method counts for the whole document
    invocation = _relationship(doc, "capabilityInvocation", methods, what)
    delegation = _relationship(doc, "capabilityDelegation", methods, what)

    def endorsed(ids: list[str] | None) -> tuple[VerificationMethod, ...] | None:
        if ids is None:
            return None
        # a reference to no method of the document endorses nothing (ucantone skips it)
        return tuple(methods[i][0] for i in ids if i in methods)

    return DidDocument(
        did, tuple(vm for vm, _ in methods.values()), endorsed(invocation), endorsed(delegation)
    )


def _check_document_fields(doc: dict[str, Any], did: str, what: str) -> None:
    """The document-level checks of ucantone's ``did.Document``, and ``id`` = ``did``."""
    if "@context" in doc:
        ctx = doc["@context"]
        first = ctx if type(ctx) is str else (ctx[0] if type(ctx) is list and ctx else None)
        if type(ctx) is list and any(type(c) is not str for c in ctx):
            raise DecodeError(f"cannot parse {what}: @context must be text or a list of text")
        if first not in CORE_CONTEXTS:
            raise DecodeError(
                f"cannot parse {what}: @context must list {quote(CORE_CONTEXTS[1])} "
                f"or {quote(CORE_CONTEXTS[0])} first"
            )
    doc_id = doc.get("id")
    if not _is_did(doc_id):
        raise DecodeError(f"cannot parse {what}: id {_short(doc_id)} is not a DID")
    if doc_id != did:
        raise DecodeError(f"cannot parse {what}: id {_short(doc_id)} is not {_short(did)}")
    controller = doc.get("controller")
    if (
        controller is not None
        and not _is_did(controller)
        and (type(controller) is not list or not all(_is_did(c) for c in controller))
    ):
        raise DecodeError(f"cannot parse {what}: controller must be a DID or a list of DIDs")
    _list_of(doc, "alsoKnownAs", str, what)
    _list_of(doc, "service", dict, what)
    for name in ("authentication", "assertionMethod", "keyAgreement"):
        _relationship_entries(doc, name, what)


def _relationship(
    doc: dict[str, Any],
    name: str,
    methods: dict[str, tuple[VerificationMethod, dict[str, Any]]],
    what: str,
) -> list[str] | None:
    """The method ids a declared relationship lists (embedded methods added to
    ``methods``); ``None`` when it is not declared."""
    entries = _relationship_entries(doc, name, what)
    if entries is None:
        return None
    ids = []
    for i, entry in enumerate(entries):
        ids.append(
            _add_method(methods, entry, f"{name}[{i}]", what) if type(entry) is dict else entry
        )
    if len(methods) > MAX_METHODS:
        raise DecodeError(f"cannot parse {what}: more than {MAX_METHODS} methods")
    return ids


def _bounded(entries: list[Any], name: str, what: str) -> None:
    if len(entries) > MAX_METHODS:
        raise DecodeError(f"cannot parse {what}: {name} has more than {MAX_METHODS} entries")


def _list_of(doc: Mapping[str, Any], name: str, kind: type, what: str) -> None:
    v = doc.get(name)
    if v is not None and (type(v) is not list or any(type(e) is not kind for e in v)):
        raise DecodeError(f"cannot parse {what}: {name} must be a list of {kind.__name__}")


def _relationship_entries(doc: Mapping[str, Any], name: str, what: str) -> list[Any] | None:
    """A relationship's entries (method ids or embedded methods); ``None`` when undeclared
    (absent or null)."""
    v = doc.get(name)
    if v is None:
        return None
    if type(v) is not list or any(type(e) is not str and type(e) is not dict for e in v):
        raise DecodeError(f"cannot parse {what}: {name} must be a list of ids or methods")
    _bounded(v, name, what)
    return v


def _add_method(
    methods: dict[str, tuple[VerificationMethod, dict[str, Any]]],
    obj: Any,
    where: str,
    what: str,
) -> str:
    """Read one method into ``methods`` (by id, first place kept); its id."""
    if type(obj) is not dict:
        raise DecodeError(f"cannot parse {what}: {where} is not an object")
    vm_id = obj.get("id")
    if type(vm_id) is not str:
        raise DecodeError(f"cannot parse {what}: {where} has no text id")
    vm_type = obj.get("type")
    if type(vm_type) is not str:
        raise DecodeError(f"cannot parse {what}: {where} has no text type")
    controller = obj.get("controller")
    if controller is not None and not _is_did(controller):
        raise DecodeError(f"cannot parse {what}: {where} controller is not a DID")
    expires = _timestamp(obj.get("expires"), f"{where} expires", what)
    revoked = _timestamp(obj.get("revoked"), f"{where} revoked", what)
    key: PublicKey | None = None
    problem: str | None = None
    if vm_type == "Multikey":
        pkm = obj.get("publicKeyMultibase")
        if type(pkm) is not str:
            problem = "missing publicKeyMultibase in Multikey verification method"
        else:
            try:
                key = PublicKey.from_multibase(pkm)
            except DecodeError as exc:
                problem = str(exc)
    vm = VerificationMethod(vm_id, vm_type, key, problem, expires, revoked)
    known = methods.get(vm_id)
    if known is None:
        methods[vm_id] = (vm, obj)
    elif known[1] != obj:
        raise DecodeError(
            f"cannot parse {what}: conflicting definitions for verification method "
            f"{quote(vm_id[:200])}"
        )
    return vm_id


def _timestamp(v: Any, where: str, what: str) -> float | None:
    """An RFC 3339 date-time (Go's ``time.RFC3339``) as unix seconds."""
    if v is None:
        return None
    m = _RFC3339.fullmatch(v) if type(v) is str else None
    if m is None:
        raise DecodeError(f"cannot parse {what}: {where} is not an RFC 3339 time")
    base, frac, zone = m.groups()
    try:
        t = dt.datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        raise DecodeError(f"cannot parse {what}: {where} is not an RFC 3339 time") from None
    return t.timestamp() + (float(frac) if frac else 0.0)


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, slots=True)
class PlcOperation:
    """A ``plc_operation``; ``verification_methods`` and ``services`` keep their order
    (``(name, did:key)`` and ``(name, type, endpoint)``), which is the document's order."""

    rotation_keys: tuple[str, ...]
    verification_methods: tuple[tuple[str, str], ...]
    also_known_as: tuple[str, ...] = ()
    services: tuple[tuple[str, str, str], ...] = ()
    prev: str | None = None
    #: base64url without padding; ``None`` before signing
    sig: str | None = None

    def value(self, *, signed: bool = True) -> dict[str, Any]:
        """The operation as a plain map (``sig`` included when ``signed`` and present)."""
        v: dict[str, Any] = {
            "type": OPERATION_TYPE,
            "rotationKeys": list(self.rotation_keys),
            "verificationMethods": dict(self.verification_methods),
            "alsoKnownAs": list(self.also_known_as),
            "services": {n: {"type": t, "endpoint": e} for n, t, e in self.services},
            "prev": self.prev,
        }
        if signed and self.sig is not None:
            v["sig"] = self.sig
        return v

    @property
    def unsigned_cbor(self) -> bytes:
        """The DAG-CBOR bytes the signature covers (the operation without ``sig``)."""
        return cbor.encode(self.value(signed=False))

    @property
    def signed_cbor(self) -> bytes:
        """The DAG-CBOR of the signed operation, which the DID and the CID hash."""
        if self.sig is None:
            raise DecodeError("cannot encode plc operation: it is not signed")
        return cbor.encode(self.value())

    @property
    def cid(self) -> CID:
        """The operation's CID (dag-cbor, sha2-256), as ucantone's ``plc.SumOperation``."""
        return CID.dag_cbor(self.signed_cbor)

    @property
    def did(self) -> str:
        """The did:plc this operation creates, when it is a genesis operation."""
        digest = hashlib.sha256(self.signed_cbor).digest()
        return "did:plc:" + b32encode(digest)[:24]

    @property
    def signature(self) -> bytes:
        """``sig`` decoded.

        Raises:
            DecodeError: absent, or not unpadded base64url of 64 bytes.
        """
        sig = self.sig
        if sig is None or not _B64URL.fullmatch(sig) or len(sig) % 4 == 1:
            raise DecodeError("cannot verify plc operation: sig is not unpadded base64url")
        try:
            return base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
        except (binascii.Error, ValueError):
            raise DecodeError("cannot verify plc operation: sig is not base64url") from None

    def to_dag_json(self) -> bytes:
        """DAG-JSON: keys in byte order, no spaces (what ucantone POSTs to the directory)."""
        return json.dumps(
            self.value(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()


def create_genesis_op(
    signer: Signer,
    *,
    rotation_keys: Iterable[str] | None = None,
    verification_methods: Mapping[str, str] | None = None,
    also_known_as: Iterable[str] = (),
    services: Iterable[tuple[str, str, str]] = (),
) -> PlcOperation:
    """A signed genesis operation as Hilt builds one: by default the signer's key is the one
    rotation key and the verification method ``hilt``.

    Raises:
        DecodeError: the signer is not secp256k1 (the directory takes no Ed25519 rotation
            keys).
    """
    if signer.kind != "secp256k1":
        raise DecodeError("cannot sign plc operation: rotation keys are secp256k1, not ed25519")
    op = PlcOperation(
        rotation_keys=tuple(rotation_keys or (signer.key_did,)),
        verification_methods=tuple((verification_methods or {"hilt": signer.key_did}).items()),
        also_known_as=tuple(also_known_as),
        services=tuple(services),
    )
    sig = base64.urlsafe_b64encode(signer.sign(op.unsigned_cbor)).rstrip(b"=").decode()
    return PlcOperation(
        op.rotation_keys, op.verification_methods, op.also_known_as, op.services, None, sig
    )


def parse_plc_operation(data: bytes) -> PlcOperation:
    """A signed operation from its DAG-JSON (the body POSTed to ``{directory}/{did}``).

    Raises:
        DecodeError: not a ``plc_operation`` of the expected shape (bounded like documents).
    """
    what = "plc operation"
    v = _load_json(data, what)
    if type(v) is not dict:
        raise DecodeError(f"cannot parse {what}: not a JSON object")
    if v.get("type") != OPERATION_TYPE:
        kind = _short(v.get("type"))
        raise DecodeError(f"cannot parse {what}: type is {kind}, not {quote(OPERATION_TYPE)}")
    unknown = set(v) - {"type", "rotationKeys", "verificationMethods", "alsoKnownAs", "services",
                        "prev", "sig"}  # fmt: skip
    if unknown:
        raise DecodeError(f"cannot parse {what}: unknown field {_short(sorted(unknown)[0])}")
    keys, vms, aka = v.get("rotationKeys"), v.get("verificationMethods"), v.get("alsoKnownAs")
    if type(keys) is not list or not keys or not all(_is_did(k) for k in keys):
        raise DecodeError(f"cannot parse {what}: rotationKeys must be a non-empty list of DIDs")
    if type(vms) is not dict or not all(_is_did(k) for k in vms.values()):
        raise DecodeError(f"cannot parse {what}: verificationMethods must map names to DIDs")
    if type(aka) is not list or not all(type(a) is str for a in aka):
        raise DecodeError(f"cannot parse {what}: alsoKnownAs must be a list of text")
    services = v.get("services")
    if type(services) is not dict or not all(
        type(s) is dict
        and set(s) == {"type", "endpoint"}
        and type(s["type"]) is str
        and type(s["endpoint"]) is str
        for s in services.values()
    ):
        raise DecodeError(f"cannot parse {what}: services must map names to {{type, endpoint}}")
    prev, sig = v.get("prev"), v.get("sig")
    if prev is not None and type(prev) is not str:
        raise DecodeError(f"cannot parse {what}: prev must be text or null")
    if type(sig) is not str:
        raise DecodeError(f"cannot parse {what}: sig must be text")
    if len(keys) + len(vms) + len(aka) + len(services) > MAX_METHODS:
        raise DecodeError(f"cannot parse {what}: more than {MAX_METHODS} entries")
    return PlcOperation(
        tuple(keys),
        tuple(vms.items()),
        tuple(aka),
        tuple((n, s["type"], s["endpoint"]) for n, s in services.items()),
        prev,
        sig,
    )


def verify_genesis_op(op: PlcOperation, did: str) -> None:
    """Check a genesis operation as the directory does before storing it: ``did`` is a
    did:plc, the operation has no ``prev``, its keys are secp256k1 did:keys, ``sig`` verifies
    (low-S) with one of its rotation keys, and ``did`` is its hash.

    Raises:
        DecodeError: which of these does not hold.
    """
    what = "cannot accept plc operation"
    problem = plc_did_problem(did)
    if problem is not None:
        raise DecodeError(f"{what}: {problem}")
    if op.prev is not None:
        raise DecodeError(f"{what}: not a genesis operation (prev is not null)")
    named = [(f"rotationKeys[{i}]", k) for i, k in enumerate(op.rotation_keys)]
    named += [(f"verificationMethods.{n}", k) for n, k in op.verification_methods]
    keys = {}
    for name, key in named:
        parsed = _secp256k1(key)
        if parsed is None:
            raise DecodeError(f"{what}: {name} is not a secp256k1 did:key")
        keys[key] = parsed
    sig = op.signature
    unsigned = op.unsigned_cbor
    if not any(keys[k].verify(unsigned, sig) for k in op.rotation_keys):
        raise DecodeError(f"{what}: sig does not verify with any of its rotation keys")
    expected = op.did
    if expected != did:
        raise DecodeError(f"{what}: the operation's hash gives {expected}, not {did}")


def _secp256k1(did_key: str) -> PublicKey | None:
    try:
        key = PublicKey.from_did_key(did_key)
    except DecodeError:
        return None
    return key if key.kind == "secp256k1" else None


def render_plc_document(did: str, op: PlcOperation) -> bytes:
    """The DID document the PLC directory serves for ``did`` whose latest operation is ``op``
    (did-method-plc's ``formatDidDoc``, Multikey format), as compact JSON.

    Raises:
        DecodeError: a verification method that is not a secp256k1 did:key.
    """
    context = [CORE_CONTEXTS[0], _MULTIKEY_CONTEXT]
    methods = []
    for name, key in op.verification_methods:
        if _secp256k1(key) is None:
            raise DecodeError(f"cannot render DID document: {name!r} is not a secp256k1 did:key")
        if _SECP256K1_CONTEXT not in context:
            context.append(_SECP256K1_CONTEXT)
        methods.append(
            {
                "id": f"{did}#{name}",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": key[len("did:key:") :],
            }
        )
    doc = {
        "@context": context,
        "id": did,
        "alsoKnownAs": list(op.also_known_as),
        "verificationMethod": methods,
        "service": [
            {"id": f"#{name}", "type": kind, "serviceEndpoint": endpoint}
            for name, kind, endpoint in op.services
        ],
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
