"""A PLC directory of the tests' own, over real HTTP (aiohttp.web on 127.0.0.1, a free port).

It serves ``GET /{did}`` exactly as plc.directory does today: a document per DID (bytes
given by the test, e.g. the ucantone-go vector's, or rendered with
``worker.ucan.render_plc_document``), ``application/did+ld+json``; an unknown DID is a 404
``{"message": "DID not registered: <did>"}``. The test can take it down (503, or a hang, or
connections cut) and count the requests per DID.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web


class StandInDirectory:
    """The directory; ``url`` once started."""

    def __init__(self) -> None:
        self.documents: dict[str, bytes] = {}
        #: did -> (status, body) served instead of the document
        self.answers: dict[str, tuple[int, bytes]] = {}
        #: while set, every request is answered 503
        self.down = False
        #: while set, requests hang until cleared (a directory that does not answer)
        self.hang = asyncio.Event()
        self.hang.set()
        self.gets: Counter[str] = Counter()
        self._asked = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def serve(self, did: str, document: bytes) -> None:
        self.documents[did] = document

    async def _get(self, request: web.Request) -> web.StreamResponse:
        did = request.match_info["did"]
        self.gets[did] += 1
        async with self._asked:
            self._asked.notify_all()
        await self.hang.wait()
        if self.down:
            return web.json_response({"message": "service unavailable"}, status=503)
        if did in self.answers:
            status, body = self.answers[did]
            return web.Response(status=status, body=body, content_type="application/json")
        doc = self.documents.get(did)
        if doc is None:
            return web.json_response({"message": f"DID not registered: {did}"}, status=404)
        return web.Response(body=doc, content_type="application/did+ld+json")

    async def asked(self, did: str, times: int = 1) -> None:
        """Wait until ``did`` was asked for ``times`` times in all."""
        async with self._asked:
            await self._asked.wait_for(lambda: self.gets[did] >= times)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{did}", self._get)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.hang.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def directory() -> AsyncIterator[StandInDirectory]:
    d = StandInDirectory()
    await d.start()
    yield d
    await d.stop()


def document_json(did: str, keys: dict[str, str]) -> bytes:
    """A document in the directory's format for ``keys`` (method name -> multibase key)."""
    return json.dumps(
        {
            "@context": [
                "https://www.w3.org/ns/did/v1",
                "https://w3id.org/security/multikey/v1",
                "https://w3id.org/security/suites/secp256k1-2019/v1",
            ],
            "id": did,
            "alsoKnownAs": [],
            "verificationMethod": [
                {
                    "id": f"{did}#{name}",
                    "type": "Multikey",
                    "controller": did,
                    "publicKeyMultibase": key,
                }
                for name, key in keys.items()
            ],
            "service": [],
        },
        separators=(",", ":"),
    ).encode()
