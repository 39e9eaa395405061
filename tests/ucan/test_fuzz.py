"""Property tests: token and request decoding on arbitrary and mutated input returns a value
or raises DecodeError (one line), nothing else, and finishes fast."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.principals import KEYS, build_hilt_request
from worker.ucan import DecodeError, Signer, decode_request, decode_token, encode_container

_REQ = build_hilt_request({name: Signer.parse(key) for name, key in KEYS.items()})
_BODIES = [
    _REQ.invocation,
    _REQ.delegation,
    encode_container([_REQ.invocation, _REQ.delegation]),
    encode_container([_REQ.invocation, _REQ.delegation], header=0x45),
]


def _only_decode_error(fn: Callable[[bytes], Any], data: bytes) -> None:
    start = time.perf_counter()
    try:
        fn(data)
    except DecodeError as exc:
        assert "\n" not in str(exc)
    assert time.perf_counter() - start < 2.0


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    _only_decode_error(decode_token, data)
    _only_decode_error(decode_request, data)
    _only_decode_error(decode_request, b"\x82" + data)
    _only_decode_error(decode_request, b"\xa1\x66ctn-v1" + data)


@settings(max_examples=500)
@given(st.sampled_from(_BODIES), st.data())
def test_mutated_tokens_and_containers(body: bytes, data: st.DataObject) -> None:
    raw = bytearray(body)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if op == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[max(i, 1) :]
        else:
            raw.insert(i, data.draw(st.integers(0, 255)))
    _only_decode_error(decode_token, bytes(raw))
    _only_decode_error(decode_request, bytes(raw))
