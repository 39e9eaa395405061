"""structlog set-up: one JSON object per line when not on a TTY, snake_case events, no keys."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog
from structlog.typing import FilteringBoundLogger

#: keys whose values are never written, whatever a caller binds
_SECRET_KEYS: Final = frozenset({"key", "service_key", "secret", "seed", "private_key", "password"})


def _drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in _SECRET_KEYS.intersection(event):
        event[name] = "***"
    return event


def configure(log_format: str = "json", level: int = logging.INFO) -> None:
    """Configure structlog (and the stdlib root logger) for this process.

    Args:
        log_format: ``json`` (one object per line) or ``console`` (for people).
        level: the lowest level written.
    """
    renderer: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # libraries (aio-pika, asyncpg) log through the stdlib: keep their warnings, one line each
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """A logger with ``bound`` context; events are snake_case past tense."""
    logger: FilteringBoundLogger = structlog.get_logger("forge_worker").bind(**bound)
    return logger
