"""Coverage-guided fuzzing of the request path with atheris (libFuzzer). Run by hand, not by
pytest (no ``test_`` prefix)::

    uv run --with atheris python tests/security/fuzz_atheris.py -max_total_time=120 [CORPUS_DIR]

The first input byte picks what the rest is: 0, a request body as published; 1, the payload
map of a token that is then validly signed (so validation, not only decoding, sees it);
2, a policy (CBOR) of a validly signed delegation in a request. Any exception other than
DecodeError, ValidationError and CommandError is a finding (libFuzzer saves the input).
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any

atheris: Any = importlib.import_module("atheris")

with atheris.instrument_imports(include=["worker", "cbor2"]):
    from worker import commands
    from worker.commands import CommandError
    from worker.ucan import (
        CID,
        DecodeError,
        Resolver,
        Signer,
        ValidationError,
        check_audience,
        customer_add_args,
        decode_request,
        encode_container,
        encode_delegation,
        encode_invocation,
        validate_invocation,
    )
    from worker.ucan.envelope import _sign

NOW = 1_767_225_600
SERVICE = Signer.generate()
HILT = Signer.generate()
RESOLVER = Resolver()
ARGS = customer_add_args("did:plc:li7co67qxxjdhfwum4ivdlay", "did:web:hilt.example", {"k": "v"})
ROOT = encode_delegation(SERVICE, aud=HILT.did, sub=SERVICE.did, cmd="/customer/add", exp=None)
INVOCATION = encode_invocation(
    HILT, sub=SERVICE.did, aud=SERVICE.did, cmd="/customer/add", args_raw=ARGS,
    exp=NOW + 300, prf=[CID.dag_cbor(ROOT)],
)  # fmt: skip
#: the slowest input so far; a new maximum over 0.2 s is printed (a time bomb is a finding too)
_slowest = 0.2


def pipeline(body: bytes) -> None:
    try:
        req = decode_request(body)
    except DecodeError:
        return
    for tok in req.invocations:
        try:
            check_audience(tok, SERVICE.did)
            validate_invocation(tok, req.delegations, now=NOW, clock_skew=60, resolver=RESOLVER)
            handler = commands.lookup(tok.cmd)
            if handler is not None:
                handler.prepare(tok, commands.Context(SERVICE.did))
        except (ValidationError, CommandError):
            pass


def one_input(data: bytes) -> None:
    global _slowest
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    start = time.perf_counter()
    if mode == 0:
        pipeline(rest)
    elif mode == 1:
        pipeline(encode_container([_sign(HILT, "ucan/inv@1.0.0-rc.1", rest), ROOT]))
    else:
        payload = _delegation_payload(rest)
        dlg = _sign(SERVICE, "ucan/dlg@1.0.0-rc.1", payload)
        inv = encode_invocation(
            HILT, sub=SERVICE.did, aud=SERVICE.did, cmd="/customer/add", args_raw=ARGS,
            exp=NOW + 300, prf=[CID.dag_cbor(dlg)],
        )  # fmt: skip
        pipeline(encode_container([inv, dlg]))
    elapsed = time.perf_counter() - start
    if elapsed > _slowest:
        _slowest = elapsed
        print(f"slow input: {elapsed:.3f}s mode {mode} {data[:80]!r}", file=sys.stderr)


def _delegation_payload(policy: bytes) -> bytes:
    from worker.ucan.cbor import encode_map_raw, encode_text

    return encode_map_raw(
        {
            "aud": encode_text(HILT.did),
            "cmd": encode_text("/customer/add"),
            "exp": b"\xf6",
            "iss": encode_text(SERVICE.did),
            "pol": policy,
            "sub": encode_text(SERVICE.did),
            "nonce": b"\x40",
        }
    )


def main() -> None:
    import os
    import tempfile

    seeds = [
        b"\x00" + encode_container([INVOCATION, ROOT]),
        b"\x00" + encode_container([INVOCATION, ROOT], header=0x45),
        b"\x00" + INVOCATION,
        b"\x01" + INVOCATION[67 + 32 :],  # the payload map (after a2 "h" header and the tag)
        b"\x02" + bytes.fromhex("8183646c696b65692e637573746f6d6572696469643a706c633a2a"),
    ]
    args = sys.argv[1:]
    if not any(not a.startswith("-") for a in args):  # no corpus given: a seeded temporary one
        corpus = tempfile.mkdtemp(prefix="forge-fuzz-")
        for i, seed in enumerate(seeds):
            with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
                f.write(seed)
        args.append(corpus)
    atheris.Setup([sys.argv[0], *args], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
