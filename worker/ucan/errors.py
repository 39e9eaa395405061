"""The protocol's exceptions: undecodable bytes versus a token that fails validation.

::

    UcanError
    ├── DecodeError        the bytes are not a token or container we can read
    └── ValidationError    a readable token that ucantone's validator would refuse;
                           ``.name`` is ucantone's error name, ``.message`` a sentence
"""

from __future__ import annotations


class UcanError(Exception):
    """Root of the protocol's errors."""


class DecodeError(UcanError):
    """The bytes are not a token or container we can read; ``str()`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ValidationError(UcanError):
    """A token that ucantone's validator refuses, with ucantone's error name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        #: ucantone's error name, e.g. ``"Expired"``
        self.name = name
        #: a sentence a person can act on
        self.message = message

    def __repr__(self) -> str:
        return f"ValidationError({self.name!r}, {self.message!r})"
