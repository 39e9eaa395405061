"""Fixtures for the protocol tests: the ucantone fixture principals and a Hilt-style request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker.ucan import Signer, customer_add_args, encode_delegation, encode_invocation
from worker.ucan.cbor import from_dag_json

#: the fixture principals of shared/vectors/README.md (public test keys, not secrets)
KEYS = {
    "alice": "gCa9UfZv+yI5/rvUIt21DaGI7EZJlzFO1uDc5AyJ30c6/w==",
    "bob": "gCZfj9+RzU2U518TMBNK/fjdGQz34sB4iKE6z+9lQDpCIQ==",
    "carol": "gCZC43QGw7ZvYQuKTtBwBy+tdjYrKf0hXU3dd+J0HON5dw==",
    "dave": "gCY4fdpJOoIaIhEpj4HUj9qfgf8BlW7h3T9IbK9pTddRCw==",
}
DIDS = {
    "alice": "did:key:z6MkgGykN9ARNFjEzowVq4mLP2kL4NsyAaDGXeJFQ5qE1bfg",
    "bob": "did:key:z6MkmT9j6fVZqzXV8u2wVVSu49gYSRYGSQnduWXF6foAJrqz",
    "carol": "did:key:z6MkmJceVoQSHs45cReEXoLtWm1wosCG8RLxfKwhxoqzoTkC",
    "dave": "did:key:z6Mkh7wJtReCeeT9yDR2nR52omKCayS6zbg8tnW8Jok9CJhk",
}
#: the validation time of the ucantone fixtures
NOW = 1767225600
CUSTOMER = "did:plc:li7co67qxxjdhfwum4ivdlay"
PRODUCT = "did:web:hilt.fil-forge.com"


@pytest.fixture(scope="session")
def principals() -> dict[str, Signer]:
    return {name: Signer.parse(key) for name, key in KEYS.items()}


@pytest.fixture(scope="session")
def ucantone(vectors: Path) -> Path:
    return vectors / "ucantone"


def load_dag_json(path: Path) -> Any:
    return from_dag_json(json.loads(path.read_text()))


@dataclass(frozen=True)
class HiltRequest:
    """A /customer/add invocation as Hilt builds it (alice = Hilt, bob = the service)."""

    invocation: bytes
    delegation: bytes
    args_raw: bytes
    nonce: bytes


def build_hilt_request(
    principals: dict[str, Signer],
    *,
    details: dict[str, str] | None = None,
    exp: int | None = NOW + 30,
    nonce: bytes = bytes(range(16)),
    external_account: str | None = None,
    pol: list[Any] | None = None,
) -> HiltRequest:
    hilt, service = principals["alice"], principals["bob"]
    if details is None:
        details = {"external_id": "ext-123", "region": "us-east-1"}
    dlg = encode_delegation(
        service,
        aud=hilt.did,
        sub=service.did,
        cmd="/customer/add",
        pol=pol or [],
        exp=None,
        nonce=b"\x07" * 16,
    )
    from worker.ucan import CID

    args_raw = customer_add_args(CUSTOMER, PRODUCT, details, external_account)
    inv = encode_invocation(
        hilt,
        sub=service.did,
        aud=service.did,
        cmd="/customer/add",
        args_raw=args_raw,
        exp=exp,
        nonce=nonce,
        prf=[CID.dag_cbor(dlg)],
    )
    return HiltRequest(inv, dlg, args_raw, nonce)


@pytest.fixture
def hilt(principals: dict[str, Signer]) -> HiltRequest:
    return build_hilt_request(principals)
