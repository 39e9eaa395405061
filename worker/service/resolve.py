"""did:plc documents from the PLC directory: one kept HTTP client, a TTL cache of successes,
one request in flight per DID.

The consumer resolves a batch's did:plc issuers here *before* validation, so validation stays
a pure function of bytes, documents and the clock (``Resolver.with_documents``). Each DID
ends one of three ways:

* a document (cached for ``ttl`` seconds, successes only, at most ``max_entries`` DIDs);
* a final failure, answered with an error receipt as ucantone answers it (``UnknownError``
  with the text below): the directory does not know the DID (404, 410, or another 4xx), or
  its answer is not a DID document;
* a passing failure (the directory cannot be reached, times out, answers 5xx or 429): never
  an error receipt. The consumer holds the batch and asks again, then sends it through the
  retry tiers like a database outage.

A DID that is not ``did:plc:`` + 24 lowercase base32 characters is never requested: the
validator refuses it with ucantone's ``plc.Parse`` text.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from structlog.typing import FilteringBoundLogger

from worker.ucan import (
    CID,
    DecodeError,
    Delegation,
    DidDocument,
    Invocation,
    parse_plc_document,
    plc_did_problem,
)
from worker.ucan.plc import MAX_DOCUMENT_SIZE
from worker.ucan.validate import MAX_PROOFS

#: seconds one GET may take, connect to last byte (ucantone's resolver allows 10 s)
TIMEOUT: Final = 10.0
#: DIDs whose documents are kept (each document holds at most 64 keys)
MAX_ENTRIES: Final = 10_000
#: requests to the directory at the same time, whatever the batch asks for
MAX_CONCURRENT: Final = 16
#: most distinct did:plc DIDs resolved for one message: a container of many delegations
#: must not make the worker send the directory thousands of requests
MAX_DIDS_PER_MESSAGE: Final = 16
#: seconds between asking a directory that could not answer again (doubling to the second)
RETRY_EVERY: Final = (0.25, 5.0)
#: statuses that mean "not now" rather than "no such DID"
_PASSING_STATUSES: Final = frozenset({408, 425, 429})
#: the most of an error body quoted in a message
_QUOTED: Final = 300


@dataclass(slots=True)
class Resolution:
    """What a batch's did:plc DIDs resolved to."""

    documents: dict[str, DidDocument] = field(default_factory=dict)
    #: final failures: the text the error receipt carries
    failures: dict[str, str] = field(default_factory=dict)
    #: passing failures: why the directory could not answer now
    unavailable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Answer:
    kind: str  # "document", "final" or "passing"
    document: DidDocument | None = None
    text: str = ""


class DidResolver:
    """Resolves did:plc DIDs from one PLC directory (use as ``async with``)."""

    def __init__(
        self,
        directory: str,
        *,
        ttl: float,
        timeout: float = TIMEOUT,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        on_request: Callable[[], object] | None = None,
    ) -> None:
        self.directory = directory.rstrip("/")
        self.ttl = ttl
        self.timeout = timeout
        self.max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, DidDocument]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[_Answer]] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._session: aiohttp.ClientSession | None = None
        #: GET requests sent so far (``on_request`` is called for each too: the metrics)
        self.requests = 0
        self._on_request = on_request

    async def __aenter__(self) -> DidResolver:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"Accept": "application/did+ld+json, application/json"},
            # a DID is not a cookie jar's business, and the directory is one host
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=MAX_CONCURRENT, ttl_dns_cache=300),
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def cached(self, did: str) -> DidDocument | None:
        """The cached document of ``did`` if it is still fresh."""
        entry = self._cache.get(did)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._cache[did]
            return None
        self._cache.move_to_end(did)
        return entry[1]

    async def resolve(self, dids: Iterable[str]) -> Resolution:
        """Resolve every well-formed did:plc among ``dids`` (others are left out)."""
        out = Resolution()
        wanted: list[str] = []
        for did in dict.fromkeys(dids):
            if not did.startswith("did:plc:") or plc_did_problem(did) is not None:
                continue
            doc = self.cached(did)
            if doc is not None:
                out.documents[did] = doc
            else:
                wanted.append(did)
        if wanted:
            answers = await asyncio.gather(*(self._once(did) for did in wanted))
            for did, answer in zip(wanted, answers, strict=True):
                if answer.document is not None:
                    out.documents[did] = answer.document
                elif answer.kind == "final":
                    out.failures[did] = answer.text
                else:
                    out.unavailable[did] = answer.text
        return out

    async def resolve_holding(
        self,
        dids: Iterable[str],
        *,
        hold: float,
        log: FilteringBoundLogger,
        counted: Callable[[str, int], object],
    ) -> Resolution:
        """:meth:`resolve`, asking again for what the directory could not answer (a growing
        pause between) for up to ``hold`` seconds; ``counted(outcome, n)`` gets the totals
        (``document``, ``refused``, ``unavailable``)."""
        resolution = await self.resolve(dids)
        if resolution.unavailable:
            delay, most = RETRY_EVERY
            deadline = time.monotonic() + hold
            log.warning(
                "directory_unavailable",
                dids=len(resolution.unavailable),
                error=next(iter(resolution.unavailable.values())),
            )
            while resolution.unavailable and (left := deadline - time.monotonic()) > 0:
                # the directory gives no sign when it is back: ask again, less and less often
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, most)
                again = await self.resolve(resolution.unavailable)
                resolution.documents.update(again.documents)
                resolution.failures.update(again.failures)
                resolution.unavailable = again.unavailable
            if not resolution.unavailable:
                log.info("directory_back")
        for outcome, n in (
            ("document", len(resolution.documents)),
            ("refused", len(resolution.failures)),
            ("unavailable", len(resolution.unavailable)),
        ):
            if n:
                counted(outcome, n)
        return resolution

    async def _once(self, did: str) -> _Answer:
        """One request in flight per DID, however many batches wait for it."""
        future = self._inflight.get(did)
        if future is None:
            future = asyncio.ensure_future(self._fetch(did))
            self._inflight[did] = future
            future.add_done_callback(lambda _: self._inflight.pop(did, None))
        # shielded: one waiter cancelled (a batch stopping) must not cancel the others'
        return await asyncio.shield(future)

    async def _fetch(self, did: str) -> _Answer:
        if self._session is None:
            raise RuntimeError("cannot resolve: the resolver is not started")
        url = f"{self.directory}/{did}"
        async with self._slots:
            self.requests += 1
            if self._on_request is not None:
                self._on_request()
            try:
                async with self._session.get(url, allow_redirects=False) as resp:
                    body = await resp.content.read(MAX_DOCUMENT_SIZE + 1)
                    status = resp.status
            except TimeoutError:
                return _Answer("passing", text=f"no answer from {self.directory} within "
                               f"{self.timeout:g} s for {did}")  # fmt: skip
            except (aiohttp.ClientError, OSError) as exc:
                return _Answer("passing", text=f"performing HTTP request: {_one_line(exc)}")
        return self._answer(did, status, body)

    def _answer(self, did: str, status: int, body: bytes) -> _Answer:
        if status >= 500 or status in _PASSING_STATUSES:
            return _Answer("passing", text=f"unexpected status: {status} from {self.directory}")
        if status != 200:
            # ucantone's text first (what its server puts in the receipt), then whose DID and
            # what the directory said, so a person can act on it
            said = _said(body)
            return _Answer(
                "final",
                text=f"unexpected status: {status} (the PLC directory at {self.directory} "
                f"for {did}{': ' + said if said else ''})",
            )
        try:
            doc = parse_plc_document(body, did)
        except DecodeError as exc:
            return _Answer("final", text=f"{exc} (from {self.directory} for {did})")
        self._cache[did] = (self._clock() + self.ttl, doc)
        self._cache.move_to_end(did)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return _Answer("document", document=doc)


def plc_issuers(
    jobs: Iterable[tuple[Invocation, Mapping[CID, Delegation]]], refused: dict[str, str]
) -> set[str]:
    """The did:plc issuers of a message's invocations and of the proofs they name, at most
    :data:`MAX_DIDS_PER_MESSAGE`; the rest go to ``refused``, answered as unresolvable."""
    dids: set[str] = set()
    for inv, proofs in jobs:
        issuers = [inv.iss]
        issuers += [p.iss for cid in inv.prf[:MAX_PROOFS] if (p := proofs.get(cid))]
        for did in issuers:
            if not did.startswith("did:plc:") or did in dids:
                continue
            if len(dids) < MAX_DIDS_PER_MESSAGE:
                dids.add(did)
            else:
                refused[did] = (
                    f"cannot resolve {did}: a message may name at most "
                    f"{MAX_DIDS_PER_MESSAGE} did:plc issuers"
                )
    return dids


def _said(body: bytes) -> str:
    """The directory's own message (``{"message": ...}``), or the start of the body."""
    text = body[: _QUOTED * 4].decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        text = doc["message"]
    text = " ".join(text.split())
    return text[:_QUOTED]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:_QUOTED]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
