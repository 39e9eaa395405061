"""What every command handler shares: the error a handler answers with."""

from __future__ import annotations


class CommandError(Exception):
    """The invocation is not acceptable to its command: ``name`` and ``message`` go in the
    error receipt (ucantone's ``{name, message}``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message
