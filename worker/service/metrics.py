"""Prometheus metrics of one worker process, on a registry of its own (no module globals),
and those of a group of worker processes (``run --processes N``).

In a group every worker process writes its metrics to files in the supervisor's
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) and the supervisor
serves their sums; a gauge says how its values combine (``multiprocess_mode``). The
readiness and queue gauges are the supervisor's own (:data:`GROUP_OWNED`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: seconds; invocations are fast, retries and backlogs are slow
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_AGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 21600, 86400)


class Metrics:
    """Every metric the worker exports; ``outcome`` is ``ok``, an error name such as
    ``Expired``, ``retried``, ``dead_lettered``, ``skipped`` (nothing for this service)
    or ``duplicate`` (answered from the receipt ledger)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "forge_worker_messages", "Messages and invocations by outcome", ["outcome"], registry=r
        )
        self.latency = Histogram(
            "forge_worker_processing_seconds",
            "Time from consume to ack of one message",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "forge_worker_in_flight",
            "Messages consumed and not yet settled",
            registry=r,
            multiprocess_mode="livesum",  # a group: the sum over its running processes
        )
        self.receipts_published = Counter(
            "forge_worker_receipts_published",
            "Receipt containers confirmed by the broker",
            registry=r,
        )
        self.duplicates = Counter(
            "forge_worker_duplicates",
            "Tasks answered again from the receipt ledger without executing",
            registry=r,
        )
        self.queue_depth = Gauge(
            "forge_worker_queue_depth", "Ready messages in a queue", ["queue"], registry=r
        )
        self.queue_consumers = Gauge(
            "forge_worker_queue_consumers", "Consumers of a queue", ["queue"], registry=r
        )
        self.message_age = Histogram(
            "forge_worker_message_age_seconds",
            "Age of a message when consumed (now - its timestamp property)",
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        self.did_resolutions = Counter(
            "forge_worker_did_resolutions",
            "did:plc DIDs resolved for a batch, by outcome: document (from the cache or the "
            "directory), refused (the directory does not know it, or not a DID document), "
            "unavailable (the directory could not answer in time)",
            ["outcome"],
            registry=r,
        )
        self.directory_requests = Counter(
            "forge_worker_directory_requests",
            "GET requests sent to the PLC directory",
            registry=r,
        )
        self.ready = Gauge(
            "forge_worker_ready",
            "1 when every readiness check passes (evaluated on each scrape and /readyz)",
            registry=r,
        )
        self.ready_check = Gauge(
            "forge_worker_ready_check",
            "1 when this readiness check passes: broker, consumer, database, key",
            ["check"],
            registry=r,
        )


class GroupMetrics:
    """What the supervisor of ``run --processes N`` adds about its worker processes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.processes = Gauge(
            "forge_worker_processes", "Worker processes the supervisor keeps running", registry=r
        )
        self.processes_ready = Gauge(
            "forge_worker_processes_ready",
            "Worker processes whose /readyz passed (evaluated on each scrape and /readyz)",
            registry=r,
        )
        self.restarts = Counter(
            "forge_worker_process_restarts",
            "Worker processes restarted by the supervisor after they exited",
            registry=r,
        )


#: metric families a group's supervisor exports itself: its readiness (every process's
#: checks at once), the queue gauges (polled once for the group) and :class:`GroupMetrics`;
#: the worker processes' files are read for every other family
GROUP_OWNED: frozenset[str] = frozenset(
    {
        "forge_worker_ready",
        "forge_worker_ready_check",
        "forge_worker_queue_depth",
        "forge_worker_queue_consumers",
        "forge_worker_processes",
        "forge_worker_processes_ready",
        "forge_worker_process_restarts",
    }
)
