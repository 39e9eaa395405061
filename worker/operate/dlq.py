"""``forge-worker dlq list|show|replay|purge``: the command, over the modules of this package."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

import aiormq
import asyncpg
from aio_pika.abc import AbstractConnection

from worker.amqp import topology
from worker.amqp.connect import connect, redact
from worker.config import Settings
from worker.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, Unreachable
from worker.operate.audit import AuditLog
from worker.operate.deadletters import (
    DeadLetter,
    Selection,
    format_dead_letters,
    parse_since,
    read_dead_letters,
)
from worker.operate.purge import purge
from worker.operate.replay import ReplayFailed, replay


def _show_text(dl: DeadLetter, copies: int) -> str:
    doc = dl.to_json(full=True)
    lines = [f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in doc.items()]
    if copies > 1:
        lines.append(f"copies: {copies} messages share this id")
    return "\n".join(lines)


def _selection(args: argparse.Namespace) -> Selection | str:
    """The selection the flags ask for, or a usage error."""
    ids = frozenset(getattr(args, "id", None) or [])
    reason = getattr(args, "reason", None)
    since_raw = getattr(args, "since", None)
    limit = getattr(args, "limit", None)
    if limit is not None and limit <= 0:
        return f"--limit must be positive, got {limit}"
    try:
        since = parse_since(since_raw) if since_raw is not None else None
    except ValueError as exc:
        return f"--since: {exc}"
    sel = Selection(ids=ids, reason=reason, since=since, limit=limit)
    if getattr(args, "all", False) and sel.filtered:
        return "--all selects every dead letter: drop --id/--reason/--since, or drop --all"
    if args.dlq_command in ("replay", "purge") and not (
        getattr(args, "all", False) or sel.filtered
    ):
        return f"dlq {args.dlq_command}: say which dead letters: --all, --id, --reason or --since"
    return sel


def _ask(prompt: str) -> bool:
    print(prompt, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


async def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    sel = _selection(args)
    if isinstance(sel, str):
        print(f"forge-worker: {sel}", file=sys.stderr)
        return EXIT_USAGE
    action: str = args.dlq_command
    interactive = sys.stdin.isatty()
    if action == "purge" and not args.yes and not interactive:
        # --all too: deleting every dead letter is the last thing to do without a question
        print(
            "forge-worker: dlq purge: refusing to delete without confirmation on a "
            "non-interactive input; add --yes",
            file=sys.stderr,
        )
        return EXIT_USAGE
    dlq = topology.dead_letter_name(settings.queue)
    size = settings.max_message_size
    connection = await connect(settings.amqp_url)
    try:
        async with contextlib.AsyncExitStack() as stack:
            audit: AuditLog | None = None
            if action in ("replay", "purge") and not getattr(args, "dry_run", False):
                # before anything moves: a replay without its audit trail is not allowed
                audit = await stack.enter_async_context(AuditLog.open(settings.database_url))
            try:
                return await _dlq_action(args, settings, connection, sel, audit, dlq, size)
            except LookupError as exc:
                print(f"forge-worker: {exc}", file=sys.stderr)
                return EXIT_CHECK_FAILED
            except ReplayFailed as exc:
                print(f"forge-worker: {exc}", file=sys.stderr)
                return EXIT_CHECK_FAILED
    except (OSError, TimeoutError, aiormq.exceptions.AMQPConnectionError) as exc:
        raise Unreachable(f"lost the broker at {redact(settings.amqp_url)}: {exc}") from None
    except (asyncpg.exceptions.PostgresError, asyncpg.exceptions.InterfaceError) as exc:
        raise Unreachable(f"cannot write the audit trail: {exc}") from None
    finally:
        await connection.close()


async def _dlq_action(
    args: argparse.Namespace,
    settings: Settings,
    connection: AbstractConnection,
    sel: Selection,
    audit: AuditLog | None,
    dlq: str,
    size: int,
) -> int:
    action: str = args.dlq_command
    as_json: bool = args.json
    if action == "list":
        dls = await read_dead_letters(connection, dlq, selection=sel, max_size=size)
        if as_json:
            doc = {"queue": dlq, "count": len(dls), "dead_letters": [d.to_json() for d in dls]}
            print(json.dumps(doc))
        else:
            print(format_dead_letters(dls))
        return EXIT_OK
    if action == "show":
        found = await read_dead_letters(
            connection, dlq, selection=Selection(ids=frozenset([args.id])), max_size=size
        )
        if not found:
            print(f"forge-worker: no dead letter {args.id!r} in {dlq!r}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        if as_json:
            print(json.dumps({**found[0].to_json(full=True), "copies": len(found)}))
        else:
            print(_show_text(found[0], len(found)))
        return EXIT_OK
    if action == "replay":
        dry: bool = args.dry_run
        result = await replay(
            connection,
            dead_letter_queue=dlq,
            inbox=settings.queue,
            selection=sel,
            audit=audit,
            dry_run=dry,
            rate=args.rate,
            max_size=size,
            on_moved=None if as_json else lambda d: print(f"replayed {d.id} ({d.reason})"),
        )
        if as_json:
            print(
                json.dumps(
                    {
                        "action": "replay",
                        "dry_run": dry,
                        "from": dlq,
                        "to": settings.queue,
                        "scanned": result.scanned,
                        "selected": len(result.selected),
                        "replayed": result.done,
                        "dead_letters": [d.to_json() for d in result.selected],
                    }
                )
            )
        elif dry:
            print(format_dead_letters(result.selected))
            print(
                f"dry run: would replay {len(result.selected)} of {result.scanned} into "
                f"{settings.queue}"
            )
        else:
            print(f"replayed {result.done} of {result.scanned} into {settings.queue}")
        return EXIT_OK
    # purge
    ask_first = not args.yes

    async def confirm(dls: list[DeadLetter]) -> bool:
        print(format_dead_letters(dls), file=sys.stderr)
        prompt = f"delete these {len(dls)} dead letters from {dlq}? [y/N] "
        return await asyncio.to_thread(_ask, prompt)

    result = await purge(
        connection,
        dead_letter_queue=dlq,
        selection=sel,
        audit=audit,
        confirm=confirm if ask_first else None,
        max_size=size,
    )
    if as_json:
        print(
            json.dumps(
                {
                    "action": "purge",
                    "from": dlq,
                    "scanned": result.scanned,
                    "selected": len(result.selected),
                    "purged": result.done,
                    "dead_letters": [d.to_json() for d in result.selected],
                }
            )
        )
    else:
        print(f"purged {result.done} of {result.scanned} from {dlq}")
    if result.selected and not result.done:
        return EXIT_CHECK_FAILED  # the operator said no
    return EXIT_OK


def dlq_main(args: argparse.Namespace, settings: Settings) -> int:
    """``forge-worker dlq list|show|replay|purge``."""
    return asyncio.run(_dlq(args, settings))
