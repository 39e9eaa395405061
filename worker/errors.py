"""The worker's one exception hierarchy, split by what the consumer does with the message.

::

    WorkerError
    ├── ConfigError          bad configuration: one line naming the variable, exit 2
    ├── Unreachable          broker or database cannot be reached at start-up: exit 3
    ├── Rejected             this message can never succeed: dead-letter it, never retry
    │   └── Undecodable      no invocation can be read from the body
    └── Transient            a passing failure (database down, publish unconfirmed,
                             timeout): delayed retry through the retry queues

Protocol failures (a bad signature, an expired proof, a policy mismatch) are not
worker errors: they are :class:`worker.ucan.errors.ValidationError`, answered with
a signed error receipt and acked.
"""

from __future__ import annotations

from typing import Final

#: exit codes of every command (CONTRACT §7)
EXIT_OK: Final = 0
#: a check failed (an invalid invocation in ``inspect``, a receipt with an error, ...)
EXIT_CHECK_FAILED: Final = 1
#: usage or configuration error
EXIT_USAGE: Final = 2
#: the broker or the database cannot be reached
EXIT_UNREACHABLE: Final = 3


class WorkerError(Exception):
    """Root of all worker errors."""


class ConfigError(WorkerError):
    """A configuration value is missing or malformed; the message names the variable."""


class Unreachable(WorkerError):
    """The broker or the database cannot be reached."""


class Rejected(WorkerError):
    """The message can never succeed: dead-letter it with this reason, never retry."""

    #: short machine-readable reason written to the dead letter's headers
    reason: str = "rejected"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class Undecodable(Rejected):
    """No invocation could be read from the request body."""

    reason = "undecodable"


class Transient(WorkerError):
    """A passing failure; the message is retried later with a growing delay."""
