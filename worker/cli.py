"""``forge-worker``: argparse subcommands, named exit codes, one place that turns errors into them.

Each command's work lives in its own module and is imported only when that command runs;
a handler takes the parsed arguments and the settings and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Final, Protocol

from worker import config
from worker.errors import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ConfigError,
    Unreachable,
)

__all__ = ["EXIT_CHECK_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "main"]

#: command -> "module:function" of its handler
HANDLERS: Final = {
    "run": "worker.service.app:run_main",
    "migrate": "worker.service.store:migrate_main",
    "inspect": "worker.operate.inspect:inspect_main",
    "status": "worker.operate.status:status_main",
    "dlq": "worker.operate.dlq:dlq_main",
    "keygen": "worker.produce.keys:keygen_main",
    "did": "worker.produce.keys:did_main",
    "delegate": "worker.produce.keys:delegate_main",
    "enqueue": "worker.produce.enqueue:enqueue_main",
    "provision": "worker.produce.provision:provision_main",
    "space-info": "worker.produce.provision:space_info_main",
    "plc": "worker.produce.plc:plc_main",
}


class Handler(Protocol):
    def __call__(self, args: argparse.Namespace, settings: config.Settings) -> int: ...


def _setting_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Add ``--flag`` for each setting (all, or those in ``names``); flags win over variables."""
    group = parser.add_argument_group("configuration (each also FORGE_WORKER_<NAME>)")
    for attr, var, help_text in config.setting_fields():
        if names is not None and attr not in names:
            continue
        group.add_argument(
            "--" + attr.replace("_", "-"),
            dest="cfg_" + attr,
            metavar=attr.upper(),
            help=f"{help_text} [{var}]",
        )


#: how every ``--key`` takes a key (CONTRACT §7): never its text, which ps would show
_KEY_HELP: Final = (
    "a file holding it (@FILE or a path; keygen's output works) or - to read it from "
    "standard input; the key's text itself is refused, since ps shows arguments to every user"
)

#: ``--out FILE`` of every producer command that publishes one request (enqueue, provision):
#: its work is worker.produce.offline
_OUT_HELP: Final = (
    "write the signed request body (exactly the bytes that would be published) to FILE "
    "instead of publishing it; no broker is needed. It expires --expires-in seconds after "
    "signing: give one that covers the wait until it is published"
)

_BROKER: Final = ("amqp_url", "database_url", "queue", "receipt_queue", "log_format")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    p = argparse.ArgumentParser(
        prog="forge-worker",
        description="The Forge upload service's RabbitMQ inbox for signed UCAN invocations "
        "(/customer/add, /provider/add, /space/info).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="consume, validate, upsert, receipt, ack")
    _setting_flags(run)
    # what ``run --processes N`` tells each of its worker processes (worker.service.supervisor)
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    run.add_argument("--status-fd", type=int, help=argparse.SUPPRESS)

    mig = sub.add_parser("migrate", help="apply pending database migrations and exit")
    _setting_flags(mig, ("database_url", "database_pooler", "log_format"))

    ins = sub.add_parser("inspect", help="decode and validate a request body or token file offline")
    ins.add_argument("file", metavar="FILE", help="request body or token ('-' for stdin)")
    ins.add_argument("--now", type=int, metavar="UNIX", help="validate at this time (default: now)")
    ins.add_argument("--service-did", metavar="DID", help="also check each invocation's audience")
    ins.add_argument(
        "--plc-directory",
        metavar="URL",
        help="fetch the documents of did:plc issuers from this PLC directory first (e.g. "
        "http://127.0.0.1:2582); without it inspect stays offline and cannot verify them",
    )
    ins.add_argument(
        "--clock-skew",
        type=int,
        default=0,
        metavar="SECONDS",
        help="leeway on exp/nbf (default 0: exactly ucantone)",
    )
    ins.add_argument("--json", action="store_true", help="print one JSON document")

    st = sub.add_parser("status", help="depth and consumers of the worker's queues")
    st.add_argument("--json", action="store_true", help="print one JSON document")
    st.add_argument(
        "--no-peek",
        action="store_true",
        help="do not read the dead-letter queue for its oldest age (what is read is put "
        "back at once, but marked redelivered)",
    )
    _setting_flags(st, (*_BROKER, "retry_delays"))

    dlq = sub.add_parser("dlq", help="inspect, replay and purge dead letters")
    dsub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    for name, help_text in (
        ("list", "list dead letters with their reasons"),
        ("show", "decode one dead letter"),
        ("replay", "move dead letters back to the inbox (confirm, then ack)"),
        ("purge", "delete dead letters"),
    ):
        d = dsub.add_parser(name, help=help_text)
        _setting_flags(d, (*_BROKER, "retry_delays"))
        if name == "show":
            d.add_argument("id", metavar="ID", help="dead letter id (from dlq list)")
            d.add_argument("--json", action="store_true", help="print one JSON document")
            continue
        d.add_argument("--limit", type=int, metavar="N", help="at most N messages")
        d.add_argument("--json", action="store_true", help="print one JSON document")
        if name in ("replay", "purge"):
            d.add_argument("--all", action="store_true", help="every dead letter")
            d.add_argument("--id", nargs="+", default=[], metavar="ID", help="these dead letters")
        if name in ("list", "replay", "purge"):
            d.add_argument("--reason", metavar="REASON", help="only those dead-lettered for this")
            d.add_argument(
                "--since",
                metavar="WHEN",
                help="only those dead-lettered since (unix seconds or ISO 8601)",
            )
        if name == "replay":
            d.add_argument("--dry-run", action="store_true", help="show what would move")
            d.add_argument(
                "--rate",
                type=float,
                default=100.0,
                metavar="PER_SECOND",
                help="replay at most this many messages a second (default 100)",
            )
        if name == "purge":
            d.add_argument(
                "--yes",
                action="store_true",
                help="do not ask for confirmation (also needed with --all; required without "
                "a terminal)",
            )

    kg = sub.add_parser("keygen", help="a new key (Ed25519 or secp256k1) and its DID")
    kg.add_argument(
        "--type",
        dest="key_type",
        choices=("ed25519", "secp256k1"),
        default="ed25519",
        help="ed25519 (default: a service, Hilt, a space) or secp256k1 (a did:plc account's "
        "key: plc create)",
    )
    kg.add_argument("--json", action="store_true", help="print one JSON document")

    di = sub.add_parser(
        "did",
        help="the DID a key signs as (default: the service's): what producers pass as --service",
    )
    di.add_argument(
        "--key",
        metavar="KEY",
        help="this key instead of the service's: " + _KEY_HELP,
    )
    di.add_argument("--json", action="store_true", help='print {"did": ..., "key_did": ...}')
    _setting_flags(di, ("service_key_file", "service_did"))

    dg = sub.add_parser("delegate", help="sign a delegation with the service key")
    dg.add_argument(
        "--key", required=True, metavar="KEY", help="the issuer's key (the service): " + _KEY_HELP
    )
    dg.add_argument("--to", required=True, metavar="DID", help="audience of the delegation")
    # dest: "command" is the subcommand's own name
    dg.add_argument(
        "--command",
        dest="delegated_command",
        required=True,
        metavar="CMD",
        help="e.g. /customer/add",
    )
    lifetime = dg.add_mutually_exclusive_group()
    lifetime.add_argument(
        "--expires-in",
        type=int,
        metavar="SECONDS",
        help="lifetime of the delegation (default 31536000, one year: there is no revocation, "
        "so an expiry is what bounds a leaked holder key; re-delegate before it passes)",
    )
    lifetime.add_argument(
        "--no-expiry",
        action="store_true",
        help="a delegation that never expires (only rotating the service key voids it)",
    )
    dg.add_argument("--subject", metavar="DID", help="subject (default: the issuer's DID)")
    dg.add_argument("--issuer-did", metavar="DID", help="act as this DID (e.g. did:web)")
    dg.add_argument("--policy", metavar="JSON", help="policy statements as a JSON array (or @PATH)")
    dg.add_argument("--out", required=True, metavar="FILE", help="write the container here")
    dg.add_argument(
        "--base64",
        action="store_true",
        help="write the base64 container form (header 'B'), e.g. for a config value",
    )
    dg.add_argument("--json", action="store_true", help="print one JSON document")

    eq = sub.add_parser("enqueue", help="publish /customer/add and optionally await its receipt")
    eq.add_argument("--key", required=True, metavar="KEY", help="the producer's key: " + _KEY_HELP)
    eq.add_argument("--issuer-did", metavar="DID", help="sign as this DID (e.g. did:web)")
    eq.add_argument("--proof", metavar="FILE", help="container with the delegation chain")
    eq.add_argument("--service", required=True, metavar="DID", help="the worker's service DID")
    eq.add_argument(
        "--service-key-did",
        metavar="DID",
        help="did:key of the service's key, to verify receipts of a did:web service",
    )
    eq.add_argument("--customer", metavar="DID", help="customer DID")
    eq.add_argument("--product", metavar="DID", help="product DID")
    eq.add_argument("--external-account", metavar="X", help="payment system account id")
    eq.add_argument(
        "--detail", action="append", default=[], metavar="K=V", help="a details entry (repeatable)"
    )
    eq.add_argument(
        "--from", dest="from_file", metavar="FILE", help="bulk: NDJSON or CSV of registrations"
    )
    eq.add_argument("--results", metavar="FILE", help="bulk: write one outcome per line here")
    eq.add_argument(
        "--concurrency",
        type=int,
        default=32,
        metavar="N",
        help="bulk: registrations in flight (default 32)",
    )
    eq.add_argument(
        "--expires-in",
        type=int,
        default=300,
        metavar="SECONDS",
        help="invocation lifetime (default 300)",
    )
    eq.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds to wait for a receipt after each publish (default 30)",
    )
    eq.add_argument(
        "--client-id",
        metavar="ID",
        help="name of this producer's reply queue <queue>.replies.<ID>, with --reply queue "
        "(default: random)",
    )
    eq.add_argument(
        "--reply",
        choices=("queue", "direct"),
        help="receipts come to a durable reply queue of this producer's (queue, the "
        "default), or by RabbitMQ's direct reply-to (direct: at most once, so requests are "
        "published again after a reconnect)",
    )
    eq.add_argument(
        "--attempts",
        type=int,
        default=3,
        metavar="N",
        help="publish the same invocation up to N times while no receipt comes (default 3)",
    )
    eq.add_argument(
        "--wait", action="store_true", help="wait for the verified receipt (bulk always waits)"
    )
    eq.add_argument(
        "--receipt",
        metavar="FILE",
        help="with --wait: save the verified receipt token here (see inspect FILE)",
    )
    eq.add_argument("--out", metavar="FILE", help=_OUT_HELP)
    eq.add_argument("--json", action="store_true", help="print one JSON document")
    _setting_flags(eq, ("amqp_url", "queue", "log_format"))

    pv = sub.add_parser(
        "provision",
        help="publish /provider/add (provision a space for an account) and optionally await "
        "the subscription",
    )
    pv.add_argument("--key", required=True, metavar="KEY", help="the account's key: " + _KEY_HELP)
    pv.add_argument(
        "--as",
        dest="as_did",
        metavar="DID",
        help="sign as this account (a tenant's did:plc, e.g. from plc create); default the "
        "key's did:key, which the worker refuses as InvalidAccount",
    )
    pv.add_argument("--service", required=True, metavar="DID", help="the worker's service DID")
    pv.add_argument("--space", required=True, metavar="DID", help="the space to provision")
    pv.add_argument(
        "--provider", metavar="DID", help="the provider (default --service, the only one allowed)"
    )
    pv.add_argument(
        "--wait", action="store_true", help="wait for the verified receipt: the subscription id"
    )
    pv.add_argument(
        "--receipt",
        metavar="FILE",
        help="with --wait: save the verified receipt token here (see inspect FILE)",
    )
    pv.add_argument("--out", metavar="FILE", help=_OUT_HELP)
    pv.add_argument("--json", action="store_true", help="print one JSON document")
    _setting_flags(pv, ("amqp_url", "queue", "log_format"))

    si = sub.add_parser("space-info", help="ask /space/info: the providers of a space")
    si.add_argument(
        "--key",
        required=True,
        metavar="KEY",
        help="the space's key, or a delegate's with --proof: " + _KEY_HELP,
    )
    si.add_argument("--as", dest="as_did", metavar="DID", help="sign as this DID")
    si.add_argument(
        "--proof", metavar="FILE", help="container with the delegation chain from the space"
    )
    si.add_argument("--service", required=True, metavar="DID", help="the worker's service DID")
    si.add_argument("--space", required=True, metavar="DID", help="the space asked about")
    si.add_argument("--json", action="store_true", help="print one JSON document")
    _setting_flags(si, ("amqp_url", "queue", "log_format"))
    # what provision and space-info share with enqueue
    for parser in (pv, si):
        parser.add_argument(
            "--service-key-did",
            metavar="DID",
            help="did:key of the service's key, to verify receipts of a did:web service",
        )
        parser.add_argument(
            "--expires-in",
            type=int,
            default=300,
            metavar="SECONDS",
            help="invocation lifetime (default 300)",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="seconds to wait for a receipt after each publish (default 30)",
        )
        parser.add_argument(
            "--attempts",
            type=int,
            default=3,
            metavar="N",
            help="publish the same invocation up to N times while no receipt comes (default 3)",
        )
        parser.add_argument(
            "--client-id",
            metavar="ID",
            help="name of this producer's reply queue <queue>.replies.<ID> (default: random)",
        )

    plc = sub.add_parser(
        "plc",
        help="create a did:plc as Hilt does; serve a PLC directory for development",
        description="did:plc as Hilt uses it. 'plc serve' is a PLC directory for development "
        "only: production resolves did:plc from the real directory (https://plc.directory).",
    )
    psub = plc.add_subparsers(dest="plc_command", metavar="ACTION", required=True)
    cr = psub.add_parser(
        "create",
        help="register a did:plc for a secp256k1 key (rotation key and method 'hilt')",
    )
    cr.add_argument("--key", required=True, metavar="KEY", help="a secp256k1 key: " + _KEY_HELP)
    cr.add_argument(
        "--directory",
        metavar="URL",
        help="the PLC directory to POST to (default FORGE_WORKER_PLC_DIRECTORY, itself "
        "https://plc.directory, the real one: give http://127.0.0.1:2582 for plc serve)",
    )
    cr.add_argument("--json", action="store_true", help="print one JSON document")
    sv = psub.add_parser(
        "serve",
        help="a PLC directory for development only (production uses https://plc.directory)",
        description="A PLC directory for development only: production resolves did:plc "
        "from the real directory (https://plc.directory). POST /{did} stores a genesis "
        "operation once its signature and hash check out; GET /{did} serves the document "
        "in plc.directory's format; an unknown DID is 404.",
    )
    sv.add_argument(
        "--port", type=int, default=2582, metavar="N", help="port (default 2582; 0: any free)"
    )
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address to bind (default 127.0.0.1; 0.0.0.0 inside a container)",
    )
    sv.add_argument(
        "--data",
        metavar="FILE",
        help="keep the operations in FILE (JSON) and reload them at start",
    )
    _setting_flags(sv, ("log_format",))
    return p


def _handler(command: str) -> Handler:
    module, _, func = HANDLERS[command].partition(":")
    handler: Handler = getattr(importlib.import_module(module), func)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``forge-worker`` console script."""
    # pamqp's decoders must not raise on what a publisher wrote, nor recurse out of room on
    # a nested header: every command that reads messages needs this (worker.amqp.guard)
    from worker.amqp import guard

    guard.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {k.removeprefix("cfg_"): v for k, v in vars(args).items() if k.startswith("cfg_")}
    try:
        settings = config.load(overrides=overrides)
        return _handler(args.command)(args, settings)
    except ConfigError as exc:
        print(f"forge-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Unreachable as exc:
        print(f"forge-worker: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
