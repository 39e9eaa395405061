"""structlog set-up: one JSON object per line when not on a TTY, snake_case events, no keys."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from structlog.typing import FilteringBoundLogger

#: keys whose values are never written, whatever a caller binds
_SECRET_KEYS: Final = frozenset({"key", "service_key", "secret", "seed", "private_key", "password"})


class _Timestamp:
    """``timestamp``: ISO 8601 UTC with microseconds (``2026-11-25T01:02:03.456789Z``), the
    date and seconds formatted once a second: structlog's ``TimeStamper`` formats a whole
    ``datetime`` per event, a third of what a log line costs the worker."""

    __slots__ = ("_cached",)

    def __init__(self) -> None:
        self._cached: tuple[int, str] = (-1, "")

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        cached_second, prefix = self._cached  # (one tuple: consistent across threads)
        if second != cached_second:
            prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._cached = (second, prefix)
        event["timestamp"] = f"{prefix}.{int((now - second) * 1e6):06d}Z"
        return event


def _drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in _SECRET_KEYS.intersection(event):
        event[name] = "***"
    return event


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record arrives (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


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
            _Timestamp(),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # libraries (aio-pika, aiormq, asyncpg) log through the stdlib: keep their warnings,
    # rendered like our own events, so a JSON log stays one JSON object per line
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,  # a worker process's worker and pid
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                _Timestamp(),
                _drop_secrets,
                structlog.processors.format_exc_info,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """A logger with ``bound`` context; events are snake_case past tense."""
    logger: FilteringBoundLogger = structlog.get_logger("forge_worker").bind(**bound)
    return logger
