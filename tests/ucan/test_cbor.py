"""The DAG-CBOR decoder (strict but for key order, bounded) and the canonical encoder."""

from __future__ import annotations

import time
from typing import Any

import cbor2
import dag_cbor
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.ucan import CID, DecodeError, decode, encode, to_dag_json
from worker.ucan.cbor import from_dag_json, reencode

LINK = CID.dag_cbor(b"hello")


@pytest.mark.parametrize(
    ("hexdata", "why"),
    [
        ("1801", "non-minimal integer"),
        ("190001", "non-minimal integer"),
        ("5801ff", "non-minimal length"),
        ("9f01ff", "indefinite array"),
        ("5f4101ff", "indefinite bytes"),
        ("a2616101616102", "duplicate key"),
        ("a10101", "integer key"),
        ("a1410101", "bytes key"),
        ("f7", "undefined"),
        ("f0", "simple value"),
        ("f97e00", "NaN"),
        ("f97c00", "Infinity"),
        ("fb7ff8000000000000", "NaN as float64"),
        ("fa3fc00000", "float32"),
        ("f93e00", "float16"),
        ("c249010000000000000000", "bignum tag"),
        ("c074323031332d30332d32315432303a30343a30305a", "datetime tag"),
        ("d9010280", "set tag"),
        ("d81c01", "shareable tag"),
        ("d82a4101", "link without 0x00 prefix"),
        ("d82a4400017112", "truncated cid"),
        ("d82b4100", "other tag"),
        ("0102", "trailing bytes"),
        ("62c328", "invalid utf-8"),
        ("5affffffff00", "declared length beyond the input"),
        ("", "empty"),
    ],
)
def test_decode_refuses_what_dag_cbor_forbids(hexdata: str, why: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(bytes.fromhex(hexdata))
    assert "\n" not in str(info.value), why
    assert str(info.value).startswith("cannot"), why


def test_decode_accepts_any_map_key_order() -> None:
    go_order = bytes.fromhex("a2") + cbor2.dumps("external_id") + cbor2.dumps("x")
    go_order += cbor2.dumps("region") + cbor2.dumps("y")
    value = decode(go_order)
    assert list(value) == ["external_id", "region"]
    assert reencode(value) == go_order  # wire order kept
    assert encode(value) != go_order  # canonical order differs
    with pytest.raises(Exception, match="canonical"):
        dag_cbor.decode(go_order)


def test_decode_link_and_values() -> None:
    data = encode({"l": LINK, "b": b"\x00\x01", "n": None, "t": True, "i": -5, "f": 1.5})
    assert decode(data) == {"b": b"\x00\x01", "f": 1.5, "i": -5, "l": LINK, "n": None, "t": True}
    assert data == dag_cbor.encode(dag_cbor.decode(data))


def test_depth_is_bounded() -> None:
    assert decode(b"\x81" * 10 + b"\x01", max_depth=10) is not None
    with pytest.raises(DecodeError, match="depth"):
        decode(b"\x81" * 11 + b"\x01", max_depth=10)
    with pytest.raises(DecodeError):
        decode(b"\x81" * 200_000 + b"\x01")


def test_declared_lengths_do_not_allocate() -> None:
    start = time.perf_counter()
    for data in (b"\x9b" + b"\xff" * 8, b"\x5b" + b"\x7f" * 8, b"\xbb" + b"\x7f" * 8):
        with pytest.raises(DecodeError):
            decode(data)
    assert time.perf_counter() - start < 1.0


def test_encode_is_canonical() -> None:
    assert encode({"aaa": 1, "b": 2, "aa": 3}) == bytes.fromhex("a3616202626161036361616101")
    assert encode(1.0) == bytes.fromhex("fb3ff0000000000000")
    with pytest.raises(DecodeError):
        encode(float("nan"))
    with pytest.raises(DecodeError):
        encode({1: 2})
    with pytest.raises(DecodeError):
        encode({1, 2})


def test_dag_json_form() -> None:
    value = {"b": b"\x01\x02", "l": LINK, "s": [1, "x"]}
    doc = to_dag_json(value)
    assert doc == {"b": {"/": {"bytes": "AQI"}}, "l": {"/": str(LINK)}, "s": [1, "x"]}
    assert from_dag_json(doc) == value


# --- property tests -------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
dag_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@given(dag_values)
def test_encoder_agrees_with_dag_cbor_package(value: Any) -> None:
    data = encode(value)
    assert data == dag_cbor.encode(value)
    assert decode(data) == value


@given(dag_values)
def test_round_trip_in_wire_order(value: Any) -> None:
    data = encode(value)
    assert reencode(decode(data)) == data


def _decode_or_error(data: bytes) -> None:
    start = time.perf_counter()
    try:
        decode(data)
    except DecodeError as exc:
        assert "\n" not in str(exc)
    assert time.perf_counter() - start < 2.0


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    _decode_or_error(data)


@settings(max_examples=500)
@given(dag_values, st.data())
def test_mutated_input_decodes_or_raises_decode_error(value: Any, data: st.DataObject) -> None:
    raw = bytearray(encode({"v": value, "l": LINK}))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if op == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i:]
            if not raw:
                raw.append(0)
        else:
            raw.insert(i, data.draw(st.integers(0, 255)))
    _decode_or_error(bytes(raw))
