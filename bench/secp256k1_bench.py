"""secp256k1 for ucantone: the candidate libraries measured beside PyNaCl's Ed25519.

Run with both candidates installed beside the project's own dependencies::

    uv run --with coincurve --with cryptography python bench/secp256k1_bench.py [--seconds S]

A candidate that is not installed is reported as such. Prints a table and writes
``bench/results/secp256k1.json``. Pure CPU, one core, no services.

What ucantone's secp256k1 (``multikey/secp256k1``, secp256k1-voi underneath) needs, and what
is checked here for every candidate before any figure is trusted:

- signing: SHA-256 of the message, RFC 6979 deterministic nonce, low-S, 64-byte ``r‖s``:
  every ``secp256k1.*.sig.*.bin`` of ``shared/vectors/ucantone-go`` reproduced byte for byte;
- verifying: the same signatures verify; high-S twins (``s`` → ``n − s``, valid ECDSA) and
  ``r`` or ``s`` outside ``[1, n−1]`` are refused. These two checks are done explicitly
  before the library is called (as the worker does, whichever library), and the table also
  says whether the library alone would have refused them;
- keys: 33-byte compressed public keys parse; points not on the curve, ``x ≥ p``, and
  prefixes other than 02/03 are refused.

The rates are per CPU second of one core (``time.process_time``), best of three, like
``bench/ucan_bench.py``. A verification is timed with the public key already parsed (the
resolver keeps parsed keys), over a 400-byte message (a /provider/add SigPayload is ~390).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import nacl.signing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import _common as c  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VECTORS = ROOT.parent / "shared" / "vectors" / "ucantone-go"

#: the order of the secp256k1 group, and the field prime
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
P = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEFFFFFC2F
HALF_N = N >> 1


def in_range(sig: bytes) -> bool:
    """What ucantone's verifier demands of ``r‖s`` before any curve arithmetic: 64 bytes,
    ``1 ≤ r ≤ n−1`` and ``1 ≤ s ≤ n/2`` (low-S, ``RejectMalleable``)."""
    if len(sig) != 64:
        return False
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    return 0 < r < N and 0 < s <= HALF_N


class Candidate(Protocol):
    name: str

    def version(self) -> str: ...
    def signer(self, secret: bytes) -> Callable[[bytes], bytes]: ...
    def public_key(self, secret: bytes) -> bytes: ...
    def parse(self, compressed: bytes) -> Any: ...
    def verify(self, key: Any, msg: bytes, sig: bytes, *, checks: bool = True) -> bool: ...


class Coincurve:
    """libsecp256k1 through coincurve's public API (``PrivateKey.sign`` gives DER, turned
    into ``r‖s`` with ``coincurve.ecdsa``; ``PublicKey.verify`` takes DER)."""

    name = "coincurve"

    def __init__(self) -> None:
        import coincurve
        import coincurve.ecdsa

        self.cc = coincurve
        self.ecdsa = coincurve.ecdsa

    def version(self) -> str:
        return importlib.metadata.version("coincurve")

    def signer(self, secret: bytes) -> Callable[[bytes], bytes]:
        key = self.cc.PrivateKey(secret)
        der_to_cdata, serialize_compact = self.ecdsa.der_to_cdata, self.ecdsa.serialize_compact
        return lambda msg: serialize_compact(der_to_cdata(key.sign(msg)))

    def public_key(self, secret: bytes) -> bytes:
        return bytes(self.cc.PrivateKey(secret).public_key.format(compressed=True))

    def parse(self, compressed: bytes) -> Any:
        if len(compressed) != 33:
            raise ValueError("not 33 bytes")
        return self.cc.PublicKey(compressed)

    def verify(self, key: Any, msg: bytes, sig: bytes, *, checks: bool = True) -> bool:
        if checks and not in_range(sig):
            return False
        try:
            der = self.ecdsa.cdata_to_der(self.ecdsa.deserialize_compact(sig))
        except ValueError:  # r or s ≥ n
            return False
        return bool(key.verify(der, msg))


class CoincurveRaw(Coincurve):
    """The same library called the way the worker does: libsecp256k1's compact-signature
    functions through coincurve's cffi module, without the DER round trip."""

    name = "coincurve (compact calls)"

    def __init__(self) -> None:
        super().__init__()
        from coincurve._libsecp256k1 import ffi, lib  # type: ignore[import-not-found]
        from coincurve.context import GLOBAL_CONTEXT

        self.ffi, self.lib, self.ctx = ffi, lib, GLOBAL_CONTEXT.ctx

    def signer(self, secret: bytes) -> Callable[[bytes], bytes]:
        ffi, lib, ctx = self.ffi, self.lib, self.ctx
        sha256 = hashlib.sha256

        def sign(msg: bytes) -> bytes:
            sig = ffi.new("secp256k1_ecdsa_signature *")
            out = ffi.new("unsigned char[64]")
            # NULL nonce function: libsecp256k1's RFC 6979; its signatures are always low-S
            digest = sha256(msg).digest()
            if not lib.secp256k1_ecdsa_sign(ctx, sig, digest, secret, ffi.NULL, ffi.NULL):
                raise ValueError("signing failed")
            lib.secp256k1_ecdsa_signature_serialize_compact(ctx, out, sig)
            return bytes(out)

        return sign

    def verify(self, key: Any, msg: bytes, sig: bytes, *, checks: bool = True) -> bool:
        if checks and not in_range(sig):
            return False
        parsed = self.ffi.new("secp256k1_ecdsa_signature *")
        if len(sig) != 64 or not self.lib.secp256k1_ecdsa_signature_parse_compact(
            self.ctx, parsed, sig
        ):
            return False
        digest = hashlib.sha256(msg).digest()
        return bool(self.lib.secp256k1_ecdsa_verify(self.ctx, parsed, digest, key.public_key))


class Cryptography:
    """OpenSSL through pyca/cryptography: deterministic ECDSA (``deterministic_signing``),
    DER in and out, no low-S of its own (normalised here)."""

    name = "cryptography"

    def __init__(self) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, utils

        self.ec, self.utils, self.hashes = ec, utils, hashes
        self.InvalidSignature = InvalidSignature
        self.sign_alg = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
        self.verify_alg = ec.ECDSA(hashes.SHA256())

    def version(self) -> str:
        return importlib.metadata.version("cryptography")

    def signer(self, secret: bytes) -> Callable[[bytes], bytes]:
        key = self.ec.derive_private_key(int.from_bytes(secret, "big"), self.ec.SECP256K1())
        decode, alg = self.utils.decode_dss_signature, self.sign_alg

        def sign(msg: bytes) -> bytes:
            r: int
            s: int
            r, s = decode(key.sign(msg, alg))
            if s > HALF_N:  # OpenSSL does not normalise; RFC 6979's k is unchanged by this
                s = N - s
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

        return sign

    def public_key(self, secret: bytes) -> bytes:
        from cryptography.hazmat.primitives import serialization

        key = self.ec.derive_private_key(int.from_bytes(secret, "big"), self.ec.SECP256K1())
        return bytes(
            key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
            )
        )

    def parse(self, compressed: bytes) -> Any:
        if len(compressed) != 33:
            raise ValueError("not 33 bytes")
        return self.ec.EllipticCurvePublicKey.from_encoded_point(self.ec.SECP256K1(), compressed)

    def verify(self, key: Any, msg: bytes, sig: bytes, *, checks: bool = True) -> bool:
        if checks and not in_range(sig):
            return False
        if len(sig) != 64:
            return False
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        try:
            key.verify(self.utils.encode_dss_signature(r, s), msg, self.verify_alg)
        except (self.InvalidSignature, ValueError):
            return False
        return True


def candidates() -> tuple[list[Candidate], dict[str, str]]:
    """The candidates that are installed, and why the others are missing."""
    found: list[Candidate] = []
    missing: dict[str, str] = {}
    for cls in (Coincurve, CoincurveRaw, Cryptography):
        try:
            found.append(cls())
        except ImportError as exc:
            missing[cls.name] = f"not installed ({exc.name})"
    return found, missing


def secp_vectors() -> list[dict[str, Any]]:
    """The secp256k1 keys of keys.json with their message and signature bytes."""
    path = VECTORS / "keys.json"
    if not path.exists():
        return []
    out = []
    for key in json.loads(path.read_text())["secp256k1"]:
        sigs = {
            m: ((VECTORS / f"msg.{m}.bin").read_bytes(), bytes.fromhex(h))
            for m, h in key["signatures_hex"].items()
        }
        out.append(
            {
                "secret": bytes.fromhex(key["secret_scalar_hex"]),
                "public": bytes.fromhex(key["public_key_hex"]),
                "sigs": sigs,
            }
        )
    return out


def high_s(sig: bytes) -> bytes:
    return sig[:32] + (N - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")


def bad_points() -> list[bytes]:
    """Compressed encodings that are not points of the curve."""
    out = [b"\x04" + bytes(32), b"\x05" + bytes(31) + b"\x01", b"\x02" + P.to_bytes(32, "big")]
    x = 5  # the first x ≥ 1 for which x³ + 7 is not a square mod p
    while pow(x**3 + 7, (P - 1) // 2, P) == 1:
        x += 1
    out.append(b"\x02" + x.to_bytes(32, "big"))
    out.append(b"\x02" + bytes(32))  # x = 0: 7 is not a square mod p
    return out


def capabilities(cand: Candidate, vectors: list[dict[str, Any]]) -> dict[str, bool | None]:
    """What the candidate does of what ucantone needs (None: no vectors to check against)."""
    caps: dict[str, bool | None] = {}
    if vectors:
        reproduced, verified, lib_high_s, high_s_refused = True, True, True, True
        for v in vectors:
            sign = cand.signer(v["secret"])
            key = cand.parse(v["public"])
            if cand.public_key(v["secret"]) != v["public"]:
                reproduced = False
            for msg, want in v["sigs"].values():
                got = sign(msg)
                reproduced &= got == want
                verified &= cand.verify(key, msg, want)
                twin = high_s(want)
                lib_high_s &= not cand.verify(key, msg, twin, checks=False)
                high_s_refused &= not cand.verify(key, msg, twin)
        caps["rfc6979_low_s_compact_matches_ucantone"] = reproduced
        caps["verifies_ucantone_signatures"] = verified
        caps["high_s_refused_with_explicit_check"] = high_s_refused
        caps["high_s_refused_by_library_alone"] = lib_high_s
    else:
        for k in (
            "rfc6979_low_s_compact_matches_ucantone",
            "verifies_ucantone_signatures",
            "high_s_refused_with_explicit_check",
            "high_s_refused_by_library_alone",
        ):
            caps[k] = None
    secret = hashlib.sha256(b"bench").digest()
    key = cand.parse(cand.public_key(secret))
    sig = cand.signer(secret)(b"m")
    caps["signs_low_s"] = int.from_bytes(sig[32:], "big") <= HALF_N
    r, s = sig[:32], sig[32:]
    out_of_range = [
        bytes(32) + s,
        r + bytes(32),
        N.to_bytes(32, "big") + s,
        r + N.to_bytes(32, "big"),
        b"\xff" * 32 + s,
    ]

    def refused(checks: bool) -> bool:
        try:
            return not any(cand.verify(key, b"m", bad, checks=checks) for bad in out_of_range)
        except Exception:  # a library that raises instead of answering False
            return False

    caps["r_s_out_of_range_refused_with_explicit_check"] = refused(True)
    caps["r_s_out_of_range_refused_by_library_alone"] = refused(False)
    bad_refused = True
    for point in bad_points():
        try:
            cand.parse(point)
            bad_refused = False
        except (ValueError, TypeError):
            pass
    caps["invalid_points_refused"] = bad_refused
    return caps


def rate(fn: Callable[[Any], object], items: list[Any], seconds: float) -> float:
    """Best of three runs of ``fn`` over ``items`` (cycled), in calls per CPU second."""
    runs = []
    for _ in range(3):
        done = 0
        start = time.process_time()
        deadline = start + seconds / 3
        while True:
            for it in items:
                fn(it)
            done += len(items)
            if time.process_time() >= deadline:
                break
        runs.append(done / (time.process_time() - start))
    return max(runs)


def measure(cand: Candidate, msgs: list[bytes], seconds: float) -> dict[str, float]:
    secret = hashlib.sha256(b"bench-" + cand.name.encode()).digest()
    sign = cand.signer(secret)
    compressed = cand.public_key(secret)
    key = cand.parse(compressed)
    pairs = [(m, sign(m)) for m in msgs]
    assert all(cand.verify(key, m, s) for m, s in pairs)
    verify = cand.verify
    return {
        "verify_per_s": rate(lambda p: verify(key, p[0], p[1]), pairs, seconds),
        "sign_per_s": rate(sign, msgs, seconds),
        "parse_key_per_s": rate(cand.parse, [compressed] * 100, seconds / 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    a = p.parse_args(argv)

    msgs = [hashlib.sha256(bytes([i])).digest() * 12 + bytes(16) for i in range(100)]  # 400 B
    vectors = secp_vectors()
    found, missing = candidates()
    results: dict[str, Any] = {}
    for cand in found:
        results[cand.name] = {
            "version": cand.version(),
            "capabilities": capabilities(cand, vectors),
            "figures": {k: round(v) for k, v in measure(cand, msgs, a.seconds).items()},
        }

    key = nacl.signing.SigningKey(hashlib.sha256(b"bench").digest())
    vk = key.verify_key
    signed = [(m, key.sign(m).signature) for m in msgs]
    ed = {
        "verify_per_s": rate(lambda p: vk.verify(p[0], p[1]), signed, a.seconds),
        "sign_per_s": rate(key.sign, msgs, a.seconds),
    }
    results["pynacl ed25519"] = {
        "version": importlib.metadata.version("pynacl"),
        "figures": {k: round(v) for k, v in ed.items()},
    }

    info: dict[str, Any] = dict(c.machine_info())
    info["platform"] = platform.platform()
    doc = {
        "machine": info,
        "message_bytes": len(msgs[0]),
        "clock": "process CPU time (time.process_time), best of 3, one core",
        "vectors_checked": bool(vectors),
        "candidates": results,
        "missing": missing,
    }
    print(
        f"machine: {info['cpu_model']}, {info['cpus']} CPUs, {info['platform']}, "
        f"Python {info['python']} (load average at start {info['loadavg_at_start']})"
    )
    print(f"rates per CPU second of one core, {len(msgs[0])}-byte messages")
    print(f"  {'library':<30} {'version':>8} {'verify/s':>10} {'sign/s':>10} {'parse key/s':>12}")
    for name, r in results.items():
        f = r["figures"]
        parse = f"{f['parse_key_per_s']:>12,}" if "parse_key_per_s" in f else f"{'-':>12}"
        rates = f"{f['verify_per_s']:>10,} {f['sign_per_s']:>10,} {parse}"
        print(f"  {name:<30} {r['version']:>8} {rates}")
    for name, why in missing.items():
        print(f"  {name:<30} {why}")
    if not vectors:
        print(f"  (no vectors at {VECTORS}: the ucantone checks were not made)")
    for name, r in results.items():
        if "capabilities" in r:
            print(f"  {name}:")
            for k, v in r["capabilities"].items():
                print(f"    {k:<48} {v}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "secp256k1.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS / 'secp256k1.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
