"""A broker given as a list of nodes: parse it, redact it, connect to any of it, stay connected.

A deployment may name its broker as a comma-separated list of AMQP URLs, one per node of a
RabbitMQ cluster (a ``,`` inside a password is written ``%2C``)::

    amqp://app:secret@rabbit-1:5672/,amqp://app:secret@rabbit-2:5672/,amqp://app:secret@rabbit-3/

* :func:`parse_urls` checks such a list: each item an ``amqp://`` or ``amqps://`` URL with a
  host, none empty, no node twice; its errors name items by position and node, never the
  item itself (a mangled item may hold part of a password).
* :func:`redact` is all that a log line or an error ever shows of a URL: its password is
  ``***``. :func:`node_of` is the ``host:port`` that log lines name.
* :func:`connect_any` opens a one-shot (not robust) connection to the first node that
  answers, trying each in turn; :class:`NoBrokerReachable` names every node tried.
* :func:`connect_failover` opens a :class:`FailoverConnection`: aio-pika's
  ``RobustConnection`` whose first connect tries each node in turn and whose every reconnect
  attempt starts from the node after the one that failed, logging ``broker_connected`` (with
  the node and the redacted URL) each time it is connected.

How aio-pika 10.2 reconnects, and where this hooks in (what the integration into
:mod:`worker.broker` and :mod:`worker.client` relies on):

* ``RobustConnection.connect`` starts one task, the *connection factory*, that waits on a
  private "restore" event, then (if the transport is gone) calls ``Connection.connect(self,
  timeout)``, which always dials ``self.url``; on failure it logs, sleeps
  ``reconnect_interval`` and tries again, forever. Since that call names the base class, a
  subclass cannot override the dialling itself; it can change ``self.url`` in between.
* ``self._on_connection_close`` runs once for each lost connection *and* once for each
  failed attempt (``UnderlayConnection.connect`` calls it with the error before raising):
  the one place that sees every failure, so this is where :class:`FailoverConnection` moves
  ``self.url`` to the next node. It then sets the restore event, which wakes the factory.
* ``self._on_connected`` runs after each successful dial: it re-opens every robust channel
  (``RobustChannel.restore`` → ``reopen``: the same channel number, publisher confirms, QoS
  as last set by ``set_qos``, then every exchange and queue declared through it with
  ``robust=True``, re-declared with the same arguments, their bindings, and the consumers
  registered through ``RobustQueue.consume``, under their old consumer tags), then runs each
  channel's ``reopen_callbacks`` and, from the second connection on, the connection's
  ``reconnect_callbacks``. A failure there closes the new connection (and so moves on).
* With ``fail_fast`` (the default) the first connect fails after one attempt on one URL;
  :class:`FailoverConnection` makes its own first round over every node instead, then runs
  the factory with ``fail_fast`` off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractConnection, TimeoutType
from aio_pika.connection import Connection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from worker import log
from worker.errors import ConfigError, Unreachable

#: seconds one connection attempt may take: a stalled node (its VM paused, say) accepts the
#: TCP connection but never answers, and aio-pika would wait for it forever
CONNECT_TIMEOUT: Final = 10.0
#: seconds between two reconnect attempts that both failed (aio-pika's default is 5)
RECONNECT_INTERVAL: Final = 1.0

SCHEMES: Final = {"amqp": 5672, "amqps": 5671}


class NoBrokerReachable(Unreachable):
    """No node of the list could be connected to.

    ``attempts``: (redacted URL, why), one per node tried, in the order tried.
    """

    def __init__(self, attempts: Sequence[tuple[str, str]]) -> None:
        self.attempts = tuple(attempts)
        tried = "; ".join(f"{url}: {why}" for url, why in self.attempts)
        super().__init__(f"cannot reach any broker node ({len(self.attempts)} tried): {tried}")


# --- the list ----------------------------------------------------------------------------


def parse_urls(
    value: str | Iterable[str], *, variable: str = "the broker URL list"
) -> tuple[str, ...]:
    """The URLs of a comma-separated list (or of an iterable of URLs), each stripped.

    Raises:
        ConfigError: naming ``variable``: the list is empty, an item is empty, is not an
            ``amqp://`` or ``amqps://`` URL, has no host or a malformed port, or names a
            node already listed. The message never contains a password.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    if not any(item.strip() for item in items):
        raise ConfigError(f"{variable}: no broker URL given")
    urls: list[str] = []
    seen: dict[str, int] = {}
    for position, item in enumerate(items, 1):
        url = item.strip()
        where = f"{variable}: item {position}"
        if not url:
            raise ConfigError(f"{where} is empty (a doubled or trailing comma?)")
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        if scheme not in SCHEMES:
            shown = (
                f"scheme {scheme!r}"
                if scheme.isalnum()
                else "no scheme; a ',' in a password must be written %2C"
            )
            raise ConfigError(f"{where} is not an amqp:// or amqps:// URL ({shown})")
        try:
            parts = urlsplit(url)
            host, _ = parts.hostname, parts.port
        except ValueError:
            raise ConfigError(
                f"{where} has a malformed host or port (a ',' in a password must be written %2C)"
            ) from None
        if not host:
            raise ConfigError(f"{where} has no host")
        node = node_of(url)
        if node in seen:
            raise ConfigError(f"{where} names {node}, as item {seen[node]} does")
        seen[node] = position
        urls.append(url)
    return tuple(urls)


def redact(url: str | URL) -> str:
    """``url`` with its password, if any, replaced by ``***``.

    Also for a malformed URL: a password holding a raw ``/``, ``?`` or ``#`` (which a URL
    must percent-encode) is hidden up to the last ``@``; so is, harmlessly, a host and path
    before an ``@`` in the path.
    """
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        # not a URL: whatever precedes an "@" may be credentials
        return f"***@{text.rpartition('@')[2]}" if "@" in text else text
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
    elif "@" in tail and ":" in rest[: rest.rfind("@")]:
        userinfo, _, hostport = rest.rpartition("@")
        tail = ""
    else:
        return text
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}:***@{hostport}{tail}" if colon else text


def node_of(url: str | URL) -> str:
    """``host:port`` of ``url`` (the scheme's default port if none is given; ``?`` for what
    cannot be read)."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or "?"
        port = parts.port or SCHEMES.get(parts.scheme.lower(), 5672)
    except ValueError:
        return "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def _describe(exc: BaseException | None, urls: Iterable[str | URL]) -> str:
    """``Type: first line`` of ``exc``, with any of the ``urls``' passwords hidden."""
    if exc is None:
        return "closed"
    text = str(exc).splitlines()[0] if str(exc) else ""
    for url in urls:
        raw = str(url)
        text = text.replace(raw, redact(raw))
        password = urlsplit(raw).password
        if password:
            for form in {password, unquote(password)}:
                text = text.replace(form, "***")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _closing_error(closing: asyncio.Future[Any]) -> BaseException | None:
    if not closing.done():
        return None
    if closing.cancelled():
        return asyncio.CancelledError("connection cancelled (stalled: no heartbeat in time?)")
    return closing.exception()


# --- one-shot ----------------------------------------------------------------------------


async def connect_any(
    urls: str | Sequence[str],
    *,
    timeout: float = CONNECT_TIMEOUT,  # noqa: ASYNC109 - each attempt's own deadline
    **kwargs: Any,
) -> AbstractConnection:
    """A plain (not robust) connection to the first node of ``urls`` that answers, trying
    each in turn within ``timeout`` s; ``kwargs`` go to :func:`aio_pika.connect`.

    Raises:
        ConfigError: ``urls`` is a malformed list (see :func:`parse_urls`).
        NoBrokerReachable: no node answered; it names each (redacted) and why.
    """
    listed = parse_urls(urls)
    logger = log.get_logger(component="broker")
    attempts: list[tuple[str, str]] = []
    for url in listed:
        try:
            connection: AbstractConnection = await aio_pika.connect(url, timeout=timeout, **kwargs)
        except CONNECTION_EXCEPTIONS as exc:
            why = _describe(exc, listed)
            attempts.append((redact(url), why))
            logger.warning("broker_connect_failed", node=node_of(url), url=redact(url), error=why)
            continue
        logger.info("broker_connected", node=node_of(url), url=redact(url), robust=False)
        return connection
    raise NoBrokerReachable(attempts)


# --- robust over the list ----------------------------------------------------------------


class FailoverConnection(RobustConnection):
    """aio-pika's robust connection over several nodes.

    The first :meth:`connect` tries each URL in turn (raising :class:`NoBrokerReachable`
    if none answers); after that, each time the connection is lost or an attempt fails, the
    next attempt goes to the next URL of the list (round and round), every
    ``reconnect_interval`` s while they fail. Channels, QoS, queues, bindings and consumers
    are restored by aio-pika itself, as for one URL. Logs ``broker_connected`` (``node``,
    redacted ``url``, ``reconnected``), ``broker_connection_lost`` and
    ``broker_connect_failed`` (``node``, ``url``, ``error``).

    Query options of aio-pika itself (``reconnect_interval``...) are read from the first
    URL only; pass them as keyword arguments. aiormq's (``heartbeat``...) are read from
    each URL as it is dialled.
    """

    def __init__(
        self,
        urls: Sequence[str | URL],
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        if not urls:
            raise ValueError("FailoverConnection needs at least one URL")
        listed = tuple(URL(str(url)) for url in urls)
        # our connect() makes the first round itself (see the module's notes)
        kwargs["fail_fast"] = False
        super().__init__(listed[0], loop=loop, **kwargs)
        self.urls: tuple[URL, ...] = listed
        self.connect_timeout = connect_timeout
        self._index = 0
        self._first_round_done = False
        self._restoring = False
        self._log = log.get_logger(component="broker")

    @property
    def current_url(self) -> URL:
        """The URL connected to, or the next one to be tried while reconnecting."""
        return self.urls[self._index]

    @property
    def node(self) -> str:
        """``host:port`` of :attr:`current_url`."""
        return node_of(self.current_url)

    def _use(self, index: int) -> None:
        self._index = index % len(self.urls)
        self.url = self.urls[self._index]

    async def connect(self, timeout: TimeoutType = None) -> None:  # noqa: ASYNC109 - aio-pika's signature
        """Connect to the first node that answers, then keep connected (see the class).

        ``timeout``: seconds for each attempt, the first round's and every reconnect's;
        default ``connect_timeout``.

        Raises:
            NoBrokerReachable: at the first call, when no node answered.
        """
        if timeout is None:
            timeout = self.connect_timeout
        if not self._first_round_done:
            self._first_round_done = True
            attempts: list[tuple[str, str]] = []
            for index, url in enumerate(self.urls):
                # (a failed attempt moves to the next URL by itself: _on_connection_close)
                self._use(index)
                try:
                    await Connection.connect(self, timeout)
                    break
                except CONNECTION_EXCEPTIONS as exc:
                    attempts.append((redact(url), _describe(exc, self.urls)))
            else:
                await self.close()
                raise NoBrokerReachable(attempts)
        await super().connect(timeout)

    async def _on_connected(self) -> None:
        self._restoring = True
        try:
            await super()._on_connected()
        finally:
            self._restoring = False
        self._log.info(
            "broker_connected",
            node=self.node,
            url=redact(self.current_url),
            reconnected=self.connection_attempt > 1,
        )

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not (self.close_called or self.is_closed):
            error = _describe(_closing_error(closing), self.urls)
            if self.connected.is_set() and not self._restoring:
                event = "broker_connection_lost"
            else:
                event = "broker_connect_failed"
                if self._restoring:
                    error = f"restoring channels: {error}"
            self._log.warning(event, node=self.node, url=redact(self.current_url), error=error)
            # the next attempt, whoever makes it, goes to the next node
            self._use(self._index + 1)
        await super()._on_connection_close(closing)


async def connect_failover(
    urls: str | Sequence[str],
    *,
    timeout: float = CONNECT_TIMEOUT,  # noqa: ASYNC109 - each attempt's own deadline
    reconnect_interval: float = RECONNECT_INTERVAL,
    heartbeat: int | None = None,
    **kwargs: Any,
) -> FailoverConnection:
    """A :class:`FailoverConnection` over ``urls``, connected.

    Args:
        urls: a comma-separated list or a sequence of URLs (see :func:`parse_urls`).
        timeout: seconds for each connection attempt.
        reconnect_interval: seconds between two failed reconnect attempts.
        heartbeat: AMQP heartbeat in seconds, set on every URL. aiormq gives up on a silent
            connection after ``(heartbeat + 1) * 3`` s, so this bounds how long a stalled
            (not crashed) node keeps the connection: with RabbitMQ's 60 s, three minutes.
        kwargs: for aio-pika's ``Connection`` (``client_properties``, ``ssl_context``...).

    Raises:
        ConfigError: ``urls`` is a malformed list.
        NoBrokerReachable: no node answered the first round.
    """
    listed: Sequence[str | URL] = parse_urls(urls)
    if heartbeat is not None:
        listed = [URL(url).update_query(heartbeat=str(heartbeat)) for url in listed]
    connection = FailoverConnection(
        listed, connect_timeout=timeout, reconnect_interval=reconnect_interval, **kwargs
    )
    await connection.connect()
    return connection
