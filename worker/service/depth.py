"""The queue gauges of ``/metrics``: ready messages and consumers of the worker's queues."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from types import TracebackType

from aio_pika.abc import AbstractConnection

from worker import log
from worker.amqp import topology
from worker.amqp.queues import QueueDepth, queue_depths
from worker.config import Settings
from worker.service.metrics import Metrics


class DepthPoller:
    """Polls ready messages and consumers of the worker's queues into
    ``Metrics.queue_depth`` / ``Metrics.queue_consumers`` (labelled by queue name).

    Runs while entered; each round uses raw channels of its own (a missing queue closes
    one) and never touches the worker's channels. A round that fails (the broker is
    reconnecting) is skipped and logged; a missing queue has its series removed.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        queues: Sequence[str],
        metrics: Metrics,
        *,
        interval: float = 15.0,
    ) -> None:
        self._connection = connection
        self.queues = list(queues)
        self._metrics = metrics
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._round = asyncio.Condition()
        #: completed rounds (successful or not)
        self.rounds = 0
        #: the last round's error, if it failed
        self.last_error: BaseException | None = None

    @classmethod
    def for_settings(
        cls,
        connection: AbstractConnection,
        settings: Settings,
        metrics: Metrics,
        *,
        interval: float = 15.0,
    ) -> DepthPoller:
        """A poller of the inbox, its retry tiers and its dead-letter queue."""
        names = [settings.queue, *topology.retry_names(settings.queue, settings.retry_delays)]
        names.append(topology.dead_letter_name(settings.queue))
        return cls(connection, names, metrics, interval=interval)

    async def poll_once(self) -> dict[str, QueueDepth | None]:
        """One round: passive declares, then the gauges."""
        depths = await queue_depths(self._connection, self.queues)
        for name, depth in depths.items():
            if depth is None:
                for gauge in (self._metrics.queue_depth, self._metrics.queue_consumers):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name)
                continue
            self._metrics.queue_depth.labels(queue=name).set(depth.ready)
            self._metrics.queue_consumers.labels(queue=name).set(depth.consumers)
        return depths

    async def wait_rounds(self, n: int) -> None:
        """Wait until ``n`` rounds have completed in total."""
        async with self._round:
            await self._round.wait_for(lambda: self.rounds >= n)

    async def _run(self) -> None:
        logger = log.get_logger(component="depth_poller")
        while True:
            try:
                await self.poll_once()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker is away; the next round tries again
                self.last_error = exc
                logger.warning("queue_depth_poll_failed", error=f"{type(exc).__name__}: {exc}")
            async with self._round:
                self.rounds += 1
                self._round.notify_all()
            await asyncio.sleep(self._interval)

    async def __aenter__(self) -> DepthPoller:
        self._task = asyncio.create_task(self._run(), name="depth-poller")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
