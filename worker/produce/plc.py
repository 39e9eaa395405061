"""``plc create`` and ``plc serve``: a tenant's did:plc made as Hilt makes it, and a PLC
directory **for development only**.

Production resolves did:plc from the real directory (``https://plc.directory``, the default
of ``FORGE_WORKER_PLC_DIRECTORY``); Hilt creates its tenants there. ``plc serve`` stands in
for it on a development machine or in the compose ``dev`` profile, where the real directory
must not be written to and cannot be reached: the only published build of the reference
server renders an older document format that ucantone refuses
(``shared/reference/provider-add.md`` §4).

``plc serve`` (aiohttp, 127.0.0.1 by default):

* ``POST /{did}``: the genesis operation's DAG-JSON, as ucantone's
  ``plc.DirectoryClient.Update`` sends it. Parsed (``parse_plc_operation``) and checked
  (``verify_genesis_op``: no ``prev``, secp256k1 keys, ``sig`` by a rotation key, ``did`` =
  its hash), then stored: 200 ``OK``, as the reference server answers. The same operation
  again is 200 too (a DID is the hash of its genesis operation, so there is no other).
  Refused with 400 ``{"message": ...}`` naming what failed. Only genesis operations: no
  updates or tombstones.
* ``GET /{did}``: the document in plc.directory's current format (``render_plc_document``),
  ``application/did+ld+json``; also ``/{did}/data``, ``/{did}/log`` and ``/{did}/log/last``
  as the reference server shapes them, and ``/_health``.
* an unknown DID: 404 ``{"message": "DID not registered: <did>"}``, the reference server's
  answer; a DID that is not ``did:plc:`` + 24 base32 characters: 400 (ucantone's
  ``plc.Parse`` text).
* bodies over 64 KiB: 413; at most :data:`MAX_DIDS` DIDs; one log line per request.
* ``--data FILE`` keeps the operations as JSON (rewritten whole, atomically, after each new
  DID) and reloads them at start, checking each again.

``plc create`` builds the genesis operation for a secp256k1 key as Hilt's tenant service
does (``plc.New(signer, WithRotationKeys(key), WithVerificationMethods({"hilt": key}))``:
``create_genesis_op``), POSTs it to ``{directory}/{did}`` as ucantone does, and prints the
did:plc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from structlog.typing import FilteringBoundLogger

from worker import log as logs
from worker.config import Settings
from worker.errors import EXIT_CHECK_FAILED, EXIT_OK, ConfigError, Unreachable, WorkerError
from worker.keyfile import read_key
from worker.ucan import (
    DecodeError,
    PlcOperation,
    create_genesis_op,
    parse_plc_operation,
    plc_did_problem,
    render_plc_document,
    verify_genesis_op,
)
from worker.ucan.plc import MAX_DOCUMENT_SIZE

#: the reference server's port, and the compose ``dev`` profile's
DEFAULT_PORT: Final = 2582
DEFAULT_HOST: Final = "127.0.0.1"
#: what ``GET /{did}`` answers with, as plc.directory
DID_DOCUMENT_TYPE: Final = "application/did+ld+json"
#: largest request body read (an operation is under 1 KiB; the reference server takes 100 kB)
MAX_BODY: Final = MAX_DOCUMENT_SIZE
#: most DIDs one development directory holds (its memory and its data file stay bounded)
MAX_DIDS: Final = 100_000
#: seconds ``plc create`` waits for the directory (ucantone's client waits 10 s)
TIMEOUT: Final = 10.0
#: the most of a refusal's body quoted
_QUOTED: Final = 300
#: said wherever the server is offered
DEVELOPMENT_ONLY: Final = (
    "for development only: production resolves did:plc from the real directory "
    "(https://plc.directory)"
)
_DATA_FORMAT: Final = "forge-worker plc serve operations, v1"


class DirectoryRefused(WorkerError):
    """The PLC directory answered a POST with something other than 200."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"the PLC directory at {url} refused it: {status} {message}")
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True, slots=True)
class Entry:
    """One DID the directory holds: its genesis operation and when it arrived."""

    op: PlcOperation
    created_at: str


class Store:
    """The operations of a development directory, by DID; kept in ``path`` when given."""

    def __init__(self, path: Path | None = None, *, max_dids: int = MAX_DIDS) -> None:
        self.path = path
        self.max_dids = max_dids
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, did: str) -> Entry | None:
        return self._entries.get(did)

    @classmethod
    def load(cls, path: Path, *, max_dids: int = MAX_DIDS) -> Store:
        """The store kept in ``path`` (empty when the file does not exist yet), every
        operation checked again as when it was posted.

        Raises:
            ConfigError: the file cannot be read, is not what ``plc serve`` writes, or holds
                an operation that does not verify; or its directory does not exist.
        """
        store = cls(path, max_dids=max_dids)
        if not path.parent.is_dir():
            raise ConfigError(f"--data: the directory of {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return store
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--data: cannot read {str(path)!r}: {exc}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--data: {str(path)!r} is not JSON ({exc.msg})") from None
        entries = doc.get("operations") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(
                f'--data: {str(path)!r} has no "operations" list (not written by plc serve)'
            )
        for i, item in enumerate(entries):
            try:
                did, value, created = item["did"], item["operation"], item["createdAt"]
                op = parse_plc_operation(json.dumps(value).encode())
                verify_genesis_op(op, did)
            except (KeyError, TypeError) as exc:
                raise ConfigError(
                    f"--data: {str(path)!r}: operations[{i}] lacks did, operation or createdAt"
                    f" ({exc})"
                ) from None
            except DecodeError as exc:
                raise ConfigError(f"--data: {str(path)!r}: operations[{i}]: {exc}") from None
            store._entries[did] = Entry(op, str(created))
        return store

    def add(self, did: str, op: PlcOperation) -> bool:
        """Keep ``op`` (checked by the caller) for ``did``; False when it was there already.

        Raises:
            OverflowError: the store holds :attr:`max_dids` DIDs already.
            OSError: the data file cannot be written (the operation is not kept).
        """
        if did in self._entries:
            return False
        if len(self._entries) >= self.max_dids:
            raise OverflowError(f"this development directory holds at most {self.max_dids} DIDs")
        created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self._entries[did] = Entry(op, created)
        try:
            self._save()
        except OSError:
            del self._entries[did]
            raise
        return True

    def _save(self) -> None:
        if self.path is None:
            return
        doc = {
            "format": _DATA_FORMAT,
            "note": DEVELOPMENT_ONLY,
            "operations": [
                {"did": did, "operation": e.op.value(), "createdAt": e.created_at}
                for did, e in self._entries.items()
            ],
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- the server


def _json(status: int, value: object) -> web.Response:
    """Compact JSON, as the reference server's ``res.json`` writes it."""
    return web.json_response(value, status=status, dumps=_compact)


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _message(status: int, text: str) -> web.Response:
    return _json(status, {"message": text})


#: what a handler tells the request's log line (the DID, what became of it); one per request
_NOTES: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("plc_request_notes")


def _note(**fields: str) -> None:
    notes = _NOTES.get(None)
    if notes is not None:
        notes.update(fields)


def _did_of(request: web.Request) -> tuple[str, web.Response | None]:
    """The path's DID, and the 400 to answer when it is not a did:plc."""
    did = request.match_info["did"]
    _note(did=did[:120])
    problem = plc_did_problem(did)
    if problem is None:
        return did, None
    return did, _message(400, f"invalid DID {did[:120]!r}: {problem}")


def _known(request: web.Request) -> tuple[str, Entry | None, web.Response | None]:
    """The path's DID and its entry, or the 400/404 to answer."""
    did, refusal = _did_of(request)
    if refusal is not None:
        return did, None, refusal
    entry = request.app[STORE].get(did)
    if entry is None:
        return did, None, _message(404, f"DID not registered: {did}")
    return did, entry, None


async def _document(request: web.Request) -> web.Response:
    did, entry, refusal = _known(request)
    if entry is None:
        assert refusal is not None
        return refusal
    return web.Response(body=render_plc_document(did, entry.op), content_type=DID_DOCUMENT_TYPE)


async def _data(request: web.Request) -> web.Response:
    did, entry, refusal = _known(request)
    if entry is None:
        assert refusal is not None
        return refusal
    op = entry.op.value()
    keys = ("verificationMethods", "rotationKeys", "alsoKnownAs", "services")
    return _json(200, {"did": did} | {k: op[k] for k in keys})


async def _log(request: web.Request) -> web.Response:
    _, entry, refusal = _known(request)
    if entry is None:
        assert refusal is not None
        return refusal
    return _json(200, [entry.op.value()])


async def _last(request: web.Request) -> web.Response:
    _, entry, refusal = _known(request)
    if entry is None:
        assert refusal is not None
        return refusal
    return _json(200, entry.op.value())


async def _create(request: web.Request) -> web.Response:
    did, refusal = _did_of(request)
    if refusal is not None:
        return refusal
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _message(413, f"request body over {MAX_BODY} bytes")
    body = await request.read()  # a body without a length stops at MAX_BODY too (413)
    try:
        op = parse_plc_operation(body)
    except DecodeError as exc:
        return _message(400, str(exc))
    if op.prev is not None:
        return _message(
            400,
            "this development directory takes genesis operations only (prev null): "
            "updates and tombstones are not supported",
        )
    try:
        verify_genesis_op(op, did)
    except DecodeError as exc:
        return _message(400, str(exc))
    try:
        added = request.app[STORE].add(did, op)
    except OverflowError as exc:
        return _message(507, str(exc))
    except OSError as exc:
        _note(note=f"cannot write the data file: {exc}")
        return _message(500, "cannot keep the operation: the data file cannot be written")
    _note(note="created" if added else "known already")
    return web.Response(text="OK")


async def _health(request: web.Request) -> web.Response:
    return _json(200, {"version": "forge-worker-dev", "dids": len(request.app[STORE])})


async def _index(request: web.Request) -> web.Response:
    return _message(200, f"forge-worker plc serve: a PLC directory {DEVELOPMENT_ONLY}")


STORE: Final = web.AppKey("store", Store)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _request_logger(log: FilteringBoundLogger) -> Any:
    """One line per request (method, path, status, milliseconds, and the DID and what
    became of it), every error answered as JSON ``{"message"}``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        notes: dict[str, str] = {}
        _NOTES.set(notes)  # each request runs in a task of its own: a context of its own
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # no route (404), method (405), too large (413)
            text = exc.text if exc.status == 413 else exc.reason
            response = _message(exc.status, text or exc.reason)
        except Exception as exc:
            notes["note"] = f"{type(exc).__name__}: {exc}"
            response = _message(500, "Internal Server Error")
        log.info(
            "plc_request",
            method=request.method,
            path=request.path[:200],
            status=response.status,
            ms=round((time.monotonic() - started) * 1000, 1),
            **notes,
        )
        return response

    return middleware


def directory_app(store: Store, log: FilteringBoundLogger) -> web.Application:
    """The development directory's routes over ``store``."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_request_logger(log)])
    app[STORE] = store
    app.router.add_get("/", _index)
    app.router.add_get("/_health", _health)
    app.router.add_get("/{did}", _document)
    app.router.add_post("/{did}", _create)
    app.router.add_get("/{did}/data", _data)
    app.router.add_get("/{did}/log", _log)
    app.router.add_get("/{did}/log/last", _last)
    return app


@dataclass(frozen=True, slots=True)
class Server:
    """A serving development directory."""

    host: str
    port: int
    store: Store

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextlib.asynccontextmanager
async def serving(
    store: Store,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    log: FilteringBoundLogger | None = None,
) -> AsyncIterator[Server]:
    """Serve ``store`` on ``host:port`` (0: a free port) while entered.

    Raises:
        OSError: the port cannot be bound.
    """
    app = directory_app(store, log or logs.get_logger())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield Server(host, int(runner.addresses[0][1]), store)
    finally:
        await runner.cleanup()


def serve_main(args: argparse.Namespace, settings: Settings) -> int:
    """``plc serve``: the development directory until SIGTERM or SIGINT."""
    logs.configure(settings.log_format)
    log = logs.get_logger()
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: expected 0 to 65535, got {args.port}")
    store = Store.load(Path(args.data)) if args.data else Store()
    return asyncio.run(_serve(store, args.host, args.port, log, args.data))


async def _serve(
    store: Store, host: str, port: int, log: FilteringBoundLogger, data: str | None
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with serving(store, host=host, port=port, log=log) as server:
            log.info(
                "plc_directory_serving",
                url=server.url,
                dids=len(store),
                data=data,
                note=DEVELOPMENT_ONLY,
            )
            await stop.wait()
    except OSError as exc:
        raise ConfigError(
            f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    log.info("plc_directory_stopped", dids=len(store))
    return EXIT_OK


# --------------------------------------------------------------------------- the client


def check_directory(url: str, what: str) -> str:
    """``url`` without a trailing ``/`` when it is an http(s) URL with a host.

    Raises:
        ConfigError: it is not.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what}: expected an http(s) URL such as http://127.0.0.1:2582")
    return url.rstrip("/")


async def post_operation(
    directory: str,
    did: str,
    op: PlcOperation,
    *,
    timeout: float = TIMEOUT,  # noqa: ASYNC109
) -> None:
    """POST ``op`` to ``{directory}/{did}`` as ucantone's ``DirectoryClient.Update`` does
    (its DAG-JSON, ``Content-Type: application/json``); 200 is success.

    Raises:
        DirectoryRefused: any other status, with the directory's message.
        Unreachable: the directory cannot be reached or does not answer in time.
    """
    url = f"{directory.rstrip('/')}/{did}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.post(
                url, data=op.to_dag_json(), headers={"Content-Type": "application/json"}
            ) as response,
        ):
            if response.status == 200:
                return
            body = await response.content.read(4096)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Unreachable(
            f"cannot reach the PLC directory at {directory}: {type(exc).__name__}: {exc}"
        ) from None
    raise DirectoryRefused(directory, response.status, _refusal_text(body))


def _refusal_text(body: bytes) -> str:
    """The ``message`` of a JSON refusal, else the body's start."""
    text = body.decode("utf-8", "replace")
    with contextlib.suppress(ValueError):
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("message"), str):
            text = doc["message"]
    text = " ".join(text.split())
    return text[:_QUOTED] + ("…" if len(text) > _QUOTED else "")


def create_main(args: argparse.Namespace, settings: Settings) -> int:
    """``plc create``: a did:plc for a secp256k1 key, registered at the directory."""
    signer = read_key(args.key)
    if signer.kind != "secp256k1":
        raise ConfigError(
            f"--key: a did:plc is created with a secp256k1 key (its rotation key and its "
            f"method 'hilt'), this one is {signer.kind}: make one with "
            "forge-worker keygen --type secp256k1"
        )
    directory = check_directory(args.directory or settings.plc_directory, "--directory")
    op = create_genesis_op(signer)
    did = op.did
    doc: dict[str, Any] = {
        "did": did,
        "key_did": signer.key_did,
        "directory": directory,
        "op_cid": str(op.cid),
        "ok": True,
        "error": None,
    }
    try:
        asyncio.run(post_operation(directory, did, op))
    except DirectoryRefused as exc:
        doc["ok"] = False
        doc["error"] = {"name": "DirectoryRefused", "status": exc.status, "message": exc.message}
        if args.json:
            print(json.dumps(doc))
        else:
            print(f"error DirectoryRefused: {exc} ({did})", file=sys.stderr)
        return EXIT_CHECK_FAILED
    if args.json:
        print(json.dumps(doc))
    else:
        print(did)
        print(
            f"forge-worker plc create: {did} registered at {directory}; the key "
            f"{signer.key_did} signs as it (e.g. provision --as {did})",
            file=sys.stderr,
        )
    return EXIT_OK


def plc_main(args: argparse.Namespace, settings: Settings) -> int:
    """``plc create`` or ``plc serve``."""
    if args.plc_command == "serve":
        return serve_main(args, settings)
    return create_main(args, settings)
