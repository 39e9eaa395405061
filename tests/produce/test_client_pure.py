"""The client's pure parts: the invocation's shape, proof chains, receipt verification."""

from __future__ import annotations

import asyncio

import pytest

from worker.client import (
    CUSTOMER_ADD,
    Client,
    CustomerAdd,
    InvalidReceipt,
    ProofError,
    ReceiptError,
    ReceiptTimeout,
    SignedRequest,
    build_customer_add,
    command_covers,
    load_proofs,
    proof_chain,
    reply_queue_arguments,
    reply_queue_name,
    verify_response,
)
from worker.errors import WorkerError
from worker.ucan import (
    Delegation,
    Invocation,
    Resolver,
    Signer,
    ValidationError,
    build_receipt,
    check_audience,
    customer_add_args,
    decode_request,
    decode_token,
    encode_container,
    encode_delegation,
    validate_invocation,
)

NOW = 1_790_000_000
PRODUCT = "did:web:hilt.fil-forge.com"


def _delegation(
    issuer: Signer,
    audience: str,
    *,
    sub: str | None = None,
    cmd: str = CUSTOMER_ADD,
    exp: int | None = None,
    use_sub: bool = True,
) -> Delegation:
    token = encode_delegation(
        issuer,
        aud=audience,
        sub=(sub or issuer.did) if use_sub else None,
        cmd=cmd,
        exp=exp,
    )
    d = decode_token(token)
    assert isinstance(d, Delegation)
    return d


@pytest.fixture(name="service")
def _service() -> Signer:
    return Signer.generate()


@pytest.fixture(name="hilt")
def _hilt() -> Signer:
    return Signer.generate()


def _request(service: Signer, hilt: Signer, **kw: object) -> tuple[SignedRequest, Delegation]:
    proof = _delegation(service, hilt.did)
    args = CustomerAdd(
        "did:plc:li7co67qxxjdhfwum4ivdlay",
        PRODUCT,
        {"region": "us-east-1", "external_id": "ext-123"},
    )
    req = build_customer_add(hilt, service.did, args, proofs=[proof], now=NOW, **kw)  # type: ignore[arg-type]
    return req, proof


def test_invocation_has_hilts_shape(service: Signer, hilt: Signer) -> None:
    req, proof = _request(service, hilt, lifetime=600)
    inv = decode_token(req.invocation)
    assert isinstance(inv, Invocation)
    assert inv.iss == hilt.did
    assert inv.aud == inv.sub == service.did
    assert inv.cmd == "/customer/add"
    assert inv.prf == (proof.cid,)
    assert inv.exp == NOW + 600
    assert inv.iat is None
    assert len(inv.nonce) == 16
    assert inv.tag == "ucan/inv@1.0.0-rc.1"
    assert inv.cid == req.cid
    assert inv.task_cid == req.task
    assert inv.args == {
        "customer": "did:plc:li7co67qxxjdhfwum4ivdlay",
        "product": PRODUCT,
        "details": {"region": "us-east-1", "external_id": "ext-123"},
    }


def test_args_are_go_ordered_byte_for_byte(service: Signer, hilt: Signer) -> None:
    req, _ = _request(service, hilt)
    inv = decode_token(req.invocation)
    assert isinstance(inv, Invocation)
    expected = customer_add_args(
        "did:plc:li7co67qxxjdhfwum4ivdlay",
        PRODUCT,
        {"region": "us-east-1", "external_id": "ext-123"},
    )
    assert inv.args_raw == expected
    # Go sort.Strings order: external_id (11 chars) before region (6): not length-first
    assert inv.args_raw.index(b"external_id") < inv.args_raw.index(b"region")
    # and the map order details, product, customer
    raw = inv.args_raw
    assert raw.index(b"details") < raw.index(b"product") < raw.index(b"customer")
    assert b"externalAccount" not in raw


def test_external_account_is_written_when_given(service: Signer, hilt: Signer) -> None:
    req = build_customer_add(
        hilt,
        service.did,
        CustomerAdd("did:plc:x", PRODUCT, {}, "stripe:cus_1"),
        proofs=[_delegation(service, hilt.did)],
        now=NOW,
    )
    inv = decode_token(req.invocation)
    assert isinstance(inv, Invocation)
    assert inv.args["externalAccount"] == "stripe:cus_1"
    assert inv.args["details"] == {}


def test_body_is_a_headerless_container_that_validates(service: Signer, hilt: Signer) -> None:
    req, proof = _request(service, hilt)
    assert req.body[0] == 0xA1  # {"ctn-v1": ...} with no header byte
    parsed = decode_request(req.body)
    assert [i.cid for i in parsed.invocations] == [req.cid]
    assert set(parsed.delegations) == {proof.cid}
    [inv] = parsed.invocations
    check_audience(inv, service.did)
    validate_invocation(inv, parsed.delegations, now=NOW + 1)
    with pytest.raises(ValidationError) as caught:
        validate_invocation(inv, parsed.delegations, now=NOW + 10_000)
    assert caught.value.name == "Expired"


def test_no_lifetime_means_no_expiry(service: Signer, hilt: Signer) -> None:
    req, _ = _request(service, hilt, lifetime=None)
    assert req.exp is None
    inv = decode_token(req.invocation)
    assert inv.exp is None


def test_the_service_itself_needs_no_proof(service: Signer) -> None:
    req = build_customer_add(service, service.did, CustomerAdd("did:plc:x", PRODUCT), now=NOW)
    inv = decode_token(req.invocation)
    assert isinstance(inv, Invocation)
    assert inv.prf == ()
    assert decode_request(req.body).delegations == {}


def test_chain_is_root_first_across_two_hops(service: Signer, hilt: Signer) -> None:
    middle = Signer.generate()
    root = _delegation(service, middle.did)
    leaf = _delegation(middle, hilt.did, sub=service.did)
    unrelated = _delegation(Signer.generate(), hilt.did)
    chain = proof_chain(
        [leaf, unrelated, root], issuer=hilt.did, subject=service.did, command=CUSTOMER_ADD, now=NOW
    )
    assert chain == [root, leaf]
    req = build_customer_add(
        hilt, service.did, CustomerAdd("did:plc:x", PRODUCT), proofs=[leaf, root], now=NOW
    )
    parsed = decode_request(req.body)
    [inv] = parsed.invocations
    assert inv.prf == (root.cid, leaf.cid)
    validate_invocation(inv, parsed.delegations, now=NOW)


def test_chain_skips_expired_foreign_and_narrower_delegations(
    service: Signer, hilt: Signer
) -> None:
    expired = _delegation(service, hilt.did, exp=NOW)
    other_cmd = _delegation(service, hilt.did, cmd="/customer/remove")
    with pytest.raises(ProofError, match="no unexpired delegation chain"):
        proof_chain(
            [expired, other_cmd],
            issuer=hilt.did,
            subject=service.did,
            command=CUSTOMER_ADD,
            now=NOW,
        )
    broad = _delegation(service, hilt.did, cmd="/")
    assert proof_chain(
        [expired, broad], issuer=hilt.did, subject=service.did, command=CUSTOMER_ADD, now=NOW
    ) == [broad]


def test_a_powerline_cannot_be_the_root(service: Signer, hilt: Signer) -> None:
    powerline = _delegation(service, hilt.did, use_sub=False)
    with pytest.raises(ProofError):
        proof_chain(
            [powerline], issuer=hilt.did, subject=service.did, command=CUSTOMER_ADD, now=NOW
        )


def test_build_refuses_without_a_chain(service: Signer, hilt: Signer) -> None:
    with pytest.raises(ProofError) as caught:
        build_customer_add(hilt, service.did, CustomerAdd("did:plc:x", PRODUCT), now=NOW)
    assert isinstance(caught.value, WorkerError)
    assert caught.value.name == "ProofError"


@pytest.mark.parametrize(
    ("granted", "wanted", "covers"),
    [
        ("/", "/customer/add", True),
        ("/customer", "/customer/add", True),
        ("/customer/add", "/customer/add", True),
        ("/cust", "/customer/add", False),
        ("/customer/add", "/customer", False),
    ],
)
def test_command_covers(granted: str, wanted: str, covers: bool) -> None:
    assert command_covers(granted, wanted) is covers


# --- receipts ----------------------------------------------------------------------------


def _response(signer: Signer, req: SignedRequest, **kw: object) -> bytes:
    receipt = build_receipt(signer, ran=req.task, iat=NOW, **kw)  # type: ignore[arg-type]
    return encode_container([receipt])


def test_ok_receipt_verifies(service: Signer, hilt: Signer) -> None:
    req, _ = _request(service, hilt)
    outcome = verify_response(req, _response(service, req), service_did=service.did)
    assert outcome.ok == {}
    assert outcome.task == req.task
    assert outcome.receipt.ran == req.task


def test_error_receipt_raises_its_name_and_message(service: Signer, hilt: Signer) -> None:
    req, _ = _request(service, hilt)
    body = _response(service, req, error=("CustomerExists", "customer already exists"))
    with pytest.raises(ReceiptError) as caught:
        verify_response(req, body, service_did=service.did)
    assert caught.value.name == "CustomerExists"
    assert caught.value.message == "customer already exists"
    assert str(caught.value) == "CustomerExists: customer already exists"
    assert caught.value.task == req.task


def test_receipt_by_another_key_is_invalid(service: Signer, hilt: Signer) -> None:
    req, _ = _request(service, hilt)
    body = _response(Signer.generate(), req)
    with pytest.raises(InvalidReceipt, match="expected"):
        verify_response(req, body, service_did=service.did)


def test_forged_signature_is_invalid(service: Signer, hilt: Signer) -> None:
    """A receipt claiming the service's DID, but signed by another key."""
    req, _ = _request(service, hilt)
    forger = Signer.generate().with_did(service.did)
    with pytest.raises(InvalidReceipt, match="InvalidSignature"):
        verify_response(req, _response(forger, req), service_did=service.did)


def test_receipt_for_another_task_is_invalid(service: Signer, hilt: Signer) -> None:
    req, _ = _request(service, hilt)
    other, _ = _request(service, hilt)
    with pytest.raises(InvalidReceipt, match="cannot find a receipt"):
        verify_response(req, _response(service, other), service_did=service.did)


def test_undecodable_response_is_invalid(service: Signer, hilt: Signer) -> None:
    req, _ = _request(service, hilt)
    with pytest.raises(InvalidReceipt, match="cannot read the response"):
        verify_response(req, b"\xff\x00garbage", service_did=service.did)


def test_did_web_service_verifies_with_its_key(hilt: Signer) -> None:
    key = Signer.generate()
    service = key.with_did("did:web:upload.example")
    req = build_customer_add(
        hilt,
        service.did,
        CustomerAdd("did:plc:x", PRODUCT),
        proofs=[_delegation(service, hilt.did)],
        now=NOW,
    )
    body = _response(service, req)
    with pytest.raises(InvalidReceipt, match="DIDKeyResolutionError"):
        verify_response(req, body, service_did=service.did)
    resolver = Resolver({service.did: [key.public_key]})
    assert verify_response(req, body, service_did=service.did, resolver=resolver).ok == {}


def test_load_proofs(tmp_path, service: Signer, hilt: Signer) -> None:
    d = _delegation(service, hilt.did)
    for name, header in (("raw", None), ("b64", 0x42)):
        path = tmp_path / name
        path.write_bytes(encode_container([d.raw], header=header))
        assert [p.cid for p in load_proofs(path)] == [d.cid]
    (tmp_path / "empty").write_bytes(encode_container([]))
    with pytest.raises(ProofError, match="holds no delegation"):
        load_proofs(tmp_path / "empty")
    with pytest.raises(ProofError, match="cannot read"):
        load_proofs(tmp_path / "missing")


def test_reply_queue_naming_and_arguments() -> None:
    assert reply_queue_name("ucan.invocations", "hilt-1") == "ucan.invocations.replies.hilt-1"
    assert reply_queue_arguments(60) == {"x-queue-type": "quorum", "x-expires": 60_000}


# --- waiting: only a verifying receipt ends it ---------------------------------------------


class _Reply:
    """What the client's reply consumer is handed (an AMQP delivery), without a broker."""

    def __init__(self, body: bytes, correlation_id: str) -> None:
        self.body = body
        self.correlation_id = correlation_id
        self.acked = False

    async def ack(self) -> None:
        self.acked = True


async def _deliver(client: Client, body: bytes, req: SignedRequest) -> _Reply:
    reply = _Reply(body, str(req.cid))
    await client._on_reply(reply)  # type: ignore[arg-type]
    assert reply.acked
    return reply


def _offline_client(service: Signer, hilt: Signer) -> Client:
    return Client("amqp://guest@127.0.0.1:1/", signer=hilt, service_did=service.did)


async def test_forged_then_genuine_reply_while_waiting(service: Signer, hilt: Signer) -> None:
    req, _ = _request(service, hilt)
    client = _offline_client(service, hilt)
    waiting = asyncio.create_task(client.wait(req, timeout=5))
    await asyncio.sleep(0)
    for forged in (
        _response(Signer.generate().with_did(service.did), req),  # the wrong key
        _response(Signer.generate(), req),  # another issuer
        encode_container([]),  # no receipt
        b"\xffgarbage",
    ):
        await _deliver(client, forged, req)
        await asyncio.sleep(0)
        assert not waiting.done()
    await _deliver(client, _response(service, req), req)
    outcome = await waiting
    assert outcome.ok == {} and outcome.receipt.iss == service.did


async def test_a_verified_error_receipt_ends_the_wait(service: Signer, hilt: Signer) -> None:
    req, _ = _request(service, hilt)
    client = _offline_client(service, hilt)
    waiting = asyncio.create_task(client.wait(req, timeout=5))
    await asyncio.sleep(0)
    await _deliver(client, _response(service, req, error=("MatchError", "no")), req)
    with pytest.raises(ReceiptError, match="MatchError"):
        await waiting


async def test_only_forged_replies_time_out_as_invalid_receipt(
    service: Signer, hilt: Signer
) -> None:
    req, _ = _request(service, hilt)
    client = _offline_client(service, hilt)
    waiting = asyncio.create_task(client.wait(req, timeout=0.3))
    await asyncio.sleep(0)
    for _ in range(5):
        await _deliver(client, _response(Signer.generate().with_did(service.did), req), req)
    with pytest.raises(InvalidReceipt) as caught:
        await waiting
    message = str(caught.value)
    assert "5 response(s) with its correlation id did not verify" in message
    assert message.count("InvalidSignature") == 3  # the first few, named
    with pytest.raises(ReceiptTimeout):  # nothing at all: a timeout, as before
        await client.wait(req, timeout=0.05)


async def test_early_replies_keep_only_what_the_service_signed(
    service: Signer, hilt: Signer
) -> None:
    """Replies that arrive before anyone waits: a forged one is dropped, so neither it nor a
    later forgery can hide the genuine one from wait()."""
    req, _ = _request(service, hilt)
    client = _offline_client(service, hilt)
    await _deliver(client, _response(Signer.generate().with_did(service.did), req), req)
    await _deliver(client, _response(service, req), req)
    await _deliver(client, _response(Signer.generate().with_did(service.did), req), req)
    assert len(client._unclaimed[str(req.cid)]) == 1
    outcome = await client.wait(req, timeout=0.5)
    assert outcome.receipt.iss == service.did and outcome.ok == {}
