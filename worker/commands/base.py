"""What every command handler shares: the error it answers with, what it decides, and the
facts of the service it decides them with."""

from __future__ import annotations

from dataclasses import dataclass


class CommandError(Exception):
    """The invocation is not acceptable to its command: ``name`` and ``message`` go in the
    error receipt (ucantone's ``{name, message}``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one invocation came to: ``ok`` (the success value; ``None`` is ``{}``) or
    ``error`` (``(name, message)``, answered with an error receipt and never stored)."""

    ok: object = None
    error: tuple[str, str] | None = None

    @classmethod
    def refused(cls, name: str, message: str) -> Outcome:
        return cls(error=(name, message))


@dataclass(frozen=True, slots=True)
class Context:
    """The service's facts a handler decides with."""

    #: the DID the service acts as (an audience, a provider)
    service_did: str
    #: ``/provider/add`` for an account with no ``customer`` row is allowed
    allow_provision_without_plan: bool = False
