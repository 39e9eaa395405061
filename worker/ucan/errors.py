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


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
               "\v": "\\v", '"': '\\"', "\\": "\\\\"}  # fmt: skip


def quote(text: str) -> str:
    """``text`` as Go's ``%q`` (``strconv.Quote``) writes it, for messages that must read as
    ucantone's: double quotes, backslash escapes, non-printable characters as ``\\x``/``\\u``."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    out = []
    for ch in text:
        esc = _GO_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'
