"""Acks with ``multiple=True`` over contiguous delivery tags, and the progress they make."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any


class AckTracker:
    """Acks with ``multiple=True`` only over delivery tags with nothing unsettled below them.

    Delivery tags are per channel; a channel lost with its messages (the broker requeues
    them) is forgotten. It also keeps the time of the last progress (a delivery acked or
    given back, or the first one of an idle spell), for the readiness check that notices a
    worker whose deliveries stopped being settled (:meth:`stalled_for`).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._open: dict[Any, set[int]] = {}
        self._done: dict[Any, set[int]] = {}
        self._clock = clock
        self._progress = clock()

    def received(self, channel: Any, tag: int) -> None:
        if not self.unsettled():
            self._progress = self._clock()  # pending from now on
        self._open.setdefault(channel, set()).add(tag)

    def forget(self, channel: Any, tag: int) -> int | None:
        """The message was settled another way (nack); returns the tag to ack with
        ``multiple=True`` that this unblocked, if any."""
        self._open.get(channel, set()).discard(tag)
        self._progress = self._clock()
        return self.done(channel, ())

    def done(self, channel: Any, tags: Sequence[int]) -> int | None:
        """Mark ``tags`` ready to ack; returns the tag to ack with ``multiple=True``, if any."""
        done = self._done.setdefault(channel, set())
        done.update(tags)
        pending = self._open.get(channel, set()) - done
        low = min(pending) if pending else None
        ackable = [t for t in done if low is None or t < low]
        if not ackable:
            return None
        top = max(ackable)
        done.difference_update(ackable)
        # a channel dropped meanwhile (its ack failed) is no longer tracked
        self._open.get(channel, set()).difference_update(ackable)
        self._progress = self._clock()
        return top

    def drop_channel(self, channel: Any) -> None:
        self._open.pop(channel, None)
        self._done.pop(channel, None)
        self._progress = self._clock()

    def unsettled(self) -> int:
        return sum(len(v) for v in self._open.values())

    def stalled_for(self) -> float:
        """Seconds without progress while deliveries are pending (0 when none is)."""
        return self._clock() - self._progress if self.unsettled() else 0.0
