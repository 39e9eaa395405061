"""Caches bounded by the memory their entries hold, not by how many there are.

A cache filled from what arrives on the inbox must be bounded by the bytes it keeps: an
entry count bounds nothing when one entry can be ~70× the bytes that made it (a 4 KiB
token of empty maps decodes to ~280 KiB). :class:`SizedLRU` keeps a total of the sizes
its callers account for each entry and evicts the least recently used past its bound;
:func:`footprint` estimates the memory a decoded value holds, for those sizes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Hashable
from typing import Any, Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: what one dict entry of the cache itself costs (its slot and the (value, size) pair)
ENTRY_OVERHEAD: Final = 120


class SizedLRU(Generic[K, V]):
    """A least-recently-used cache whose entries' accounted sizes total at most ``max_bytes``.

    Sizes are the caller's (an estimate of the memory an entry holds, key included); an
    entry larger than ``max_entry`` is not kept at all. Not thread-safe (one event loop).
    """

    __slots__ = ("_data", "max_bytes", "max_entries", "max_entry", "total")

    def __init__(
        self, max_bytes: int, *, max_entry: int | None = None, max_entries: int | None = None
    ) -> None:
        self._data: dict[K, tuple[V, int]] = {}
        #: the bound on the total of the accounted sizes
        self.max_bytes = max_bytes
        #: the largest entry kept (default: a sixteenth of ``max_bytes``)
        self.max_entry = max_bytes // 16 if max_entry is None else max_entry
        #: an optional bound on the number of entries as well
        self.max_entries = max_entries
        #: the total of the accounted sizes of the entries kept
        self.total = 0

    def get(self, key: K) -> V | None:
        """The value kept for ``key`` (now the most recently used), or None."""
        found = self._data.pop(key, None)
        if found is None:
            return None
        self._data[key] = found  # most recently used last: evicted last
        return found[0]

    def put(self, key: K, value: V, size: int) -> bool:
        """Keep ``value`` for ``key``, accounted as ``size`` bytes, evicting the least
        recently used entries past the bounds. False when it is too large to keep."""
        size += ENTRY_OVERHEAD
        old = self._data.pop(key, None)
        if old is not None:
            self.total -= old[1]
        if size > self.max_entry:
            return False
        self._data[key] = (value, size)
        self.total += size
        data = self._data
        while self.total > self.max_bytes or (
            self.max_entries is not None and len(data) > self.max_entries
        ):
            self.total -= data.pop(next(iter(data)))[1]  # the least recently used
        return True

    def clear(self) -> None:
        """Forget every entry."""
        self._data.clear()
        self.total = 0

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __getitem__(self, key: K) -> V:
        """The value kept for ``key``, without making it the most recently used."""
        return self._data[key][0]

    def __len__(self) -> int:
        return len(self._data)


#: what :func:`footprint` counts for an object it does not look into
_OPAQUE: Final = 64


def footprint(value: object, limit: int = 1 << 62) -> int:
    """An estimate of the bytes ``value`` holds: ``sys.getsizeof`` of every object reached
    through containers, slotted objects (dataclasses with ``__slots__``) and compiled
    regexes (code and source), each counted once. Stops counting (and returns more than
    ``limit``) once past ``limit``, so the walk costs at most about ``limit / 50`` objects.
    """
    seen: set[int] = set()
    stack: list[Any] = [value]
    total = 0
    getsizeof = sys.getsizeof
    while stack:
        v = stack.pop()
        i = id(v)
        if i in seen:
            continue
        seen.add(i)
        total += getsizeof(v, _OPAQUE)
        if total > limit:
            return total
        t = type(v)
        if t is dict:
            stack.extend(v.keys())
            stack.extend(v.values())
        elif t is list or t is tuple:
            stack.extend(v)
        elif t is str or t is bytes or t is int or v is None or t is bool or t is float:
            continue
        elif t is re.Pattern:
            stack.append(v.pattern)  # its size counts the compiled code, not the source
        else:
            for cls in t.__mro__:
                slots = getattr(cls, "__slots__", ())
                for name in (slots,) if type(slots) is str else slots:
                    got = getattr(v, name, None)
                    if got is not None:
                        stack.append(got)
    return total
