"""The producer commands without a broker: arguments, keys, bulk files, keygen, delegate."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from worker import cli
from worker.errors import ConfigError
from worker.keyfile import read_key
from worker.produce.bulk import INVALID_INPUT, Progress, read_csv, read_ndjson, read_rows
from worker.produce.client import CustomerAdd
from worker.produce.enqueue import outcome_record
from worker.produce.options import parse_details
from worker.ucan import Delegation, Signer, decode_request

HILT = "did:key:z6MkgGyk5NXAGGz8xLfo8VGMGEnVjY5rrCoR4yZydjcE9RRm"


@pytest.fixture(name="key")
def _key() -> Signer:
    return Signer.generate()


@pytest.fixture(name="key_file")
def _key_file(key: Signer, tmp_path: Path) -> str:
    """``key`` in a file, as ``--key`` takes it (never the key's text on the command line)."""
    path = tmp_path / "key"
    path.write_text(key.export() + "\n")
    path.chmod(0o600)
    return f"@{path}"


# --- arguments ---------------------------------------------------------------------------


def test_enqueue_arguments() -> None:
    args = cli.build_parser().parse_args(
        [
            "enqueue",
            "--key",
            "@hilt.key",
            "--service",
            "did:web:upload.example",
            "--customer",
            "did:plc:a",
            "--product",
            "did:web:p",
            "--detail",
            "region=eu",
            "--detail",
            "note=a=b",
            "--wait",
        ]
    )
    assert args.command == "enqueue"
    assert (args.key, args.customer, args.product, args.wait) == (
        "@hilt.key",
        "did:plc:a",
        "did:web:p",
        True,
    )
    assert parse_details(args.detail) == {"region": "eu", "note": "a=b"}
    assert (args.concurrency, args.attempts, args.expires_in) == (32, 3, 300)


def test_delegate_arguments_keep_the_subcommand() -> None:
    args = cli.build_parser().parse_args(
        ["delegate", "--key", "k", "--to", HILT, "--command", "/customer/add", "--out", "f"]
    )
    assert args.command == "delegate"
    assert args.delegated_command == "/customer/add"
    assert args.expires_in is None and args.policy is None and args.subject is None
    assert args.no_expiry is False


@pytest.mark.parametrize("bad", ["region", "=eu"])
def test_parse_details_rejects_malformed(bad: str) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_details([bad])


@pytest.mark.parametrize(
    "argv",
    [
        ["--customer", "did:plc:a"],  # no --product
        ["--customer", "not-a-did", "--product", "did:web:p"],
        ["--customer", "did:plc:a", "--product", "did:web:p", "--detail", "oops"],
        ["--from", "x.ndjson", "--customer", "did:plc:a"],
        ["--customer", "did:plc:a", "--product", "did:web:p", "--concurrency", "0"],
        ["--customer", "did:plc:a", "--product", "did:web:p", "--receipt", "r.bin"],
    ],
)
def test_enqueue_usage_errors_exit_2(
    argv: list[str], key: Signer, key_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["enqueue", "--key", key_file, "--service", key.did, *argv])
    assert code == cli.EXIT_USAGE
    assert key.export() not in capsys.readouterr().err


def test_enqueue_without_a_proof_chain_exits_2(key_file: str) -> None:
    code = cli.main(
        [
            "enqueue",
            "--key",
            key_file,
            "--service",
            Signer.generate().did,
            "--customer",
            "did:plc:a",
            "--product",
            "did:web:p",
        ]
    )
    assert code == cli.EXIT_USAGE


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_enqueue_unreachable_broker_exits_3(
    key: Signer, key_file: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"amqp://guest:secret-pw@127.0.0.1:{_closed_port()}/"
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", url)
    code = cli.main(
        [
            "enqueue",
            "--key",
            key_file,
            "--service",
            key.did,
            "--customer",
            "did:plc:a",
            "--product",
            "did:web:p",
        ]
    )
    assert code == cli.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "cannot reach the broker" in err and "secret-pw" not in err


# --- keys --------------------------------------------------------------------------------


def test_read_key_forms(tmp_path: Path, key: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain.key"
    plain.write_text(key.export() + "\n")
    multibase = tmp_path / "multibase.key"
    multibase.write_text("M" + key.export())
    as_json = tmp_path / "key.json"
    as_json.write_text(json.dumps({"did": key.did, "key": key.export()}))
    as_text = tmp_path / "keygen.txt"
    as_text.write_text(f"did: {key.did}\nkey: {key.export()}\n")
    for value in (f"@{plain}", str(plain), f"@{multibase}", f"@{as_json}", str(as_text)):
        assert read_key(value).did == key.did
    # "-": standard input, in any of the file forms
    for text in (key.export() + "\n", json.dumps({"did": key.did, "key": key.export()})):
        monkeypatch.setattr("sys.stdin", io.StringIO(text))
        assert read_key("-").did == key.did


@pytest.mark.parametrize(
    "inline",
    [
        lambda k: k.export(),
        lambda k: "M" + k.export(),
        lambda k: k.export()[:-4] + "AAA=",  # a mistyped key is still key material
        lambda k: json.dumps({"did": k.did, "key": k.export()}),
        lambda k: f"key: {k.export()}",
        lambda k: "@" + k.export(),
    ],
    ids=["base64", "multibase", "mistyped", "keygen-json", "keygen-text", "at-key"],
)
def test_read_key_refuses_the_key_text_without_echoing_it(
    key: Signer, inline: Callable[[Signer], str]
) -> None:
    """CONTRACT §7: ps shows arguments to every user, so a key is taken only from a file or
    standard input; the refusal names those ways and never repeats the text."""
    value = inline(key)
    with pytest.raises(ConfigError) as caught:
        read_key(value)
    message = str(caught.value)
    assert "@FILE" in message and "standard input" in message and "ps" in message
    assert value not in message and key.export()[8:-8] not in message


def test_read_key_errors_never_echo_the_key(tmp_path: Path, key: Signer) -> None:
    broken = tmp_path / "broken.key"
    broken.write_text(key.export()[:-4] + "!!!!")
    with pytest.raises(ConfigError) as caught:
        read_key(str(broken))
    assert key.export()[:-4] not in str(caught.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read_key(f"@{tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match=r"no such file 'hilt\.json'.*standard input"):
        read_key("hilt.json")
    bad_json = tmp_path / "k.json"
    bad_json.write_text('{"did": "did:key:z"}')
    with pytest.raises(ConfigError, match='no "key"'):
        read_key(str(bad_json))


@pytest.mark.parametrize("command", ["enqueue", "delegate", "provision", "space-info", "plc"])
def test_a_key_on_the_command_line_exits_2(
    command: str, key: Signer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never-written"
    argv = {
        "enqueue": ["--service", key.did, "--customer", "did:plc:a", "--product", "did:web:p"],
        "delegate": ["--to", HILT, "--command", "/customer/add", "--out", str(out)],
        "provision": ["--service", key.did, "--space", HILT, "--out", str(out)],
        "space-info": ["--service", key.did, "--space", key.did],
        "plc": ["--directory", "http://127.0.0.1:9"],
    }[command]
    head = ["plc", "create"] if command == "plc" else [command]
    assert cli.main([*head, "--key", key.export(), *argv]) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert "--key: a key's text on the command line is refused" in captured.err
    assert key.export() not in captured.err + captured.out
    assert not out.exists()


def test_help_says_how_to_give_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("enqueue", "delegate", "provision", "space-info", "plc create"):
        with pytest.raises(SystemExit):
            cli.main([*command.split(), "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "@FILE" in text and "standard input" in text and "refused" in text


# --- bulk files --------------------------------------------------------------------------


def test_read_ndjson() -> None:
    text = "\n".join(
        [
            json.dumps({"customer": "did:plc:a", "product": "did:web:p"}),
            "",
            json.dumps(
                {
                    "customer": "did:plc:b",
                    "product": "did:web:p",
                    "externalAccount": "acct",
                    "details": {"region": "eu"},
                }
            ),
            "{not json",
            json.dumps({"customer": "did:plc:c", "product": "did:web:p", "details": {"n": 1}}),
            json.dumps({"customer": "did:plc:d", "product": "did:web:p", "extra": 1}),
            json.dumps(["a"]),
        ]
    )
    rows = list(read_ndjson(io.StringIO(text)))
    assert [r.line for r in rows] == [1, 3, 4, 5, 6, 7]
    assert rows[0].args == CustomerAdd("did:plc:a", "did:web:p", {}, None)
    assert rows[1].args == CustomerAdd("did:plc:b", "did:web:p", {"region": "eu"}, "acct")
    assert rows[2].args is None and rows[2].error and "not JSON" in rows[2].error
    assert rows[3].error and "must be text" in rows[3].error
    assert rows[4].error and "unknown fields" in rows[4].error
    assert rows[5].error and "JSON object" in rows[5].error


def test_read_csv_with_details_json_and_detail_columns() -> None:
    text = (
        "customer,product,external_account,details,detail.region,detail.external_id\n"
        'did:plc:a,did:web:p,,"{""tier"": ""gold""}",eu,c-1\n'
        "did:plc:b,did:web:p,stripe:cus_2,,,\n"
        "did:plc:c,,,,,\n"
        'did:plc:d,did:web:p,,"{""n"": 1}",,\n'
        '"did:plc:e\nwith newline",did:web:p,,,,\n'
    )
    rows = list(read_csv(io.StringIO(text)))
    assert rows[0].line == 2
    assert rows[0].args == CustomerAdd(
        "did:plc:a", "did:web:p", {"tier": "gold", "region": "eu", "external_id": "c-1"}, None
    )
    assert rows[1].args == CustomerAdd("did:plc:b", "did:web:p", {}, "stripe:cus_2")
    assert rows[2].args is None and rows[2].error and "product must be a DID" in rows[2].error
    assert rows[3].error and "must be text" in rows[3].error
    # a quoted cell spanning two lines: the row's number is the line it ends on
    assert rows[4].line == 7 and rows[4].error and "spaces" in rows[4].error


def test_read_csv_rejects_a_bad_header() -> None:
    with pytest.raises(ConfigError, match="CSV header"):
        list(read_csv(io.StringIO("costumer,product\ndid:plc:a,did:web:p\n")))
    with pytest.raises(ConfigError, match="CSV header"):
        list(read_csv(io.StringIO("customer\ndid:plc:a\n")))


def test_read_rows_detects_the_format(tmp_path: Path) -> None:
    record = json.dumps({"customer": "did:plc:a", "product": "did:web:p"})
    for name, text in (
        ("a.ndjson", record + "\n"),
        ("a.jsonl", record + "\n"),
        ("a.txt", "  " + record + "\n"),
        ("a.csv", "customer,product\ndid:plc:a,did:web:p\n"),
        ("a", "customer,product\ndid:plc:a,did:web:p\n"),
        ("bom.csv", "\ufeffcustomer,product\ndid:plc:a,did:web:p\n"),
    ):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        [row] = read_rows(path)
        assert row.args == CustomerAdd("did:plc:a", "did:web:p"), name
    with pytest.raises(ConfigError, match="cannot read"):
        read_rows(tmp_path / "missing.csv")


def test_outcome_record_for_invalid_input() -> None:
    record = outcome_record(7, None, None, (INVALID_INPUT, "customer must be a DID"))
    assert record == {
        "line": 7,
        "customer": None,
        "task": None,
        "invocation": None,
        "ok": False,
        "error": {"name": "InvalidInput", "message": "customer must be a DID"},
    }


def test_progress_bar_draws_only_on_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress(2, out, enabled=True)
    bar.advance(ok=True)
    bar.advance(ok=False)
    text = out.getvalue()
    assert "2/2" in text and "ok 1" in text and "failed 1" in text and text.endswith("\n")
    quiet = io.StringIO()
    Progress(1, quiet, enabled=False).advance(ok=True)
    assert quiet.getvalue() == ""


# --- keygen, delegate --------------------------------------------------------------------


def test_keygen_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keygen", "--json"]) == cli.EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"did", "key"}
    assert Signer.parse(doc["key"]).did == doc["did"]
    assert doc["did"].startswith("did:key:z6Mk")


def test_keygen_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keygen"]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("did: did:key:z6Mk") and lines[1].startswith("key: ")
    assert Signer.parse(lines[1].removeprefix("key: ")).did == lines[0].removeprefix("did: ")


def test_keygen_secp256k1_in_ucantones_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--type secp256k1: a did:plc account's key, 0x81 0x26 + the 32-byte scalar in base64
    (what Hilt keeps in its vault), whose did:key is zQ3s...; read back by --key."""
    assert cli.main(["keygen", "--type", "secp256k1", "--json"]) == cli.EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"did", "key"}
    raw = base64.b64decode(doc["key"], validate=True)
    assert raw[:2] == b"\x81\x26" and len(raw) == 34
    assert doc["did"].startswith("did:key:zQ3s")
    signer = Signer.parse(doc["key"])
    assert signer.kind == "secp256k1" and signer.did == doc["did"]
    path = tmp_path / "tenant.json"
    path.write_text(json.dumps(doc))
    assert read_key(str(path)).did == doc["did"]
    # the default stays Ed25519, and nothing else is a type
    assert cli.main(["keygen", "--type", "ed25519", "--json"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["did"].startswith("did:key:z6Mk")
    with pytest.raises(SystemExit):
        cli.main(["keygen", "--type", "rsa"])
    assert "invalid choice" in capsys.readouterr().err


def _delegate(tmp_path: Path, key: Signer, *extra: str) -> Delegation:
    out = tmp_path / "proof.ctn"
    key_file = tmp_path / "service.key"
    key_file.write_text(key.export())
    code = cli.main(
        [
            "delegate",
            "--key",
            f"@{key_file}",
            "--to",
            HILT,
            "--command",
            "/customer/add",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == cli.EXIT_OK
    [d] = decode_request(out.read_bytes()).delegations.values()
    return d


def test_delegate_defaults(tmp_path: Path, key: Signer, capsys: pytest.CaptureFixture[str]) -> None:
    before = int(time.time())
    d = _delegate(tmp_path, key)
    assert (d.iss, d.aud, d.sub, d.cmd) == (key.did, HILT, key.did, "/customer/add")
    # not forever: a year, unless asked otherwise
    year = 365 * 24 * 3600
    assert d.exp is not None and before + year <= d.exp <= int(time.time()) + year
    assert d.pol.wire == []
    assert (tmp_path / "proof.ctn").read_bytes()[0] == 0xA1  # raw container, no header byte
    assert key.export() not in capsys.readouterr().out


def test_delegate_options(tmp_path: Path, key: Signer, capsys: pytest.CaptureFixture[str]) -> None:
    policy = [["like", ".product", "did:web:*"]]
    d = _delegate(
        tmp_path,
        key,
        "--expires-in",
        "3600",
        "--policy",
        json.dumps(policy),
        "--issuer-did",
        "did:web:upload.example",
        "--base64",
        "--json",
    )
    doc = json.loads(capsys.readouterr().out)
    assert d.iss == d.sub == "did:web:upload.example"
    assert d.exp is not None and d.exp == doc["exp"]
    assert d.pol.wire == policy
    assert str(d.cid) == doc["cid"]
    assert (tmp_path / "proof.ctn").read_bytes()[:1] == b"B"


def test_delegate_no_expiry_is_explicit(
    tmp_path: Path, key: Signer, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _delegate(tmp_path, key, "--no-expiry", "--json")
    assert d.exp is None and json.loads(capsys.readouterr().out)["exp"] is None
    with pytest.raises(SystemExit):  # one or the other
        base = ["delegate", "--key", "k", "--to", HILT, "--command", "/c", "--out", "f"]
        cli.build_parser().parse_args([*base, "--no-expiry", "--expires-in", "60"])
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ["--policy", '[["=", ".a", 1]]'],
        ["--policy", "not json"],
        ["--expires-in", "0"],
        ["--subject", "nope"],
    ],
)
def test_delegate_usage_errors(tmp_path: Path, key_file: str, extra: list[str]) -> None:
    code = cli.main(
        [
            "delegate",
            "--key",
            key_file,
            "--to",
            HILT,
            "--command",
            "/customer/add",
            "--out",
            str(tmp_path / "x"),
            *extra,
        ]
    )
    assert code == cli.EXIT_USAGE
    assert not (tmp_path / "x").exists()


def test_delegate_rejects_a_bad_command(tmp_path: Path, key_file: str) -> None:
    for cmd in ("/Customer/add", "customer/add", "/customer/"):
        code = cli.main(
            ["delegate", "--key", key_file, "--to", HILT, "--command", cmd, "--out", "x"]
        )
        assert code == cli.EXIT_USAGE


# --- did ---------------------------------------------------------------------------------


@pytest.fixture(name="no_service_env")
def _no_service_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No service key configured, in a scratch directory (where .forge-worker/ would be)."""
    for var in (
        "FORGE_WORKER_SERVICE_KEY",
        "FORGE_WORKER_SERVICE_KEY_FILE",
        "FORGE_WORKER_SERVICE_DID",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_did_of_the_service_key_from_the_environment(
    no_service_env: Path,
    key: Signer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FORGE_WORKER_SERVICE_KEY", key.export())
    assert cli.main(["did"]) == cli.EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == key.did + "\n"  # the DID alone: SERVICE=$(forge-worker did)
    assert cli.main(["did", "--json"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out) == {"did": key.did, "key_did": key.did}
    assert key.export() not in captured.out + captured.err


def test_did_honours_the_service_did_of_a_key_file(
    no_service_env: Path,
    key: Signer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = no_service_env / "service.key"
    path.write_text(key.export() + "\n")
    monkeypatch.setenv("FORGE_WORKER_SERVICE_KEY_FILE", str(path))
    monkeypatch.setenv("FORGE_WORKER_SERVICE_DID", "did:web:upload.example")
    assert cli.main(["did", "--json"]) == cli.EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"did": "did:web:upload.example", "key_did": key.did}
    assert cli.main(["did"]) == cli.EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == "did:web:upload.example\n"
    assert key.did in captured.err and "--service-key-did" in captured.err
    assert key.export() not in captured.out + captured.err


def test_did_of_the_development_key_says_so_and_creates_none(
    no_service_env: Path, key: Signer, capsys: pytest.CaptureFixture[str]
) -> None:
    # none yet: a usage error, and no key is made
    assert cli.main(["did"]) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == "" and "no service key" in captured.err
    assert ".forge-worker/service.key" in captured.err
    assert not (no_service_env / ".forge-worker").exists()
    # the one `run` made: its DID, and a note that it is a development identity
    (no_service_env / ".forge-worker").mkdir()
    (no_service_env / ".forge-worker" / "service.key").write_text(key.export() + "\n")
    assert cli.main(["did"]) == cli.EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == key.did + "\n" and "development key" in captured.err


def test_did_of_a_given_key(
    no_service_env: Path,
    key: Signer,
    key_file: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FORGE_WORKER_SERVICE_DID", "did:web:upload.example")  # not this key's
    keygen_json = no_service_env / "hilt.json"
    keygen_json.write_text(json.dumps({"did": key.did, "key": key.export()}))
    for value in (key_file, str(keygen_json)):
        assert cli.main(["did", "--key", value, "--json"]) == cli.EXIT_OK
        assert json.loads(capsys.readouterr().out) == {"did": key.did, "key_did": key.did}
    monkeypatch.setattr("sys.stdin", io.StringIO(key.export()))
    assert cli.main(["did", "--key", "-"]) == cli.EXIT_OK
    assert capsys.readouterr().out == key.did + "\n"
    assert cli.main(["did", "--key", key.export()]) == cli.EXIT_USAGE
    assert key.export() not in capsys.readouterr().err


def test_did_of_ucantones_service_key(
    no_service_env: Path, vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Go vectors' service key (raw 0x80 0x26 + seed) signs as the did:key ucantone
    computed for it."""
    raw = (vectors / "ucantone-go" / "ed25519.service.private.bin").read_bytes()
    path = no_service_env / "service.key"
    path.write_text(base64.b64encode(raw).decode())
    assert cli.main(["did", "--service-key-file", str(path)]) == cli.EXIT_OK
    assert capsys.readouterr().out == "did:key:z6MkoGmQXc2j7GuHEYrL9NwWLGFDM58iXXwRRKMjhY4Mc1Sb\n"


# --- enqueue --out -----------------------------------------------------------------------


def test_enqueue_out_writes_the_signed_body_without_a_broker(
    tmp_path: Path,
    key: Signer,
    key_file: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nothing listens on the broker's port: --out needs none. The file is the raw container
    (invocation and proof) that enqueue would publish, and inspect finds it valid."""
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", f"amqp://guest:pw@127.0.0.1:{_closed_port()}/")
    service = Signer.generate()
    proof = tmp_path / "proof.ctn"
    service_key = tmp_path / "service.key"
    service_key.write_text(service.export())
    delegate = ["delegate", "--key", f"@{service_key}", "--to", key.did]
    assert cli.main([*delegate, "--command", "/customer/add", "--out", str(proof)]) == 0
    capsys.readouterr()
    out = tmp_path / "request.cbor"
    argv = ["enqueue", "--key", key_file, "--proof", str(proof), "--service", service.did]
    argv += ["--customer", "did:plc:offline", "--product", "did:web:p", "--detail", "region=eu"]
    assert cli.main([*argv, "--expires-in", "3600", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    body = out.read_bytes()
    assert doc["out"] == str(out) and doc["bytes"] == len(body)
    assert doc["customer"] == "did:plc:offline" and doc["ok"] is None and doc["error"] is None
    assert body[0] == 0xA1  # raw {"ctn-v1": [...]}, no header byte: what is published
    request = decode_request(body)
    [inv] = request.invocations
    assert str(inv.cid) == doc["invocation"] and str(inv.task_cid) == doc["task"]
    assert (inv.iss, inv.aud, inv.sub) == (key.did, service.did, service.did)
    assert inv.exp is not None and inv.exp > time.time() + 3500
    assert list(request.delegations) == list(inv.prf)
    # inspect agrees it is valid for this service
    assert cli.main(["inspect", str(out), "--service-did", service.did, "--json"]) == 0
    [checked] = json.loads(capsys.readouterr().out)["invocations"]
    assert checked["valid"] is True and checked["task"] == doc["task"]
    # the text form says where it went
    assert cli.main([*argv, "--out", str(tmp_path / "again.cbor")]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {tmp_path / 'again.cbor'}") and "publish its bytes" in line


@pytest.mark.parametrize(
    "extra",
    [["--wait"], ["--wait", "--receipt", "r.bin"], ["--from", "regs.ndjson"]],
)
def test_enqueue_out_refuses_what_needs_the_broker(
    extra: list[str], key: Signer, key_file: str, tmp_path: Path
) -> None:
    out = tmp_path / "request.cbor"
    regs = ["--customer", "did:plc:a", "--product", "did:web:p"] if "--from" not in extra else []
    argv = ["enqueue", "--key", key_file, "--service", key.did, *regs]
    assert cli.main([*argv, *extra, "--out", str(out)]) == cli.EXIT_USAGE
    assert not out.exists()


# --- provision, space-info ---------------------------------------------------------------


def test_provision_arguments() -> None:
    argv = ["provision", "--key", "@t.json", "--as", "did:plc:x", "--service", "did:web:s"]
    args = cli.build_parser().parse_args([*argv, "--space", "did:key:z6Mk", "--wait"])
    assert (args.command, args.as_did, args.provider, args.wait) == (
        "provision",
        "did:plc:x",
        None,  # the service, once the DIDs are checked
        True,
    )
    assert (args.expires_in, args.attempts, args.timeout) == (300, 3, 30.0)


@pytest.mark.parametrize(
    "extra",
    [
        ["--as", "not-a-did"],
        ["--space", "nope"],
        ["--provider", "also nope"],
        ["--receipt", "r.bin"],  # needs --wait
        ["--out", "x.cbor", "--wait"],
        ["--expires-in", "0"],
        ["--attempts", "0"],
    ],
)
def test_provision_usage_errors_exit_2(
    extra: list[str], key: Signer, key_file: str, tmp_path: Path
) -> None:
    argv = ["provision", "--key", key_file, "--service", key.did, "--space", HILT]
    assert cli.main([*argv, *extra]) == cli.EXIT_USAGE
    assert not (tmp_path / "x.cbor").exists()


def test_provision_unreachable_broker_exits_3(
    key_file: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", f"amqp://guest:pw@127.0.0.1:{_closed_port()}/")
    service = Signer.generate().did
    for argv in (
        [
            "provision",
            "--key",
            key_file,
            "--service",
            service,
            "--space",
            HILT,
            "--as",
            "did:plc:a",
        ],
        ["space-info", "--key", key_file, "--service", service, "--space", read_key(key_file).did],
    ):
        assert cli.main(argv) == cli.EXIT_UNREACHABLE
        assert "cannot reach the broker" in capsys.readouterr().err
