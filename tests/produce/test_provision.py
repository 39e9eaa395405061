"""``provision``, ``space-info`` and the client's ``provision`` / ``space_info`` against a real
worker, broker and database, the worker resolving did:plc accounts from a development
directory (``plc serve``, in process, over real HTTP) where ``plc create`` registered them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from tests.support.worker import Requester, delegation
from worker import cli
from worker.client import Client, Provisioned, ReceiptError, load_proofs, reply_queue_name
from worker.config import Settings
from worker.produce.plc import Server, Store, serving
from worker.service.app import App, running
from worker.ucan import (
    CID,
    Delegation,
    Receipt,
    Signer,
    create_genesis_op,
    decode_token,
    encode,
    encode_container,
    encode_delegation,
)

pytestmark = pytest.mark.integration

PRODUCT = "did:web:hilt.fil-forge.com"


def subscription_of(space: str) -> str:
    """sprue's NewSubscriptionID: the CID of DAG-CBOR {"consumer": space}."""
    return str(CID.dag_cbor(encode({"consumer": space})))


@dataclass
class Stack:
    """A worker resolving did:plc from a development directory, and Hilt beside it."""

    app: App
    settings: Settings
    service: Signer
    hilt: Signer
    directory: Server
    tmp: Path

    def key_file(self, signer: Signer, name: str) -> str:
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps({"did": signer.key_did, "key": signer.export()}))
        return str(path)

    def tenant(self) -> Signer:
        """A tenant as Hilt makes one: a secp256k1 key and its did:plc, registered at the
        directory (directly; ``plc create`` is tested on its own)."""
        key = Signer.generate("secp256k1")
        op = create_genesis_op(key)
        self.directory.store.add(op.did, op)
        return key.with_did(op.did)

    async def register(self, customer: str) -> None:
        """Hilt's /customer/add for ``customer`` (its payment plan: the customer row)."""
        proof = decode_token(delegation(self.service, self.hilt))
        assert isinstance(proof, Delegation)
        async with Client(
            self.settings.amqp_url,
            signer=self.hilt,
            service_did=self.service.did,
            proofs=[proof],
            queue=self.settings.queue,
            timeout=20,
        ) as client:
            assert (await client.add_customer(customer, PRODUCT)).ok == {}
            await client.delete_reply_queue()

    def argv(self, command: str, *extra: str) -> list[str]:
        return [command, *extra, "--service", self.service.did, "--queue", self.settings.queue]


@pytest.fixture(autouse=True)
def _broker_in_the_environment(monkeypatch: pytest.MonkeyPatch, amqp_url: str) -> None:
    """The commands take the broker URL (it has a password) from the environment."""
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", amqp_url)


@pytest.fixture(name="stack")
async def _stack(
    worker_settings: Settings,
    service: Signer,
    agent: Signer,
    amqp: aio_pika.abc.AbstractRobustConnection,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    async with serving(Store(), port=0) as directory:
        settings = dataclasses.replace(worker_settings, plc_directory=directory.url)
        async with running(settings) as app:
            yield Stack(app, settings, service, agent, directory, tmp_path)
    ch = await amqp.channel()
    await ch.queue_delete(reply_queue_name(worker_settings.queue, "cli"))
    await ch.close()


async def _rows(database_url: str, space: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT c.subscription, c.provider, c.consumer, c.customer, c.cause,
                      s.customer AS s_customer, s.cause AS s_cause
               FROM consumer c JOIN subscription s USING (subscription, provider)
               WHERE c.consumer = $1""",
            space,
        )
        return [dict(r) for r in rows]
    finally:
        await conn.close()


def _json_lines(out: str) -> list[dict[str, Any]]:
    """The command's JSON document among the in-process worker's log lines (same stdout)."""
    docs = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    return [d for d in docs if "event" not in d and "task" in d]


async def test_provision_wait_prints_the_subscription(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    """The quickstart's path: plc create registers the tenant, Hilt registers it as a
    customer, provision --wait provisions a space and prints its subscription; the rows are
    sprue's, cause = the task."""
    key = Signer.generate("secp256k1")
    key_file = stack.key_file(key, "tenant")
    create = ["plc", "create", "--key", key_file, "--directory", stack.directory.url, "--json"]
    assert await asyncio.to_thread(cli.main, create) == cli.EXIT_OK
    [created] = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if '"did"' in ln]
    tenant = created["did"]
    await stack.register(tenant)
    space = Signer.generate().did
    receipt_file = stack.tmp / "receipt.bin"
    argv = stack.argv("provision", "--key", key_file, "--as", tenant, "--space", space)
    argv += ["--wait", "--json", "--receipt", str(receipt_file), "--client-id", "cli"]
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_OK
    [doc] = _json_lines(capsys.readouterr().out)
    assert doc["ok"] is True and doc["error"] is None
    assert doc["subscription"] == subscription_of(space)
    assert (doc["account"], doc["space"], doc["provider"]) == (tenant, space, stack.service.did)
    receipt = decode_token(receipt_file.read_bytes())
    assert isinstance(receipt, Receipt) and str(receipt.ran) == doc["task"]
    assert receipt.ok == {"id": doc["subscription"]} and receipt.iss == stack.service.did
    assert await _rows(stack.settings.database_url, space) == [
        {
            "subscription": doc["subscription"],
            "provider": stack.service.did,
            "consumer": space,
            "customer": tenant,
            "cause": doc["task"],
            "s_customer": tenant,
            "s_cause": doc["task"],
        }
    ]
    # the text form names the subscription
    other = Signer.generate().did
    argv = stack.argv("provision", "--key", key_file, "--as", tenant, "--space", other, "--wait")
    assert await asyncio.to_thread(cli.main, [*argv, "--client-id", "cli"]) == cli.EXIT_OK
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ok: ")]
    assert lines and f"subscription {subscription_of(other)}" in lines[0]


async def test_provision_without_a_customer_row_is_account_plan_missing(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = stack.tenant()
    key_file = stack.key_file(tenant, "tenant")
    space = Signer.generate().did
    argv = stack.argv("provision", "--key", key_file, "--as", tenant.did, "--space", space)
    argv += ["--wait", "--client-id", "cli"]
    assert await asyncio.to_thread(cli.main, [*argv, "--json"]) == cli.EXIT_CHECK_FAILED
    [doc] = _json_lines(capsys.readouterr().out)
    assert doc["ok"] is False and doc["subscription"] is None
    assert doc["error"] == {
        "name": "AccountPlanMissing",
        "message": "account does not have an active payment plan",
    }
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_CHECK_FAILED
    assert "error AccountPlanMissing: account does not have" in capsys.readouterr().err
    assert await _rows(stack.settings.database_url, space) == []


async def test_a_did_key_account_is_invalid_account(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --as the key signs as its did:key: a valid signature, but not an account
    (sprue: did:plc or did:mailto), even when it has a customer row."""
    key = Signer.generate("secp256k1")
    await stack.register(key.did)
    argv = stack.argv(
        "provision", "--key", stack.key_file(key, "k"), "--space", Signer.generate().did
    )
    argv += ["--wait", "--json", "--client-id", "cli"]
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_CHECK_FAILED
    [doc] = _json_lines(capsys.readouterr().out)
    assert doc["account"] == key.did and doc["error"]["name"] == "InvalidAccount"
    assert doc["error"]["message"] == (
        f"invalid account DID: unsupported DID method in {key.did}: expected plc"
    )


async def test_provision_out_is_valid_and_executes_when_published_later(
    stack: Stack, requester: Requester, capsys: pytest.CaptureFixture[str]
) -> None:
    """provision --out writes the signed body instead of publishing it; inspect (with the
    directory for the did:plc issuer) finds it valid for the service; published later, the
    worker provisions the space with it."""
    tenant = stack.tenant()
    await stack.register(tenant.did)
    space = Signer.generate().did
    out = stack.tmp / "provision.cbor"
    argv = stack.argv("provision", "--key", stack.key_file(tenant, "t"), "--as", tenant.did)
    argv += ["--space", space, "--expires-in", "3600", "--out", str(out), "--json"]
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_OK
    [doc] = _json_lines(capsys.readouterr().out)
    assert doc["out"] == str(out) and doc["bytes"] == out.stat().st_size
    assert doc["ok"] is None and doc["subscription"] is None
    assert await _rows(stack.settings.database_url, space) == []  # nothing was sent
    # --wait and --receipt need the broker: refused with --out
    assert await asyncio.to_thread(cli.main, [*argv, "--wait"]) == cli.EXIT_USAGE

    check = ["inspect", str(out), "--service-did", stack.service.did, "--json"]
    check += ["--plc-directory", stack.directory.url]
    assert await asyncio.to_thread(cli.main, check) == cli.EXIT_OK
    [report] = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if '"tokens"' in ln]
    [inv] = report["invocations"]
    assert inv["valid"] is True and inv["task"] == doc["task"] and inv["iss"] == tenant.did

    _, [receipt] = await requester.call(out.read_bytes())
    assert receipt.error is None and receipt.ok == {"id": subscription_of(space)}
    assert str(receipt.ran) == doc["task"]
    [row] = await _rows(stack.settings.database_url, space)
    assert row["customer"] == tenant.did and row["cause"] == doc["task"]


async def test_space_info_lists_the_provider(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    """space-info by the space's own key, and by a delegate holding a chain from the space;
    a space with no provider is UnknownSpace."""
    tenant = stack.tenant()
    await stack.register(tenant.did)
    space = Signer.generate()
    async with Client(
        stack.settings.amqp_url,
        signer=tenant,
        service_did=stack.service.did,
        queue=stack.settings.queue,
        timeout=20,
    ) as client:
        await client.provision(space.did)
        await client.delete_reply_queue()
    space_key = stack.key_file(space, "space")
    argv = stack.argv("space-info", "--key", space_key, "--space", space.did, "--client-id", "cli")
    assert await asyncio.to_thread(cli.main, [*argv, "--json"]) == cli.EXIT_OK
    [doc] = _json_lines(capsys.readouterr().out)
    assert doc["providers"] == [stack.service.did] and doc["ok"] is True
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_OK
    assert capsys.readouterr().out.splitlines()[-1] == stack.service.did

    # a delegate: the space delegates /space/info to it
    delegate = Signer.generate()
    proof = stack.tmp / "space-proof.ctn"
    token = encode_delegation(space, aud=delegate.did, sub=space.did, cmd="/space/info", exp=None)
    proof.write_bytes(encode_container([token]))
    argv = stack.argv("space-info", "--key", stack.key_file(delegate, "delegate"))
    argv += ["--proof", str(proof), "--space", space.did, "--json", "--client-id", "cli"]
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_OK
    [doc] = _json_lines(capsys.readouterr().out)
    assert doc["providers"] == [stack.service.did]
    # without the proof the delegate cannot ask at all (refused before connecting)
    no_proof = stack.argv("space-info", "--key", stack.key_file(delegate, "delegate"))
    assert await asyncio.to_thread(cli.main, [*no_proof, "--space", space.did]) == cli.EXIT_USAGE
    assert "delegation" in capsys.readouterr().err

    unknown = Signer.generate()
    argv = stack.argv("space-info", "--key", stack.key_file(unknown, "u"), "--space", unknown.did)
    assert await asyncio.to_thread(cli.main, [*argv, "--json", "--client-id", "cli"]) == 1
    [doc] = _json_lines(capsys.readouterr().out)
    assert doc["providers"] is None and doc["error"]["name"] == "UnknownSpace"


async def test_the_client_api(stack: Stack) -> None:
    """Client.provision returns the verified subscription, a second task for the same space
    is sprue's ConsumerExists, an unpublished did:plc is ucantone's UnknownError (404), and
    Client.space_info lists the provider."""
    tenant = stack.tenant()
    await stack.register(tenant.did)
    space = Signer.generate()
    async with Client(
        stack.settings.amqp_url,
        signer=tenant,
        service_did=stack.service.did,
        queue=stack.settings.queue,
        timeout=20,
    ) as client:
        provisioned = await client.provision(space.did)
        assert isinstance(provisioned, Provisioned)
        assert provisioned.subscription == subscription_of(space.did)
        assert provisioned.ok == {"id": provisioned.subscription}
        with pytest.raises(ReceiptError) as caught:
            await client.provision(space.did)
        assert caught.value.name == "ConsumerExists"
        await client.delete_reply_queue()
    unpublished = Signer.generate("secp256k1")
    stranger = unpublished.with_did(create_genesis_op(unpublished).did)  # never POSTed
    async with Client(
        stack.settings.amqp_url,
        signer=stranger,
        service_did=stack.service.did,
        queue=stack.settings.queue,
        timeout=20,
    ) as client:
        with pytest.raises(ReceiptError) as caught:
            await client.provision(Signer.generate().did)
        assert caught.value.name == "UnknownError"
        assert caught.value.message.startswith("unexpected status: 404")
        await client.delete_reply_queue()
    # space_info by a delegate of the space, with the proof loaded as a file
    proof = stack.tmp / "proof.ctn"
    token = encode_delegation(space, aud=stack.hilt.did, sub=space.did, cmd="/space", exp=None)
    proof.write_bytes(encode_container([token]))
    async with Client(
        stack.settings.amqp_url,
        signer=stack.hilt,
        service_did=stack.service.did,
        proofs=load_proofs(proof),
        queue=stack.settings.queue,
        timeout=20,
    ) as client:
        info = await client.space_info(space.did)
        await client.delete_reply_queue()
    assert info.providers == (stack.service.did,)
