"""The producer client and the ``enqueue`` command against a real worker, broker and database."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from tests.support.worker import Requester, delegation
from worker import cli
from worker.client import (
    Client,
    CustomerAdd,
    InvalidReceipt,
    PublishFailed,
    ReceiptError,
    ReceiptTimeout,
    SignedRequest,
    reply_queue_arguments,
    reply_queue_name,
)
from worker.config import Secret, Settings
from worker.service.app import App, running
from worker.service.broker import queue_declarations
from worker.ucan import (
    CID,
    Delegation,
    Receipt,
    Signer,
    build_receipt,
    customer_add_args,
    decode_request,
    decode_token,
    encode_container,
    encode_delegation,
    encode_invocation,
    task_cid,
)

pytestmark = pytest.mark.integration

PRODUCT = "did:web:hilt.example"


@dataclass
class Stack:
    """A running worker and the identities around it."""

    settings: Settings
    service: Signer
    hilt: Signer
    proof: Delegation
    proof_file: Path
    #: ``--key`` for Hilt's key: a file, as the command takes keys
    hilt_key: str


def _delegation(service: Signer, audience: str, pol: list[object] | None = None) -> Delegation:
    token = encode_delegation(
        service, aud=audience, sub=service.did, cmd="/customer/add", pol=pol or [], exp=None
    )
    delegation = decode_token(token)
    assert isinstance(delegation, Delegation)
    return delegation


@pytest.fixture(autouse=True)
def _broker_in_the_environment(monkeypatch: pytest.MonkeyPatch, amqp_url: str) -> None:
    """The commands take the broker URL (it has a password) from the environment."""
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", amqp_url)


@pytest.fixture(name="stack")
async def _stack(
    amqp_url: str,
    database_url: str,
    queue_name: str,
    amqp: aio_pika.abc.AbstractRobustConnection,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    service, hilt = Signer.generate(), Signer.generate()
    # Hilt may register only products under did:web:hilt.example
    proof = _delegation(service, hilt.did, [["like", ".product", "did:web:hilt.*"]])
    proof_file = tmp_path / "proof.ctn"
    proof_file.write_bytes(encode_container([proof.raw]))
    hilt_key = tmp_path / "hilt.key"
    hilt_key.write_text(hilt.export())
    settings = Settings(
        amqp_url=amqp_url,
        database_url=database_url,
        service_key=Secret(service.export()),
        queue=queue_name,
        receipt_queue=f"{queue_name}.receipts",
        http_port=0,
        log_format="json",
    )
    async with running(settings):
        yield Stack(settings, service, hilt, proof, proof_file, f"@{hilt_key}")
    # the CLI runs' reply queue (--client-id cli) would expire by itself; remove it now
    ch = await amqp.channel()
    await ch.queue_delete(reply_queue_name(queue_name, "cli"))
    await ch.close()


@pytest.fixture(name="client")
async def _client(stack: Stack) -> AsyncIterator[Client]:
    async with Client(
        stack.settings.amqp_url,
        signer=stack.hilt,
        service_did=stack.service.did,
        proofs=[stack.proof],
        queue=stack.settings.queue,
        timeout=20,
    ) as client:
        yield client
        await client.delete_reply_queue()


async def _customer(database_url: str, customer: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(database_url)
    try:
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT customer, product, details, external_account FROM customer WHERE customer = $1",
            customer,
        )
        return row
    finally:
        await conn.close()


async def test_round_trip_ok(stack: Stack, client: Client) -> None:
    outcome = await client.add_customer(
        "did:plc:roundtrip", PRODUCT, {"region": "us-east-1", "external_id": "c-1"}, "stripe:cus_1"
    )
    assert outcome.ok == {}
    assert outcome.receipt.iss == stack.service.did
    assert outcome.receipt.aud is None
    row = await _customer(stack.settings.database_url, "did:plc:roundtrip")
    assert row is not None
    assert row["product"] == PRODUCT
    assert json.loads(row["details"]) == {"region": "us-east-1", "external_id": "c-1"}
    assert row["external_account"] == "stripe:cus_1"


async def test_error_receipt_raises_with_its_name_and_message(stack: Stack, client: Client) -> None:
    with pytest.raises(ReceiptError) as caught:
        await client.add_customer("did:plc:refused", "did:web:other.example")
    assert caught.value.name == "MatchError"
    assert ".product" in caught.value.message
    assert caught.value.receipt.ran == caught.value.task
    assert await _customer(stack.settings.database_url, "did:plc:refused") is None


async def test_without_proof_the_service_refuses(stack: Stack, client: Client) -> None:
    """Signed by hand: the client itself refuses to build an invocation it cannot prove."""
    args = customer_add_args("did:plc:noproof", PRODUCT, {})
    nonce = bytes(range(16))
    token = encode_invocation(
        stack.hilt,
        sub=stack.service.did,
        aud=stack.service.did,
        cmd="/customer/add",
        args_raw=args,
        exp=int(time.time()) + 300,
        nonce=nonce,
    )
    request = SignedRequest(
        invocation=token,
        cid=CID.dag_cbor(token),
        task=task_cid("/customer/add", stack.service.did, args, nonce),
        body=encode_container([token]),
        exp=None,
    )
    with pytest.raises(ReceiptError) as caught:
        await client.call(request)
    assert caught.value.name == "InvalidClaim"


async def test_resend_of_the_same_invocation_gets_the_same_receipt(
    stack: Stack, client: Client
) -> None:
    request = client.build(CustomerAdd("did:plc:twice", PRODUCT, {"region": "eu"}))
    first = await client.call(request)
    again = await client.call(request)
    assert again.receipt.raw == first.receipt.raw
    # another client (another reply queue) resending the same bytes gets them too
    async with Client(
        stack.settings.amqp_url,
        signer=stack.hilt,
        service_did=stack.service.did,
        queue=stack.settings.queue,
        timeout=20,
    ) as other:
        third = await other.call(request)
        await other.delete_reply_queue()
    assert third.receipt.raw == first.receipt.raw


async def test_unroutable_publish_fails(amqp_url: str, queue_name: str) -> None:
    hilt = Signer.generate()
    async with Client(
        amqp_url, signer=hilt, service_did=hilt.did, queue=f"{queue_name}.nowhere"
    ) as client:
        request = client.build(CustomerAdd("did:plc:x", PRODUCT))
        with pytest.raises(PublishFailed, match="no such queue"):
            await client.publish(request)
        await client.delete_reply_queue()


async def test_timeout_then_resend_gets_the_receipt(
    amqp_url: str,
    database_url: str,
    queue_name: str,
    amqp: aio_pika.abc.AbstractRobustConnection,
) -> None:
    """No worker yet: the first wait times out; the worker starts; the resend is answered."""
    service = Signer.generate()
    settings = Settings(
        amqp_url=amqp_url,
        database_url=database_url,
        service_key=Secret(service.export()),
        queue=queue_name,
        receipt_queue=f"{queue_name}.receipts",
        http_port=0,
        log_format="json",
    )
    # declare the inbox as the worker will, so the publish is routable before it runs
    ch = await amqp.channel()
    from worker.amqp.topology import inbox_arguments

    await ch.declare_queue(queue_name, durable=True, arguments=inbox_arguments(queue_name))
    await ch.close()
    async with Client(amqp_url, signer=service, service_did=service.did, queue=queue_name) as c:
        request = c.build(CustomerAdd("did:plc:late", PRODUCT))
        with pytest.raises(ReceiptTimeout):
            await c.call(request, timeout=0.5)
        async with running(settings):
            outcome = await c.call(request, timeout=20)
        await c.delete_reply_queue()
    assert outcome.task == request.task


async def test_garbage_reply_is_an_invalid_receipt(
    amqp_url: str, queue_name: str, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    """A response that is not a receipt for the task does not end the wait; when nothing
    better comes, the timeout raises InvalidReceipt naming it, not Timeout."""
    ch = await amqp.channel()
    inbox = await ch.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})

    async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert message.reply_to is not None
        await ch.default_exchange.publish(
            aio_pika.Message(encode_container([]), correlation_id=message.correlation_id),
            routing_key=message.reply_to,
        )
        await message.ack()

    await inbox.consume(answer)
    hilt = Signer.generate()
    async with Client(amqp_url, signer=hilt, service_did=hilt.did, queue=queue_name) as client:
        with pytest.raises(InvalidReceipt, match=r"1 response.*cannot find a receipt"):
            await client.add_customer("did:plc:x", PRODUCT, timeout=1)
        await client.delete_reply_queue()
    await ch.close()


async def test_reply_queue_is_durable_quorum(
    amqp_url: str, queue_name: str, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    hilt = Signer.generate()
    async with Client(
        amqp_url, signer=hilt, service_did=hilt.did, queue=queue_name, client_id="fixed"
    ) as client:
        assert client.reply_queue == f"{queue_name}.replies.fixed"
    # it outlives the client, and redeclaring it with the same arguments succeeds
    ch = await amqp.channel()
    q = await ch.declare_queue(
        client.reply_queue, durable=True, arguments=reply_queue_arguments(), passive=False
    )
    await q.delete(if_unused=False, if_empty=False)
    await ch.close()


async def test_bulk_enqueue_of_1000_from_a_file(stack: Stack, tmp_path: Path) -> None:
    n = 1000
    source = tmp_path / "registrations.ndjson"
    with source.open("w") as f:
        for i in range(n):
            doc = {
                "customer": f"did:plc:bulk{i:04d}",
                "product": PRODUCT,
                "details": {"region": "eu-west-1", "external_id": f"console-{i}"},
            }
            if i % 10 == 0:
                doc["external_account"] = f"stripe:cus_{i}"
            f.write(json.dumps(doc) + "\n")
    results = tmp_path / "results.ndjson"
    argv = [
        "enqueue",
        "--key",
        stack.hilt_key,
        "--proof",
        str(stack.proof_file),
        "--service",
        stack.service.did,
        "--from",
        str(source),
        "--results",
        str(results),
        "--concurrency",
        "64",
        "--client-id",
        "cli",
        "--queue",
        stack.settings.queue,
    ]
    started = time.monotonic()
    # the command runs its own event loop, so it runs in a thread beside the worker's
    code = await asyncio.to_thread(cli.main, argv)
    elapsed = time.monotonic() - started
    assert code == cli.EXIT_OK
    outcomes = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(outcomes) == n
    assert sorted(o["line"] for o in outcomes) == list(range(1, n + 1))
    assert all(o["ok"] and o["error"] is None for o in outcomes)
    assert len({o["task"] for o in outcomes}) == n
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM customer WHERE customer LIKE 'did:plc:bulk%'"
        )
        sample = await conn.fetchrow(
            "SELECT details, external_account FROM customer WHERE customer = 'did:plc:bulk0010'"
        )
    finally:
        await conn.close()
    assert count == n
    assert json.loads(sample["details"]) == {"region": "eu-west-1", "external_id": "console-10"}
    assert sample["external_account"] == "stripe:cus_10"
    print(f"bulk enqueue of {n}: {elapsed:.1f} s")


async def test_bulk_records_every_failure_and_goes_on(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "mixed.csv"
    source.write_text(
        "customer,product,external_account,detail.region\n"
        f"did:plc:good1,{PRODUCT},,eu\n"
        "not-a-did,did:web:x.example,,eu\n"
        "did:plc:refused,did:web:other.example,,eu\n"
        f"did:plc:good2,{PRODUCT},acct-2,\n"
    )
    results = tmp_path / "results.ndjson"
    code = await asyncio.to_thread(
        cli.main,
        [
            "enqueue",
            "--key",
            stack.hilt_key,
            "--proof",
            str(stack.proof_file),
            "--service",
            stack.service.did,
            "--from",
            str(source),
            "--results",
            str(results),
            "--client-id",
            "cli",
            "--queue",
            stack.settings.queue,
        ],
    )
    assert code == cli.EXIT_CHECK_FAILED
    by_line = {o["line"]: o for o in map(json.loads, results.read_text().splitlines())}
    assert set(by_line) == {2, 3, 4, 5}
    assert by_line[2]["ok"] and by_line[5]["ok"]
    assert by_line[3]["error"]["name"] == "InvalidInput" and by_line[3]["task"] is None
    assert by_line[4]["error"]["name"] == "MatchError" and by_line[4]["task"]
    row = await _customer(stack.settings.database_url, "did:plc:good2")
    assert row is not None and row["external_account"] == "acct-2"


async def test_single_enqueue_wait_json(
    stack: Stack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the broker URL (with its password) from a file, the other way besides the environment
    monkeypatch.delenv("FORGE_WORKER_AMQP_URL")
    url_file = tmp_path / "amqp.url"
    url_file.write_text(stack.settings.amqp_url + "\n")
    code = await asyncio.to_thread(
        cli.main,
        [
            "enqueue",
            "--key",
            stack.hilt_key,
            "--proof",
            str(stack.proof_file),
            "--service",
            stack.service.did,
            "--customer",
            "did:plc:single",
            "--product",
            PRODUCT,
            "--detail",
            "region=us-east-1",
            "--wait",
            "--json",
            "--receipt",
            str(tmp_path / "receipt.bin"),
            "--client-id",
            "cli",
            "--amqp-url",
            f"@{url_file}",
            "--queue",
            stack.settings.queue,
        ],
    )
    assert code == cli.EXIT_OK
    out = capsys.readouterr().out
    # the in-process worker logs to the same stdout: the command's document is the JSON line
    [doc] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert doc["ok"] is True and doc["error"] is None and doc["task"].startswith("bafy")
    assert stack.hilt.export() not in out
    receipt = decode_token((tmp_path / "receipt.bin").read_bytes())
    assert isinstance(receipt, Receipt)
    assert str(receipt.ran) == doc["task"] and receipt.iss == stack.service.did
    row = await _customer(stack.settings.database_url, "did:plc:single")
    assert row is not None and json.loads(row["details"]) == {"region": "us-east-1"}


async def test_enqueue_without_wait_sends_the_receipt_to_the_receipt_queue(
    stack: Stack, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    """Fire and forget: no reply_to, so the worker answers on its receipt queue."""
    ch = await amqp.channel()
    receipts = await ch.declare_queue(stack.settings.receipt_queue, passive=True)
    arrived: asyncio.Queue[bytes] = asyncio.Queue()

    async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await arrived.put(message.body)
        await message.ack()

    await receipts.consume(collect)
    code = await asyncio.to_thread(
        cli.main,
        [
            "enqueue",
            "--key",
            stack.hilt_key,
            "--proof",
            str(stack.proof_file),
            "--service",
            stack.service.did,
            "--customer",
            "did:plc:nowait",
            "--product",
            PRODUCT,
            "--queue",
            stack.settings.queue,
        ],
    )
    assert code == cli.EXIT_OK
    body = await asyncio.wait_for(arrived.get(), 20)
    [receipt] = decode_request(body).receipts
    assert receipt.iss == stack.service.did and receipt.ok == {}
    await ch.close()


async def test_enqueue_wait_times_out_with_exit_1(
    amqp_url: str,
    queue_name: str,
    amqp: aio_pika.abc.AbstractRobustConnection,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An inbox nobody consumes: --wait gives up after every attempt and says so."""
    ch = await amqp.channel()
    await ch.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
    service = Signer.generate()
    monkeypatch.setattr("sys.stdin", io.StringIO(service.export() + "\n"))  # --key -
    code = await asyncio.to_thread(
        cli.main,
        [
            "enqueue",
            "--key",
            "-",
            "--service",
            service.did,
            "--customer",
            "did:plc:late",
            "--product",
            PRODUCT,
            "--wait",
            "--json",
            "--timeout",
            "0.3",
            "--attempts",
            "2",
            "--client-id",
            "cli",
            "--queue",
            queue_name,
        ],
    )
    assert code == cli.EXIT_CHECK_FAILED
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["error"]["name"] == "Timeout"
    # both attempts are the same invocation bytes, waiting in the inbox
    inbox = await ch.declare_queue(queue_name, passive=True)
    first = await inbox.get(no_ack=True)
    second = await inbox.get(no_ack=True)
    assert first.body == second.body and first.correlation_id == doc["invocation"]
    await ch.queue_delete(reply_queue_name(queue_name, "cli"))
    await ch.close()


async def test_enqueue_out_bytes_published_later_get_an_ok_receipt(
    worker: App,
    requester: Requester,
    service: Signer,
    agent: Signer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """enqueue --out writes the request instead of publishing it; those bytes, published
    later to a running worker's inbox, are answered with an ok receipt for the task."""
    proof = tmp_path / "proof.ctn"
    proof.write_bytes(encode_container([delegation(service, agent)]))
    key = tmp_path / "agent.key"
    key.write_text(agent.export())
    out = tmp_path / "request.cbor"
    argv = ["enqueue", "--key", f"@{key}", "--proof", str(proof), "--service", service.did]
    argv += ["--customer", "did:plc:published-later", "--product", PRODUCT]
    argv += ["--queue", worker.settings.queue, "--out", str(out), "--json"]
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_OK
    [doc] = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if '"out"' in ln]
    assert worker.consumer is not None and worker.consumer.outcomes["ok"] == 0  # not sent

    _, [receipt] = await requester.call(out.read_bytes())
    assert receipt.ok == {} and receipt.error is None
    assert str(receipt.ran) == doc["task"] and receipt.iss == service.did
    row = await _customer(worker.settings.database_url, "did:plc:published-later")
    assert row is not None and row["product"] == PRODUCT


async def _declare_worker_queues(
    amqp: aio_pika.abc.AbstractRobustConnection, settings: Settings
) -> None:
    """The worker's queues as it declares them, so a publish is routable before it runs."""
    ch = await amqp.channel()
    for name, arguments in queue_declarations(settings):
        await ch.declare_queue(name, durable=True, arguments=arguments)
    await ch.close()


async def _forge_response(
    amqp: aio_pika.abc.AbstractRobustConnection,
    client: Client,
    request: SignedRequest,
    service_did: str,
) -> None:
    """What anyone who can publish to the client's reply queue can send: a response with the
    request's public correlation id and an ok receipt for its task that claims to come from
    the service but is signed by another key."""
    forger = Signer.generate().with_did(service_did)
    receipt = build_receipt(forger, ran=request.task, iat=int(time.time()))
    ch = await amqp.channel()
    await ch.default_exchange.publish(
        aio_pika.Message(encode_container([receipt]), correlation_id=str(request.cid)),
        routing_key=client.reply_queue,
    )
    await ch.close()


async def _until_rejected(client: Client, request: SignedRequest, n: int) -> None:
    """Until the client has seen (and set aside) ``n`` responses that do not verify."""
    for _ in range(500):
        waiter = client._waiters.get(str(request.cid))
        if waiter is not None and waiter.invalid >= n:
            return
        await asyncio.sleep(0.02)
    pytest.fail("the client never saw the forged response")


async def test_a_forged_response_does_not_end_the_wait(
    worker_settings: Settings, service: Signer, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    """A forged response with the right correlation id arrives before the worker's real one:
    the client keeps waiting and returns the real, verified receipt."""
    await _declare_worker_queues(amqp, worker_settings)
    async with Client(
        worker_settings.amqp_url,
        signer=service,
        service_did=service.did,
        queue=worker_settings.queue,
        timeout=20,
    ) as client:
        request = client.build(CustomerAdd("did:plc:forged-first", PRODUCT))
        call = asyncio.create_task(client.call(request))
        await _until_published(amqp, worker_settings.queue)
        await _forge_response(amqp, client, request, service.did)
        await _until_rejected(client, request, 1)
        assert not call.done()  # the forgery did not end it
        async with running(worker_settings):
            outcome = await call
        await client.delete_reply_queue()
    assert outcome.ok == {} and outcome.task == request.task
    assert outcome.receipt.iss == service.did
    row = await _customer(worker_settings.database_url, "did:plc:forged-first")
    assert row is not None


async def test_only_forged_responses_raise_invalid_receipt_naming_them(
    worker_settings: Settings, service: Signer, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    """No worker answers; a forged response comes: at the timeout the client reports
    InvalidReceipt with what it saw, not Timeout."""
    await _declare_worker_queues(amqp, worker_settings)
    async with Client(
        worker_settings.amqp_url,
        signer=service,
        service_did=service.did,
        queue=worker_settings.queue,
    ) as client:
        request = client.build(CustomerAdd("did:plc:forged-only", PRODUCT))
        call = asyncio.create_task(client.call(request, timeout=3, attempts=1))
        await _until_published(amqp, worker_settings.queue)
        await _forge_response(amqp, client, request, service.did)
        with pytest.raises(InvalidReceipt) as caught:
            await call
        await client.delete_reply_queue()
    message = str(caught.value)
    assert caught.value.name == "InvalidReceipt"
    assert "1 response(s) with its correlation id did not verify" in message
    assert "InvalidSignature" in message and str(request.task) in message


async def _until_published(amqp: aio_pika.abc.AbstractRobustConnection, queue: str) -> None:
    """Until the inbox holds the request (the client has published it)."""
    ch = await amqp.channel()
    try:
        underlay = await ch.get_underlay_channel()
        for _ in range(500):
            declared = await underlay.queue_declare(queue, passive=True)
            if (declared.message_count or 0) >= 1:
                return
            await asyncio.sleep(0.02)
        pytest.fail(f"nothing was published to {queue!r}")
    finally:
        await ch.close()


# --- reply="direct": RabbitMQ's direct reply-to (issue 21) ----------------------------------


async def test_direct_reply_round_trip_declares_no_queue(
    stack: Stack, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    async with Client(
        stack.settings.amqp_url,
        signer=stack.hilt,
        service_did=stack.service.did,
        proofs=[stack.proof],
        queue=stack.settings.queue,
        timeout=20,
        reply="direct",
    ) as client:
        assert client.reply_to == "amq.rabbitmq.reply-to"
        outcome = await client.add_customer("did:plc:direct", PRODUCT, {"region": "eu"})
        assert outcome.ok == {} and outcome.receipt.iss == stack.service.did
        with pytest.raises(ReceiptError) as caught:  # an error receipt comes back the same way
            await client.add_customer("did:plc:direct", "did:web:elsewhere.example")
        assert caught.value.name == "MatchError"
        await client.delete_reply_queue()  # nothing to delete: a no-op
    ch = await amqp.channel()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await ch.declare_queue(client.reply_queue, passive=True)


def test_an_unknown_reply_mode_is_refused(stack_free_signer: Signer) -> None:
    with pytest.raises(ValueError, match="reply must be one of queue, direct"):
        Client(
            "amqp://127.0.0.1/",
            signer=stack_free_signer,
            service_did=stack_free_signer.did,
            reply="mailbox",  # type: ignore[arg-type]
        )


@pytest.fixture(name="stack_free_signer")
def _stack_free_signer() -> Signer:
    return Signer.generate()


async def test_enqueue_wait_with_direct_reply(
    stack: Stack,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = tmp_path / "hilt.key"
    key.write_text(stack.hilt.export())
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", stack.settings.amqp_url)  # it has a password
    code = await asyncio.to_thread(
        cli.main,
        [
            "enqueue",
            "--key",
            f"@{key}",
            "--proof",
            str(stack.proof_file),
            "--service",
            stack.service.did,
            "--customer",
            "did:plc:singledirect",
            "--product",
            PRODUCT,
            "--wait",
            "--json",
            "--reply",
            "direct",
            "--queue",
            stack.settings.queue,
        ],
    )
    assert code == cli.EXIT_OK
    out = capsys.readouterr().out
    [doc] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert doc["ok"] is True and doc["error"] is None
    assert await _customer(stack.settings.database_url, "did:plc:singledirect") is not None
