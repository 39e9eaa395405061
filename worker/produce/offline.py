"""``--out FILE``: a producer command writes its signed request body to a file instead of
publishing it (``enqueue --out``; ``provision`` takes the same flag).

The file holds exactly the bytes that would be published: the raw ``{"ctn-v1": [...]}``
container of the invocation and its proofs, no header byte. Nothing is published and no
broker connection is made. Publishing the file's bytes later (to the inbox, through the
default exchange, ``content_type`` ``application/vnd.ipld.dag-cbor``, with any ``reply_to``
and ``correlation_id``) is the same request: ``inspect FILE`` shows it, and the worker
answers it as if the command had sent it. It stays valid until its ``exp`` (the command's
``--expires-in``), so give a lifetime that covers the wait before it is published.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from worker.errors import ConfigError
from worker.produce.options import write_atomically
from worker.ucan import CID

#: flags that need the broker, so make no sense with ``--out``: dest -> flag
BROKER_FLAGS = {"wait": "--wait", "receipt": "--receipt", "from_file": "--from"}


class Signed(Protocol):
    """A signed request: the body to publish, its invocation's CID, the task it asks for."""

    @property
    def body(self) -> bytes: ...
    @property
    def cid(self) -> CID: ...
    @property
    def task(self) -> CID: ...


@dataclass(frozen=True, slots=True)
class Written:
    """Where a request body went, for the command's output."""

    path: Path
    size: int
    task: CID
    invocation: CID

    def to_json(self) -> dict[str, Any]:
        return {
            "task": str(self.task),
            "invocation": str(self.invocation),
            "out": str(self.path),
            "bytes": self.size,
        }

    def line(self, queue: str) -> str:
        return (
            f"wrote {self.path} ({self.size} bytes): task {self.task} (invocation "
            f"{self.invocation}); publish its bytes to {queue!r} to send it"
        )


def check_out(args: argparse.Namespace, flags: dict[str, str] | None = None) -> None:
    """Refuse ``--out`` together with flags that need the broker.

    Args:
        args: the parsed command line (``args.out`` set).
        flags: dest -> flag name of the command's broker-only flags (default
            :data:`BROKER_FLAGS`, those the command has).

    Raises:
        ConfigError: one of them is given.
    """
    for dest, flag in (flags or BROKER_FLAGS).items():
        if getattr(args, dest, None):
            raise ConfigError(f"--out writes the request instead of publishing it: drop {flag}")


def write_request(path: str | os.PathLike[str], request: Signed) -> Written:
    """Write ``request.body``, exactly the bytes that would be published, to ``path`` (whole
    or not at all).

    Raises:
        ConfigError: the file cannot be written.
    """
    out = Path(path)
    write_atomically(out, request.body, "--out")
    return Written(out, len(request.body), request.task, request.cid)
