"""``/provider/add`` and ``/space/info`` as the client builds them, without a broker: Hilt's
``ProvisionSpace`` reproduced byte for byte from the Go vectors (shared/vectors/ucantone-go),
the Go service's receipts read back, and ``/space/info`` by a space or a delegate."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VECTORS
from worker.client import (
    DEFAULT_LIFETIME,
    PROVIDER_ADD,
    SPACE_INFO,
    Client,
    InvalidReceipt,
    Outcome,
    ProofError,
    Provisioned,
    ReceiptError,
    SpaceInfo,
    build_provider_add,
    build_space_info,
    provider_add_args,
    verify_response,
)
from worker.ucan import (
    Delegation,
    Invocation,
    Resolver,
    Signer,
    build_receipt,
    check_audience,
    decode_request,
    decode_token,
    did_key_public,
    encode_delegation,
    validate_invocation,
)

GO = VECTORS / "ucantone-go"
TENANT_1 = "did:plc:xbfubwxudf3oi4jrc3t7wlaw"
TENANT_2 = "did:plc:6rk72l4hge635a2cdqmq7hz2"
SERVICE_KEY = "did:key:z6MkoGmQXc2j7GuHEYrL9NwWLGFDM58iXXwRRKMjhY4Mc1Sb"
SERVICE_WEB = "did:web:upload.example"
SPACE_1 = "did:key:z6MkvuWMaELgHeTh83vFWL4uerFcmxNfZ2JAYy2kMkCATpQt"
#: the subscription of space-1 in the Go receipts (sprue's NewSubscriptionID)
SUBSCRIPTION_1 = "bafyreic7weksudmo75ilb3hybsapo7fqjspzbg6ewdazcvpa5mzfs2td4m"
NOW = 1_800_000_000


@cache
def _index() -> dict[str, dict[str, Any]]:
    return {e["file"]: e for e in json.loads((GO / "index.json").read_text())["files"]}


@cache
def _keys() -> dict[str, Signer]:
    doc = json.loads((GO / "keys.json").read_text())
    return {k["label"]: Signer.parse(k["private_key_format"]) for k in doc["secp256k1"]} | {
        k["label"]: Signer.parse(k["private_key_format"]) for k in doc["ed25519"]
    }


#: the Go account of each case: how Hilt's ``auth.TenantIssuer`` (or a plain key) signs
ACCOUNTS = {
    "provider_add.plc_tenant.svc_didkey": ("vector-tenant-1", TENANT_1),
    "provider_add.plc_tenant.svc_didweb": ("vector-tenant-1", TENANT_1),
    "provider_add.didkey_secp256k1_issuer.svc_didkey": ("vector-secp-issuer", None),
    "provider_add.plc_unregistered.svc_didkey": ("vector-tenant-2", TENANT_2),
}


@pytest.mark.parametrize("case", sorted(ACCOUNTS))
def test_provider_add_is_hilts_byte_for_byte(vectors: Path, case: str) -> None:
    """Given the vector's nonce and exp, the client signs exactly the invocation and the
    request body ucantone and libforge made: args in cbor-gen's order (the vector's
    ``info.args_hex``), iss = sub = the account, aud = the service, no proofs, no iat."""
    entry = _index()[f"{case}.invocation.cbor"]
    info = entry["info"]
    label, plc = ACCOUNTS[case]
    signer = _keys()[label] if plc is None else _keys()[label].with_did(plc)
    [space_label] = [k for k in entry["keys"] if k.startswith("vector-space-")]
    request = build_provider_add(
        signer,
        info["aud"],
        _keys()[space_label].did,
        nonce=bytes.fromhex(info["nonce_hex"]),
        now=info["exp"] - DEFAULT_LIFETIME,
    )
    assert request.invocation == (GO / f"{case}.invocation.cbor").read_bytes()
    assert request.body == (GO / f"{case}.request.cbor").read_bytes()
    cids = _index()[f"{case}.request.cbor"]["cids"]
    assert (str(request.cid), str(request.task)) == (cids["invocation"], cids["task"])
    assert request.exp == info["exp"] == 1_900_000_000
    inv = decode_token(request.invocation)
    assert isinstance(inv, Invocation)
    assert inv.args_raw.hex() == info["args_hex"]
    assert (inv.iss, inv.sub, inv.aud, inv.cmd) == (
        info["iss"],
        info["sub"],
        info["aud"],
        PROVIDER_ADD,
    )
    assert inv.prf == () and inv.iat is None and len(inv.nonce) == 16


def test_provider_add_args_put_consumer_first() -> None:
    """As cbor-gen writes libforge's AddArguments: its map keys in canonical order (length,
    then bytes), so consumer before provider, though the struct declares provider first."""
    raw = provider_add_args("did:key:zSpace", "did:web:svc")
    assert raw == bytes.fromhex("a2") + b"\x68consumer\x6edid:key:zSpace\x68provider\x6bdid:web:svc"
    with pytest.raises(TypeError, match="consumer must be text"):
        provider_add_args(None, "did:web:svc")  # type: ignore[arg-type]


def test_provider_defaults_to_the_service() -> None:
    account = Signer.generate("secp256k1").with_did(TENANT_1)
    request = build_provider_add(account, SERVICE_WEB, SPACE_1, now=NOW)
    inv = decode_token(request.invocation)
    assert isinstance(inv, Invocation)
    assert inv.args == {"consumer": SPACE_1, "provider": SERVICE_WEB}
    assert inv.exp == NOW + DEFAULT_LIFETIME
    other = build_provider_add(account, SERVICE_WEB, SPACE_1, "did:web:elsewhere", now=NOW)
    assert decode_token(other.invocation).args["provider"] == "did:web:elsewhere"  # type: ignore[union-attr]
    # a fresh nonce each time: two provisions are two tasks
    again = build_provider_add(account, SERVICE_WEB, SPACE_1, now=NOW)
    assert again.task != request.task


@pytest.mark.parametrize(
    ("receipt", "service"),
    [
        ("provider_add.plc_tenant.svc_didkey.receipt_ok", SERVICE_KEY),
        ("provider_add.plc_tenant.svc_didweb.receipt_ok", SERVICE_WEB),
    ],
)
def test_the_go_services_ok_receipt_gives_the_subscription(
    vectors: Path, receipt: str, service: str
) -> None:
    """The response body ucantone's server returned verifies for the reproduced request,
    and its {id} is the subscription (a did:web service: verified with its did:key)."""
    case = receipt.rsplit(".", 1)[0]
    info = _index()[f"{case}.invocation.cbor"]["info"]
    signer = _keys()["vector-tenant-1"].with_did(TENANT_1)
    request = build_provider_add(
        signer,
        service,
        SPACE_1,
        nonce=bytes.fromhex(info["nonce_hex"]),
        now=info["exp"] - DEFAULT_LIFETIME,
    )
    resolver = Resolver({SERVICE_WEB: [did_key_public(SERVICE_KEY)]})
    body = (GO / f"{receipt}.response.cbor").read_bytes()
    outcome = verify_response(request, body, service_did=service, resolver=resolver)
    provisioned = Provisioned.of(outcome)
    assert provisioned.subscription == SUBSCRIPTION_1
    assert provisioned.task == request.task and provisioned.receipt.iss == service
    # a receipt is only the service's: another service DID does not verify it
    with pytest.raises(InvalidReceipt, match="expected"):
        verify_response(request, body, service_did="did:web:other.example", resolver=resolver)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("AccountPlanMissing", "account does not have an active payment plan"),
        ("ConsumerExists", "adding consumer: consumer already exists"),
        ("ProviderNotAllowed", "provider not allowed"),
    ],
)
def test_the_go_services_error_receipts_raise_with_sprues_names(
    vectors: Path, name: str, message: str
) -> None:
    case = "provider_add.plc_tenant.svc_didkey"
    info = _index()[f"{case}.invocation.cbor"]["info"]
    request = build_provider_add(
        _keys()["vector-tenant-1"].with_did(TENANT_1),
        SERVICE_KEY,
        SPACE_1,
        nonce=bytes.fromhex(info["nonce_hex"]),
        now=info["exp"] - DEFAULT_LIFETIME,
    )
    body = (GO / f"{case}.receipt_err_{name}.response.cbor").read_bytes()
    with pytest.raises(ReceiptError) as caught:
        verify_response(request, body, service_did=SERVICE_KEY)
    assert (caught.value.name, caught.value.message) == (name, message)


def test_provisioned_needs_a_subscription_id() -> None:
    service = Signer.generate()
    request = build_provider_add(Signer.generate("secp256k1"), service.did, SPACE_1, now=NOW)
    for ok, good in (({"id": "bafy-sub"}, True), ({}, False), ({"id": 7}, False)):
        body = _response(service, request.task, ok)
        outcome = verify_response(request, body, service_did=service.did)
        if good:
            assert Provisioned.of(outcome).subscription == "bafy-sub"
        else:
            with pytest.raises(InvalidReceipt, match="no subscription id"):
                Provisioned.of(outcome)


def _response(service: Signer, ran: Any, ok: object) -> bytes:
    from worker.ucan import encode_container

    return encode_container([build_receipt(service, ran=ran, ok=ok, iat=NOW)])


# --- /space/info -------------------------------------------------------------------------


def test_space_info_by_the_space_itself() -> None:
    """sub = iss = the space, aud = the service, args {}, no proofs; ucantone's validator
    accepts it and the dispatcher's audience check passes."""
    space, service = Signer.generate(), Signer.generate()
    request = build_space_info(space, service.did, space.did, now=NOW)
    [inv] = decode_request(request.body).invocations
    assert (inv.iss, inv.sub, inv.aud, inv.cmd) == (space.did, space.did, service.did, SPACE_INFO)
    assert inv.args_raw == b"\xa0" and inv.args == {} and inv.prf == ()
    validate_invocation(inv, {}, now=NOW)
    check_audience(inv, service.did)


def _delegate(issuer: Signer, audience: str, *, sub: str, cmd: str = SPACE_INFO) -> Delegation:
    token = decode_token(encode_delegation(issuer, aud=audience, sub=sub, cmd=cmd, exp=None))
    assert isinstance(token, Delegation)
    return token


def test_space_info_by_a_delegate_carries_the_chain_root_first() -> None:
    space, service, agent, hilt = (Signer.generate() for _ in range(4))
    root = _delegate(space, agent.did, sub=space.did, cmd="/space")
    leaf = _delegate(agent, hilt.did, sub=space.did)
    unrelated = _delegate(service, hilt.did, sub=service.did, cmd="/customer/add")
    request = build_space_info(
        hilt, service.did, space.did, proofs=[unrelated, leaf, root], now=NOW
    )
    parsed = decode_request(request.body)
    [inv] = parsed.invocations
    assert inv.prf == (root.cid, leaf.cid)
    assert set(parsed.delegations) == {root.cid, leaf.cid}
    validate_invocation(inv, parsed.delegations, now=NOW)
    with pytest.raises(ProofError, match="/space/info"):
        build_space_info(hilt, service.did, space.did, proofs=[unrelated], now=NOW)


def test_space_info_outcome_lists_the_providers() -> None:
    space, service = Signer.generate(), Signer.generate()
    request = build_space_info(space, service.did, space.did, now=NOW)
    ok = {"providers": [service.did]}
    outcome = verify_response(
        request, _response(service, request.task, ok), service_did=service.did
    )
    assert SpaceInfo.of(outcome).providers == (service.did,)
    bad = Outcome(outcome.task, outcome.receipt, {"providers": "did:web:x"})
    with pytest.raises(InvalidReceipt, match="no provider list"):
        SpaceInfo.of(bad)
    unknown = build_receipt(
        service,
        ran=request.task,
        error=("UnknownSpace", f"space {space.did} has no provider"),
        iat=NOW,
    )
    from worker.ucan import encode_container

    with pytest.raises(ReceiptError, match="UnknownSpace"):
        verify_response(request, encode_container([unknown]), service_did=service.did)


def test_client_builds_with_its_identity_and_proofs() -> None:
    """Client.build_provision / build_space_info: no broker is touched to build."""
    account = Signer.generate("secp256k1").with_did(TENANT_1)
    service = Signer.generate()
    client = Client("amqp://guest:guest@127.0.0.1:1/", signer=account, service_did=service.did)
    provision = decode_token(client.build_provision(SPACE_1).invocation)
    assert isinstance(provision, Invocation)
    assert (provision.iss, provision.sub, provision.aud) == (TENANT_1, TENANT_1, service.did)
    assert provision.header.hex() == "3401ec01e7011271"  # secp256k1 over DAG-CBOR
    with pytest.raises(ProofError):
        client.build_space_info(SPACE_1)  # the account holds no delegation from the space
