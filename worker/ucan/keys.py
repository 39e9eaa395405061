"""Identities: Ed25519 and secp256k1 keys in ucantone's formats, did:key, and DID → keys.

Key formats (ucantone ``multikey``): a private key is a multicodec varint and the raw key,
``80 26`` + a 32-byte Ed25519 seed or ``81 26`` + a 32-byte secp256k1 scalar, written as
base64pad (optionally with the multibase prefix ``M``); a public key is ``ed 01`` + 32 bytes
or ``e7 01`` + a 33-byte compressed point, written base58btc with the multibase prefix ``z``
(``did:key:z6Mk…`` and ``did:key:zQ3s…``).

secp256k1 is ucantone's ECDSA: SHA-256 of the message, an RFC 6979 nonce, a 64-byte
``r‖s``; signing always gives the low S, and verifying refuses a high S (``s > n/2``,
``RejectMalleable``) and ``r`` or ``s`` outside ``[1, n−1]``. Those checks are made here,
explicitly, before libsecp256k1 (coincurve) sees the signature: the rule is ucantone's, so
it should not rest on what one library version happens to do.
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import coincurve
import coincurve.ecdsa
import nacl.bindings
import nacl.exceptions
import nacl.signing

from worker.ucan.cid import b58decode, b58encode
from worker.ucan.errors import DecodeError, ValidationError, quote
from worker.ucan.varsig import ED25519_DAG_CBOR, SECP256K1_DAG_CBOR

KeyKind = Literal["ed25519", "secp256k1"]

#: multicodec ed25519-pub, as a varint
ED25519_PUB: Final = b"\xed\x01"
#: multicodec ed25519-priv (0x1300), as a varint: the prefix of ucantone's key format
ED25519_PRIV: Final = b"\x80\x26"
#: multicodec secp256k1-pub (0xe7), as a varint
SECP256K1_PUB: Final = b"\xe7\x01"
#: multicodec secp256k1-priv (0x1301), as a varint
SECP256K1_PRIV: Final = b"\x81\x26"
#: the order of the secp256k1 group
SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_N: Final = SECP256K1_N >> 1
_DID_KEY: Final = "did:key:"
_DID_PLC: Final = "did:plc:"
_CACHE_SIZE: Final = 4096
#: what ucantone's validator records for a method it did not try or that did not verify
UNSUPPORTED: Final = "unsupported verification method type"
MISMATCH: Final = "signature mismatch"


# --------------------------------------------------------------------------- public keys


def _secp_verify(key: coincurve.PublicKey, msg: bytes, sig: bytes) -> bool:
    """ucantone's secp256k1 verification: 64-byte ``r‖s``, ``1 ≤ r < n``, ``1 ≤ s ≤ n/2``,
    ECDSA over SHA-256(msg)."""
    if len(sig) != 64:
        return False
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    if not (0 < r < SECP256K1_N and 0 < s <= _HALF_N):
        return False
    # coincurve verifies DER; libsecp256k1 parses the compact form and re-serialises it
    der = coincurve.ecdsa.cdata_to_der(coincurve.ecdsa.deserialize_compact(sig))
    return bool(key.verify(der, msg))


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A public key of either kind: ``raw`` is 32 bytes (Ed25519) or the 33-byte compressed
    secp256k1 point. Build one with :meth:`from_raw`, :meth:`from_multibase` or
    :meth:`from_did_key`, which refuse keys that are not keys (bad lengths, points not on
    the curve)."""

    kind: KeyKind
    raw: bytes
    #: the library's key object (nacl is called on ``raw`` directly)
    _impl: Any = field(repr=False, compare=False)

    @classmethod
    def from_raw(cls, kind: str, raw: bytes) -> PublicKey:
        """A key from its raw bytes.

        Raises:
            DecodeError: wrong length, a point not on the curve, or an unknown kind.
        """
        raw = bytes(raw)
        if kind == "ed25519":
            if len(raw) != 32:
                raise DecodeError(
                    f"cannot use public key: Ed25519 keys are 32 bytes, not {len(raw)}"
                )
            return cls("ed25519", raw, None)
        if kind == "secp256k1":
            if len(raw) != 33 or raw[0] not in (2, 3):
                raise DecodeError("cannot use public key: not a 33-byte compressed secp256k1 point")
            try:
                impl = coincurve.PublicKey(raw)
            except (ValueError, TypeError):
                raise DecodeError("cannot use public key: not a point of secp256k1") from None
            return cls("secp256k1", raw, impl)
        raise DecodeError(f"cannot use public key: unknown kind {kind[:40]!r}")

    @classmethod
    def from_multicodec(cls, data: bytes) -> PublicKey:
        """A key from its multicodec form: ``ed 01`` + 32 bytes or ``e7 01`` + 33 bytes.

        Raises:
            DecodeError: another codec, or not a valid key of its kind.
        """
        if data[:2] == ED25519_PUB:
            return cls.from_raw("ed25519", data[2:])
        if data[:2] == SECP256K1_PUB:
            return cls.from_raw("secp256k1", data[2:])
        code = data[:2].hex() or "nothing"
        raise DecodeError(
            f"cannot use public key: multicodec {code} is neither ed25519-pub nor secp256k1-pub"
        )

    @classmethod
    def from_multibase(cls, text: str) -> PublicKey:
        """A key from a Multikey ``publicKeyMultibase`` (``z`` + base58btc of the multicodec).

        Raises:
            DecodeError: not base58btc, or not a key we can use.
        """
        if not text.startswith("z"):
            raise DecodeError("cannot use public key: not base58btc multibase (no 'z' prefix)")
        return cls.from_multicodec(b58decode(text[1:]))

    @classmethod
    def from_did_key(cls, did: str) -> PublicKey:
        """The key a ``did:key`` names.

        Raises:
            DecodeError: not a did:key of an Ed25519 or secp256k1 key.
        """
        if not did.startswith(_DID_KEY):
            raise DecodeError(f"cannot resolve {did[:80]!r}: not a did:key")
        return cls.from_multibase(did[len(_DID_KEY) :])

    @property
    def multicodec(self) -> bytes:
        """The multicodec form: ``ed 01`` or ``e7 01``, then ``raw``."""
        return (ED25519_PUB if self.kind == "ed25519" else SECP256K1_PUB) + self.raw

    @property
    def multibase(self) -> str:
        """Its ``publicKeyMultibase``: ``z`` + base58btc of :attr:`multicodec`."""
        return "z" + b58encode(self.multicodec)

    @property
    def did_key(self) -> str:
        """Its ``did:key``."""
        return _DID_KEY + self.multibase

    def verify(self, msg: bytes, sig: bytes) -> bool:
        """Whether ``sig`` is a valid signature of ``msg`` by this key, as ucantone checks it
        (secp256k1: low-S only, ``r`` and ``s`` in range)."""
        if self.kind == "ed25519":
            if len(sig) != 64:
                return False
            try:
                # what nacl's VerifyKey.verify does, without its type checks and encoder
                nacl.bindings.crypto_sign_open(sig + msg, self.raw)
            except nacl.exceptions.BadSignatureError:
                return False
            return True
        return _secp_verify(self._impl, msg, sig)

    def __repr__(self) -> str:
        return f"PublicKey({self.did_key!r})"


#: the longest DID whose resolution is cached: issuers are looked up before any signature
#: is checked and may be 2,048 characters; a did:key is under 64
_CACHE_DID_MAX: Final = 128


def did_key(public_key: bytes) -> str:
    """The ``did:key`` of a 32-byte Ed25519 public key."""
    return _DID_KEY + "z" + b58encode(ED25519_PUB + public_key)


def did_key_public(did: str) -> PublicKey:
    """The public key inside a ``did:key`` (Ed25519 or secp256k1).

    Raises:
        DecodeError: not a did:key of either kind.
    """
    return PublicKey.from_did_key(did)


# --------------------------------------------------------------------------- signers


class Signer:
    """A signing identity, Ed25519 or secp256k1; ``repr()`` and errors never show the key."""

    __slots__ = (
        "_did", "_secp", "_secret", "_seed", "key_did", "kind", "public_key", "varsig_header",
    )  # fmt: skip

    def __init__(self, secret: bytes, did: str | None = None, *, kind: KeyKind = "ed25519") -> None:
        """A signer from a 32-byte Ed25519 seed or secp256k1 scalar, acting as ``did``
        (default: its did:key).

        Raises:
            DecodeError: not 32 bytes, or (secp256k1) 0 or not below the group order.
        """
        if len(secret) != 32:
            raise DecodeError("cannot load key: the key must be 32 bytes")
        self._seed = bytes(secret)
        #: ``"ed25519"`` or ``"secp256k1"``
        self.kind: KeyKind = kind
        if kind == "ed25519":
            self._secp: coincurve.PrivateKey | None = None
            # libsodium's 64-byte secret key, for signing without SigningKey.sign's wrapping
            pk, self._secret = nacl.bindings.crypto_sign_seed_keypair(self._seed)
            #: the public key
            self.public_key: PublicKey = PublicKey("ed25519", pk, None)
        elif kind == "secp256k1":
            if not 0 < int.from_bytes(self._seed, "big") < SECP256K1_N:
                raise DecodeError("cannot load key: a secp256k1 scalar must be in [1, n-1]")
            self._secp = coincurve.PrivateKey(self._seed)
            self._secret = b""
            point = self._secp.public_key.format(compressed=True)
            self.public_key = PublicKey("secp256k1", point, self._secp.public_key)
        else:
            raise DecodeError(f"cannot load key: unknown kind {str(kind)[:40]!r}")
        #: the varsig header of its signatures over DAG-CBOR (an attribute: read per receipt)
        self.varsig_header: bytes = ED25519_DAG_CBOR if self._secp is None else SECP256K1_DAG_CBOR
        #: always the key's did:key
        self.key_did: str = self.public_key.did_key
        self._did = did or self.key_did

    @property
    def did(self) -> str:
        """The DID this signer acts as."""
        return self._did

    @classmethod
    def generate(cls, kind: KeyKind = "ed25519") -> Signer:
        """A new random key of ``kind``."""
        if kind == "secp256k1":
            return cls(coincurve.PrivateKey().secret, kind="secp256k1")
        if kind != "ed25519":
            raise DecodeError(f"cannot generate key: unknown kind {str(kind)[:40]!r}")
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @classmethod
    def parse(cls, key: str) -> Signer:
        """A key in ucantone's format: base64pad of ``80 26`` + Ed25519 seed or ``81 26`` +
        secp256k1 scalar, optionally with the multibase prefix ``M``.

        Raises:
            DecodeError: not such a key (the message never contains the key).
        """
        text = key.strip()
        if text.startswith("M"):
            text = text[1:]
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError("cannot load key: not base64 (padded, standard alphabet)") from None
        if len(raw) == 34 and raw.startswith(ED25519_PRIV):
            return cls(raw[2:])
        if len(raw) == 34 and raw.startswith(SECP256K1_PRIV):
            return cls(raw[2:], kind="secp256k1")
        raise DecodeError(
            "cannot load key: expected 0x80 0x26 and a 32-byte Ed25519 seed, "
            "or 0x81 0x26 and a 32-byte secp256k1 scalar"
        )

    def with_did(self, did: str) -> Signer:
        """The same key acting as ``did`` (e.g. ``did:web:upload.example``)."""
        return Signer(self._seed, did, kind=self.kind)

    def export(self) -> str:
        """The key in ucantone's format (base64pad, no multibase prefix)."""
        prefix = ED25519_PRIV if self._secp is None else SECP256K1_PRIV
        return base64.b64encode(prefix + self._seed).decode()

    def sign(self, msg: bytes) -> bytes:
        """A 64-byte signature of ``msg``: Ed25519, or secp256k1 ECDSA over SHA-256(msg)
        with an RFC 6979 nonce and a low S, as ``r‖s``."""
        if self._secp is None:
            # what SigningKey.sign returns as .signature, without its three copies of the
            # signed message and a SignedMessage (about 1 µs of the receipt sent per message)
            return nacl.bindings.crypto_sign(msg, self._secret)[: nacl.bindings.crypto_sign_BYTES]
        # libsecp256k1 signs with RFC 6979 and normalises to the low S; coincurve gives DER
        ecdsa = coincurve.ecdsa
        sig: bytes = ecdsa.serialize_compact(ecdsa.der_to_cdata(self._secp.sign(msg)))
        return sig

    def __repr__(self) -> str:
        if self._secp is None:
            return f"Signer(did={self._did!r})"
        return f"Signer(did={self._did!r}, kind='secp256k1')"


# --------------------------------------------------------------------------- DID documents


@dataclass(frozen=True, slots=True)
class VerificationMethod:
    """One verification method of a DID document, as ucantone's validator sees it.

    ``key`` is the decoded key of a ``Multikey`` method; ``None`` for another type (tried and
    rejected as :data:`UNSUPPORTED`) or for a Multikey whose key does not decode, when
    ``problem`` says why (ucantone then stops the validation with that error, UnknownError).
    ``expires`` and ``revoked`` are unix seconds: from then on the method is rejected.
    """

    id: str
    type: str
    key: PublicKey | None = None
    problem: str | None = None
    expires: float | None = None
    revoked: float | None = None

    @classmethod
    def multikey(cls, id: str, key: PublicKey) -> VerificationMethod:
        """A ``Multikey`` method holding ``key``."""
        return cls(id, "Multikey", key)


@dataclass(frozen=True, slots=True)
class DidDocument:
    """The parts of a DID document that verifying a signature uses.

    ``invocation`` and ``delegation`` are the ``capabilityInvocation`` and
    ``capabilityDelegation`` relationships when the document declares them (even empty: then
    they endorse nothing); ``None`` when it does not, as in every document the PLC directory
    serves, and then every method counts (ucantone 3a20cd5).
    """

    id: str
    methods: tuple[VerificationMethod, ...]
    invocation: tuple[VerificationMethod, ...] | None = None
    delegation: tuple[VerificationMethod, ...] | None = None

    @property
    def keys(self) -> tuple[PublicKey, ...]:
        """The decoded keys of its Multikey methods, in document order."""
        return tuple(m.key for m in self.methods if m.key is not None)

    def methods_for(self, *, delegation: bool) -> tuple[VerificationMethod, ...]:
        """The methods that may sign an invocation (or a delegation) of this DID."""
        declared = self.delegation if delegation else self.invocation
        return self.methods if declared is None else declared


def _key_document(did: str, key: PublicKey) -> DidDocument:
    """ucantone's document of a key-holding DID: one Multikey method ``<did>#<multibase>``
    (for a did:key the multibase is its identifier, as ``did/key`` builds it)."""
    return DidDocument(did, (VerificationMethod.multikey(f"{did}#{key.multibase}", key),))


# --------------------------------------------------------------------------- resolver

_B32_LOWER: Final = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def plc_did_problem(did: str) -> str | None:
    """Why ucantone's ``plc.Parse`` refuses ``did`` (its words), or ``None`` for a did:plc of
    24 lowercase base32 characters."""
    if not did.startswith("did:"):
        return "must start with 'did:'"
    if not did.startswith(_DID_PLC):
        return f"unsupported DID method in {did}: expected plc"
    ident = did[len(_DID_PLC) :]
    n = len(ident.encode("utf-8", "surrogatepass"))
    if n != 24:
        return f"identifier must be 24 characters, got {n}"
    for i, ch in enumerate(ident):
        if ch not in _B32_LOWER:
            return (
                "identifier is not base32 (lowercase, no padding): "
                f"illegal base32 data at input byte {i}"
            )
    return None


class Resolver:
    """DID → public keys, without I/O. Sources, in order:

    1. the static map given at construction (e.g. the service's did:web and its key);
    2. for ``did:plc``: the documents and resolution failures handed over by the caller
       (:meth:`with_documents`), which resolved them before validation. A did:plc that is
       not 24 lowercase base32 characters is refused without looking (UnknownError, the
       text of ucantone's ``plc.Parse``); a failure is UnknownError with the caller's text
       unwrapped (e.g. ``unexpected status: 404``);
    3. ``did:key`` of both kinds, computed.

    Anything else is ``DIDKeyResolutionError``.
    """

    __slots__ = (
        "_cache",
        "_cache_verified",
        "_documents",
        "_failures",
        "_static",
        "_verified",
    )

    def __init__(
        self,
        static: Mapping[str, Sequence[PublicKey | bytes]] | None = None,
        *,
        cache_verified: bool = True,
        documents: Mapping[str, DidDocument] | None = None,
        failures: Mapping[str, str] | None = None,
    ) -> None:
        """A resolver.

        Args:
            static: public keys of DIDs that are not did:key, e.g. did:web: typed
                :class:`PublicKey` of either kind, or 32-byte raw Ed25519 keys.
            cache_verified: remember delegations (by CID) whose signature verified with a
                key that cannot change (static or did:key), so a proof shared by many
                invocations is verified once.
            documents: resolved did:plc documents by DID (see :meth:`with_documents`).
            failures: did:plc resolution failures by DID, the text ucantone would give.

        Raises:
            DecodeError: a static key that is not a key.
        """
        self._cache_verified = cache_verified
        self._static: dict[str, DidDocument] = {}
        for did, keys in (static or {}).items():
            methods = []
            for k in keys:
                key = k if isinstance(k, PublicKey) else _raw_ed25519(did, k)
                methods.append(VerificationMethod.multikey(f"{did}#{key.multibase}", key))
            self._static[did] = DidDocument(did, tuple(methods))
        self._cache: OrderedDict[str, DidDocument | str] = OrderedDict()
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._documents: Mapping[str, DidDocument] = documents or {}
        self._failures: Mapping[str, str] = failures or {}

    def with_documents(
        self, documents: Mapping[str, DidDocument], failures: Mapping[str, str] | None = None
    ) -> Resolver:
        """A view of this resolver that also knows these did:plc documents and failures.

        It shares the static keys, the did:key cache and the verified-delegation cache, and
        costs a few attribute copies: the service resolves a batch's did:plc issuers over
        HTTP first, then validates the batch with one view, so validation stays a pure
        function of the bytes, the documents and the clock. The mappings are used as given
        (not copied); keep them unchanged while the view is in use.
        """
        view = object.__new__(Resolver)
        view._cache_verified = self._cache_verified
        view._static = self._static
        view._cache = self._cache
        view._verified = self._verified
        view._documents = documents
        view._failures = failures or {}
        return view

    def seen(self, token_cid: bytes) -> bool:
        """Whether a token with this binary CID was verified by this resolver before."""
        return self._cache_verified and token_cid in self._verified

    def remember(self, token_cid: bytes, did: str | None = None) -> None:
        """Record that the token with this binary CID (issued by ``did``) has a valid
        signature (bounded LRU). Tokens of a did:plc are not recorded: its keys can rotate,
        and then the directory's current document must decide again."""
        if not self._cache_verified or (did is not None and did.startswith(_DID_PLC)):
            return
        self._verified[token_cid] = None
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)

    def resolve(self, did: str) -> DidDocument:
        """The document of ``did``.

        Raises:
            ValidationError: ``UnknownError`` (a did:plc failure or malformed did:plc, or a
                did:key whose key does not decode), ``DIDKeyResolutionError`` (no source
                knows ``did``).
        """
        doc = self._static.get(did)
        if doc is not None:
            return doc
        if did.startswith(_DID_KEY):
            found = self._cache.get(did)
            if found is None:
                try:
                    found = _key_document(did, PublicKey.from_did_key(did))
                except DecodeError as exc:
                    found = str(exc)
                if len(did) <= _CACHE_DID_MAX:  # (a 2 KiB issuer is not worth keeping)
                    self._cache[did] = found
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
            if type(found) is str:
                raise ValidationError("UnknownError", found)
            assert isinstance(found, DidDocument)
            return found
        if did.startswith(_DID_PLC):
            problem = plc_did_problem(did)
            if problem is not None:
                raise ValidationError("UnknownError", problem)
            failure = self._failures.get(did)
            if failure is not None:
                raise ValidationError("UnknownError", failure)
            doc = self._documents.get(did)
            if doc is not None:
                return doc
            raise ValidationError(
                "DIDKeyResolutionError",
                f"unable to resolve {quote(did)} key: its DID document was not resolved",
            )
        raise ValidationError(
            "DIDKeyResolutionError",
            f"unable to resolve {quote(did[:200])} key: not a did:key or did:plc, "
            "and no key is configured for it",
        )

    def check(
        self,
        did: str,
        msg: bytes,
        sig: bytes,
        *,
        delegation: bool = False,
        now: int | None = None,
    ) -> list[tuple[str, str]] | None:
        """Try each verification method of ``did`` on ``sig`` over ``msg``, in document order,
        as ucantone's validator does.

        Args:
            delegation: use ``capabilityDelegation`` instead of ``capabilityInvocation``
                (where a document declares them).
            now: the validation time; methods expired or revoked by then are rejected
                (``None``: not checked).

        Returns:
            ``None`` when one verified, else ``(method id, reason)`` for every method tried.

        Raises:
            ValidationError: as :meth:`resolve`; ``UnknownError`` when a Multikey method
                reached before a match does not decode, as ucantone stops there.
        """
        rejections: list[tuple[str, str]] = []
        for vm in self.resolve(did).methods_for(delegation=delegation):
            if now is not None:
                if vm.expires is not None and now >= vm.expires:
                    rejections.append((vm.id, "expired"))
                    continue
                if vm.revoked is not None and now >= vm.revoked:
                    rejections.append((vm.id, "revoked"))
                    continue
            key = vm.key
            if key is None:
                if vm.problem is not None:
                    raise ValidationError("UnknownError", vm.problem)
                rejections.append((vm.id, UNSUPPORTED))
                continue
            if key.verify(msg, sig):
                return None
            rejections.append((vm.id, MISMATCH))
        return rejections

    def keys(self, did: str) -> tuple[PublicKey, ...]:
        """The keys of ``did``; empty when it cannot be resolved."""
        try:
            return self.resolve(did).keys
        except ValidationError:
            return ()

    def can_resolve(self, did: str) -> bool:
        """Whether ``did`` has a document."""
        try:
            self.resolve(did)
        except ValidationError:
            return False
        return True

    def verify(self, did: str, msg: bytes, sig: bytes) -> bool:
        """Whether ``sig`` is a valid signature of ``msg`` by a key of ``did``."""
        try:
            return self.check(did, msg, sig) is None
        except ValidationError:
            return False


def _raw_ed25519(did: str, raw: bytes) -> PublicKey:
    """A raw static key: 32 bytes is Ed25519, as the static map always held."""
    if len(raw) != 32:
        raise DecodeError(f"cannot use key for {did[:80]!r}: must be 32 bytes (or a PublicKey)")
    return PublicKey.from_raw("ed25519", raw)
