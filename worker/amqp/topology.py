"""Queue names, queue arguments and the project's message headers, named in one place.

Everything that derives a queue name from the inbox name, or reads or writes one
of the worker's own headers, uses this module, so the worker, the operator tools
and the tests agree.
"""

from __future__ import annotations

from typing import Final

#: the dead-letter strategy and overflow mode that make dead-lettering at-least-once
DEAD_LETTER_STRATEGY: Final = "at-least-once"
OVERFLOW: Final = "reject-publish"

#: delays (seconds) of the retry tiers; a transient failure waits in tier n on attempt n
DEFAULT_RETRY_DELAYS: Final[tuple[int, ...]] = (1, 5, 30, 120, 600)
#: broker-side redeliveries (crashes) before the broker dead-letters a message
DEFAULT_DELIVERY_LIMIT: Final = 10

CONTENT_TYPE: Final = "application/vnd.ipld.dag-cbor"

# --- the worker's own headers (never x-: RabbitMQ 4 ignores client-set x-death) ---
#: attempts made so far by the worker (int); absent on a first delivery
H_ATTEMPT: Final = "forge-attempt"
#: no longer written: a message's first arrival is the worker's record in
#: ``forge_worker.arrivals``, never a header (a publisher's is dropped from every copy)
H_FIRST_ARRIVAL: Final = "forge-first-arrival"
#: why the message was dead-lettered: undecodable, retries-exhausted, delivery-limit, ...
H_REASON: Final = "forge-reason"
#: the last error's text (one line, no secrets)
H_ERROR: Final = "forge-error"
#: unix seconds when the worker dead-lettered the message
H_DEAD_LETTERED_AT: Final = "forge-dead-lettered-at"
#: the queue the message was consumed from when it was dead-lettered or retried
H_ORIGIN_QUEUE: Final = "forge-origin-queue"
#: how many times an operator replayed this message (int)
H_REPLAY_COUNT: Final = "forge-replay-count"
#: unix seconds of the last replay
H_REPLAYED_AT: Final = "forge-replayed-at"
#: a dead letter's own properties that could not be written (a short string over 255 bytes
#: in UTF-8), kept here as long strings so the message stays inspectable: {name: text}
H_ORIGINAL_PROPERTIES: Final = "forge-original-properties"
#: why the publisher's headers were left out of a dead letter (they could not be written)
H_DROPPED_HEADERS: Final = "forge-dropped-headers"


#: the headers that record what the worker did to a message: only the worker writes them
#: (a copy drops a publisher's), and the operator's tools read them only on the worker's own
#: dead letters (never on one the broker dead-lettered, whose headers are the publisher's)
WORKER_RECORDS: Final = frozenset(
    {
        H_FIRST_ARRIVAL,
        H_REASON,
        H_ERROR,
        H_DEAD_LETTERED_AT,
        H_ORIGIN_QUEUE,
        H_ORIGINAL_PROPERTIES,
        H_DROPPED_HEADERS,
    }
)


#: RabbitMQ's direct reply-to pseudo-queue. A producer consuming it names it in ``reply_to``
#: and the broker rewrites that to ``amq.rabbitmq.reply-to.<channel>.<key>``; a response
#: published to such a name goes straight to that channel's consumer, at most once. A forged
#: name can make RabbitMQ 3.10 close the publisher's whole connection (INTERNAL_ERROR), so
#: the worker answers these names on a connection of their own (README, "Direct reply-to").
DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"


def response_queue(reply_to: str | None, receipt_queue: str) -> str:
    """Where the response to a request goes: its ``reply_to``, any queue name (a
    server-named ``amq.gen-…`` one and a direct reply-to name too), else the receipt queue."""
    return reply_to or receipt_queue


def is_direct_reply_to(routing_key: str) -> bool:
    """Whether ``routing_key`` is a direct reply-to name (the bare pseudo-queue included),
    which the worker publishes to through its isolated publisher."""
    return routing_key.startswith(DIRECT_REPLY_TO)


def dead_letter_name(queue: str) -> str:
    """The dead-letter queue of ``queue``."""
    return f"{queue}.dlq"


def retry_name(queue: str, delay_seconds: int) -> str:
    """The retry queue of ``queue`` that holds messages for ``delay_seconds``."""
    return f"{queue}.retry.{delay_seconds}s"


def retry_names(queue: str, delays: tuple[int, ...] = DEFAULT_RETRY_DELAYS) -> list[str]:
    """All retry queue names of ``queue``, shortest delay first."""
    return [retry_name(queue, d) for d in delays]


def inbox_arguments(queue: str, delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> dict[str, object]:
    """Arguments of the inbox: a quorum queue that dead-letters at least once to its DLQ."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_name(queue),
        "x-dead-letter-strategy": DEAD_LETTER_STRATEGY,
        "x-overflow": OVERFLOW,
    }


def retry_arguments(queue: str, delay_seconds: int) -> dict[str, object]:
    """Arguments of a retry tier: hold for ``delay_seconds``, then dead-letter back to the inbox."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": delay_seconds * 1000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": DEAD_LETTER_STRATEGY,
        "x-overflow": OVERFLOW,
    }


def plain_quorum_arguments() -> dict[str, object]:
    """Arguments of the dead-letter and receipt queues."""
    return {"x-queue-type": "quorum"}
