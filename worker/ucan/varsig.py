"""Varsig v1 headers: Ed25519 (``34 01 ed 01 ed 01 13 71``) and secp256k1 ECDSA
(``34 01 ec 01 e7 01 12 71``) over DAG-CBOR are accepted, the two ucantone signs with.

The header only says how the issuer claims to have signed: as ucantone, the validator does
not compare it with the issuer's key type, it tries the issuer's keys on the signed bytes.
"""

from __future__ import annotations

from typing import Final

from worker.ucan.cid import read_uvarint
from worker.ucan.errors import DecodeError

#: varsig v1, EdDSA, curve ed25519-pub, sha2-512, payload DAG-CBOR
ED25519_DAG_CBOR: Final = bytes.fromhex("3401ed01ed011371")
#: varsig v1, ECDSA, curve secp256k1-pub, sha2-256, payload DAG-CBOR
SECP256K1_DAG_CBOR: Final = bytes.fromhex("3401ec01e7011271")
#: the headers accepted on decode
HEADERS: Final = frozenset((ED25519_DAG_CBOR, SECP256K1_DAG_CBOR))

_ALGORITHMS: Final = {
    0xED: "EdDSA",
    0xEC: "ECDSA",
    0xD000: "absentee (non-standard)",
    0x300001: "attested authority (libforge)",
}


def check_header(header: bytes) -> None:
    """Accept the Ed25519 and secp256k1 DAG-CBOR headers; refuse any other, naming what it is.

    Raises:
        DecodeError: any other header.
    """
    if header in HEADERS:
        return
    raise DecodeError(f"cannot decode token: unsupported varsig header {describe(header)}")


def describe(header: bytes) -> str:
    """A short description of a varsig header for error messages."""
    shown = header[:16].hex() + ("…" if len(header) > 16 else "")
    if len(header) < 2 or header[0] != 0x34:
        return f"{shown} (not varsig: expected prefix 0x34)"
    if header[1] != 0x01:
        return f"{shown} (varsig version {header[1]}, only version 1 is supported)"
    try:
        alg, _ = read_uvarint(header, 2)
    except DecodeError:
        return f"{shown} (truncated)"
    name = _ALGORITHMS.get(alg, f"algorithm 0x{alg:x}")
    return (
        f"{shown} ({name}; only Ed25519 (3401ed01ed011371) and secp256k1 (3401ec01e7011271) "
        "with DAG-CBOR payload are accepted)"
    )
