"""Ed25519 identities: did:key, ucantone's private-key format, signing and verification."""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.signing

from worker.ucan.cid import b58decode, b58encode
from worker.ucan.errors import DecodeError

#: multicodec ed25519-pub, as a varint
ED25519_PUB: Final = b"\xed\x01"
#: multicodec ed25519-priv (0x1300), as a varint: the prefix of ucantone's key format
ED25519_PRIV: Final = b"\x80\x26"
_DID_KEY: Final = "did:key:z"
_CACHE_SIZE: Final = 4096
#: the longest DID whose resolution is cached: issuers are looked up before any signature
#: is checked and may be 2,048 characters; a did:key is under 64
_CACHE_DID_MAX: Final = 128


def did_key(public_key: bytes) -> str:
    """The ``did:key`` of a 32-byte Ed25519 public key."""
    return _DID_KEY + b58encode(ED25519_PUB + public_key)


def did_key_public(did: str) -> bytes:
    """The Ed25519 public key inside an Ed25519 ``did:key``.

    Raises:
        DecodeError: not an Ed25519 did:key.
    """
    if not did.startswith(_DID_KEY):
        raise DecodeError(f"cannot resolve {did[:80]!r}: not a base58btc did:key")
    raw = b58decode(did[len(_DID_KEY) :])
    if len(raw) != 34 or not raw.startswith(ED25519_PUB):
        raise DecodeError(f"cannot resolve {did[:80]!r}: not an Ed25519 did:key")
    return raw[2:]


class Signer:
    """An Ed25519 signing identity; ``repr()`` and errors never show the key."""

    __slots__ = ("_did", "_key", "_secret", "key_did", "public_key")

    def __init__(self, seed: bytes, did: str | None = None) -> None:
        """A signer from a 32-byte seed, acting as ``did`` (default: its did:key)."""
        if len(seed) != 32:
            raise DecodeError("cannot load key: the seed must be 32 bytes")
        self._key = nacl.signing.SigningKey(seed)
        # libsodium's 64-byte secret key, for signing without SigningKey.sign's wrapping
        self._secret: bytes = nacl.bindings.crypto_sign_seed_keypair(seed)[1]
        #: the 32-byte public key
        self.public_key: bytes = bytes(self._key.verify_key)
        #: always the key's did:key
        self.key_did: str = did_key(self.public_key)
        self._did = did or self.key_did

    @property
    def did(self) -> str:
        """The DID this signer acts as."""
        return self._did

    @classmethod
    def generate(cls) -> Signer:
        """A new random key."""
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @classmethod
    def parse(cls, key: str) -> Signer:
        """A key in ucantone's format: base64pad(0x80 0x26 + seed), optional multibase ``M``.

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
        if len(raw) != 34 or not raw.startswith(ED25519_PRIV):
            raise DecodeError(
                "cannot load key: expected 0x80 0x26 followed by a 32-byte Ed25519 seed"
            )
        return cls(raw[2:])

    def with_did(self, did: str) -> Signer:
        """The same key acting as ``did`` (e.g. ``did:web:upload.example``)."""
        return Signer(bytes(self._key), did)

    def export(self) -> str:
        """The key in ucantone's format (base64pad, no multibase prefix)."""
        return base64.b64encode(ED25519_PRIV + bytes(self._key)).decode()

    def sign(self, msg: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``msg``."""
        # what SigningKey.sign returns as .signature, without its three copies of the
        # signed message and a SignedMessage (about 1 µs of the receipt sent per message)
        return nacl.bindings.crypto_sign(msg, self._secret)[: nacl.bindings.crypto_sign_BYTES]

    def __repr__(self) -> str:
        return f"Signer(did={self._did!r})"


class Resolver:
    """DID → Ed25519 public keys: did:key computed, other DIDs from a static map."""

    def __init__(
        self,
        static: Mapping[str, Sequence[bytes]] | None = None,
        *,
        cache_verified: bool = True,
    ) -> None:
        """A resolver.

        Args:
            static: public keys (32 bytes each) of DIDs that are not did:key, e.g. did:web.
            cache_verified: remember delegations (by CID) whose signature verified, so a
                proof shared by many invocations is verified once.
        """
        self._cache_verified = cache_verified
        self._static: dict[str, tuple[nacl.signing.VerifyKey, ...]] = {}
        for did, keys in (static or {}).items():
            for k in keys:
                if len(k) != 32:
                    raise DecodeError(f"cannot use key for {did!r}: must be 32 bytes")
            self._static[did] = tuple(nacl.signing.VerifyKey(bytes(k)) for k in keys)
        self._cache: OrderedDict[str, tuple[nacl.signing.VerifyKey, ...]] = OrderedDict()
        self._verified: OrderedDict[bytes, None] = OrderedDict()

    def seen(self, token_cid: bytes) -> bool:
        """Whether a token with this binary CID was verified by this resolver before."""
        return self._cache_verified and token_cid in self._verified

    def remember(self, token_cid: bytes) -> None:
        """Record that the token with this binary CID has a valid signature (bounded LRU)."""
        if not self._cache_verified:
            return
        self._verified[token_cid] = None
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)

    def keys(self, did: str) -> tuple[nacl.signing.VerifyKey, ...]:
        """The verify keys of ``did``; empty when it cannot be resolved."""
        found = self._static.get(did)
        if found is not None:
            return found
        found = self._cache.get(did)
        if found is not None:
            return found
        try:
            found = (nacl.signing.VerifyKey(did_key_public(did)),)
        except (DecodeError, ValueError):
            found = ()
        if len(did) <= _CACHE_DID_MAX:
            self._cache[did] = found
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return found

    def can_resolve(self, did: str) -> bool:
        """Whether ``did`` has at least one key."""
        return bool(self.keys(did))

    def verify(self, did: str, msg: bytes, sig: bytes) -> bool:
        """Whether ``sig`` is a valid Ed25519 signature of ``msg`` by a key of ``did``."""
        if len(sig) != 64:
            return False
        for key in self.keys(did):
            try:
                key.verify(msg, sig)
            except nacl.exceptions.BadSignatureError:
                continue
            return True
        return False
