"""``forge-worker run --processes N``: a supervisor of N worker processes.

Each worker process is a whole ``forge-worker run`` worker (its own broker connection,
prefetch window, database pool and event loop), a competing consumer on the inbox. The
supervisor starts them as subprocesses of the same interpreter (``python -m worker.cli run
--worker-index I --status-fd FD``), never as forks of itself: a child starts from a clean
interpreter (no inherited event loop, sockets, threads or collector state), restarts the
same way it first started, and is what an operator sees in ``ps``. They get the
supervisor's settings, flags included, as ``FORGE_WORKER_*`` variables (so no secret is
ever put in their arguments) with ``FORGE_WORKER_PROCESSES=1``.

The supervisor:

- loads (or creates, once) the service key before any worker process starts;
- restarts a worker process that exits, after a delay that doubles with each consecutive
  exit (:class:`RestartPolicy`), and gives up, stopping the group with the failing exit
  code, when one exits :attr:`RestartPolicy.give_up_after` times within
  :attr:`RestartPolicy.window` seconds without ever reporting that it consumes;
- forwards SIGTERM and SIGINT to every worker process, waits for each to drain, and exits
  0 when every one did;
- serves the group's ``/metrics`` (the sum of the processes' metrics, from
  prometheus_client's multiprocess files, with its own queue and readiness gauges) and
  ``/readyz`` (ready when every worker process is ready) on ``FORGE_WORKER_HTTP_PORT``.

A worker process reports on its status pipe (``--status-fd``) once it consumes, with the
port of its own endpoints (a free port on 127.0.0.1); it stops by itself (drains) if its
supervisor dies (:class:`Membership`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aio_pika
import aiormq
import structlog
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from worker import config
from worker import log as logs
from worker.config import Settings
from worker.errors import Unreachable
from worker.keyfile import load_service_key
from worker.service.broker import CONNECT_TIMEOUT, RECONNECT_INTERVAL
from worker.service.depth import DepthPoller
from worker.service.http import CHECKS, PROBE_TIMEOUT, Readiness, serve_endpoints
from worker.service.metrics import GROUP_OWNED, GroupMetrics, Metrics

HTTP_HOST: Final = "127.0.0.1"
#: the readiness checks of a group: every worker process's, and that all of them run
GROUP_CHECKS: Final = (*CHECKS, "processes")
#: seconds the supervisor waits for its worker processes beyond their own drain
#: (``FORGE_WORKER_SHUTDOWN_TIMEOUT``) before it kills the ones still running
STOP_GRACE: Final = 15.0
#: seconds a worker process's ``/readyz`` may take (its database probe takes up to 2 s)
CHILD_PROBE_TIMEOUT: Final = PROBE_TIMEOUT + 2.0
#: seconds between a worker process's looks at whether its supervisor still runs
PARENT_POLL: Final = 1.0


def resolve_processes(processes: int) -> int:
    """``FORGE_WORKER_PROCESSES`` as a count: 0 is one per core this process may run on
    (its CPU affinity, which a container's cpuset narrows; a CPU quota does not)."""
    if processes > 0:
        return processes
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- worker side


@dataclass
class Membership:
    """What a worker process of a group knows of its supervisor (its hidden ``run`` flags)."""

    index: int
    status_fd: int | None
    #: the supervisor's pid, as this process found it at start
    parent: int

    @classmethod
    def from_arguments(cls, index: int, status_fd: int | None) -> Membership:
        return cls(index, status_fd, os.getppid())

    def bind_log_context(self) -> None:
        """Every log line of this process names it: ``worker`` (its index) and ``pid``."""
        structlog.contextvars.bind_contextvars(role="worker", worker=self.index, pid=os.getpid())

    def started(self, http_port: int | None) -> None:
        """Tell the supervisor that this process consumes, and where its endpoints are."""
        if self.status_fd is None:
            return
        line = {"event": "started", "pid": os.getpid(), "http_port": http_port}
        with contextlib.suppress(OSError):  # the supervisor is gone: watching() notices
            os.write(self.status_fd, json.dumps(line).encode() + b"\n")

    @contextlib.asynccontextmanager
    async def watching(self, on_orphaned: Callable[[], None]) -> AsyncIterator[None]:
        """While entered, call ``on_orphaned`` (stop: drain and exit) once the supervisor
        is gone (this process was handed to another parent)."""

        async def watch() -> None:
            while os.getppid() == self.parent:  # noqa: ASYNC110 - no event for a reparenting
                await asyncio.sleep(PARENT_POLL)
            logs.get_logger().warning("supervisor_gone", supervisor_pid=self.parent)
            on_orphaned()

        task = asyncio.create_task(watch(), name="forge-worker-parent")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --------------------------------------------------------------------------- restarts


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a worker process that exited is started again, and when the supervisor gives up."""

    #: seconds before the first restart; each consecutive exit doubles it
    first_delay: float = 0.5
    #: the longest delay between restarts
    max_delay: float = 30.0
    #: seconds a worker process must have consumed for its next exit to count as a first
    stable_after: float = 60.0
    #: exits before ever consuming that make the supervisor give up ...
    give_up_after: int = 3
    #: ... when they all fall within this many seconds
    window: float = 60.0


@dataclass
class Slot:
    """One of the N places of the group, and the worker process that fills it now."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    #: starting (until it reports), running (consuming), restarting, exited, stopped
    state: str = "starting"
    http_port: int | None = None
    #: event-loop time the current process reported that it consumes
    running_since: float | None = None
    #: consecutive exits while the group runs (the restart delay doubles with each)
    crashes: int = 0
    #: event-loop times of exits before the process ever consumed
    start_failures: list[float] = field(default_factory=list)
    restarts: int = 0
    last_exit: int | None = None
    #: the last exit came after the process had consumed
    last_exit_ran: bool = False
    reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def restart_delay(slot: Slot, now: float, policy: RestartPolicy) -> float | None:
    """Seconds to wait before starting ``slot``'s worker process again after it exited at
    ``now`` (event-loop time), or ``None``: it keeps failing at start, give up."""
    if slot.running_since is not None:  # it consumed: not a failure to start
        if now - slot.running_since >= policy.stable_after:
            slot.crashes = 0
    else:
        recent = [t for t in slot.start_failures if now - t < policy.window]
        slot.start_failures = [*recent, now]
        if len(slot.start_failures) >= policy.give_up_after:
            return None
    slot.crashes += 1
    return float(min(policy.max_delay, policy.first_delay * 2 ** (slot.crashes - 1)))


# --------------------------------------------------------------------------- readiness


@dataclass(frozen=True, slots=True)
class GroupReadiness:
    """``/readyz`` of a group: each check fails when it fails in any worker process
    (naming which), ``processes`` when one is not running; and each process's verdict."""

    checks: dict[str, str | None]
    processes: list[dict[str, object]]

    @property
    def ready(self) -> bool:
        return all(v is None for v in self.checks.values())

    def to_json(self) -> dict[str, object]:
        return {**Readiness(self.checks).to_json(), "processes": self.processes}


async def _ask_readyz(port: int) -> tuple[int, dict[str, Any]]:
    """GET ``/readyz`` of a worker process: its status and JSON body."""
    async with asyncio.timeout(CHILD_PROBE_TIMEOUT):
        reader, writer = await asyncio.open_connection(HTTP_HOST, port)
        try:
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    parsed = json.loads(body)
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    return status, parsed


class _GroupCollector(Collector):
    """The group's families: the supervisor's own (:data:`GROUP_OWNED`) from ``own``, every
    other summed over the worker processes' multiprocess files in ``path`` (those of exited
    processes included, so a counter never goes back when one is restarted)."""

    def __init__(self, own: CollectorRegistry, path: str) -> None:
        self._own = own
        self._path = path

    def collect(self) -> Iterable[Metric]:
        for family in self._own.collect():
            if family.name in GROUP_OWNED:
                yield family
        files = multiprocess.MultiProcessCollector(None, path=self._path)  # type: ignore[no-untyped-call]
        for family in files.collect():  # type: ignore[no-untyped-call]
            if family.name not in GROUP_OWNED:
                yield family


# --------------------------------------------------------------------------- supervisor


def _signal_name(code: int | None) -> str | None:
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return None


async def _connect(settings: Settings) -> aio_pika.abc.AbstractRobustConnection:
    """The supervisor's own broker connection (the queue gauges' passive declares)."""
    try:
        return await aio_pika.connect_robust(
            settings.amqp_url,
            timeout=CONNECT_TIMEOUT,
            reconnect_interval=RECONNECT_INTERVAL,
            client_properties={"connection_name": f"forge-worker supervisor {settings.queue}"},
        )
    except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
        raise Unreachable(f"cannot reach the broker: {type(exc).__name__}: {exc}") from None


class Supervisor:
    """Runs ``processes`` worker processes on ``settings`` until a signal, or until one
    keeps failing at start (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        processes: int,
        *,
        policy: RestartPolicy | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy or RestartPolicy()
        self.command = list(command or (sys.executable, "-m", "worker.cli", "run"))
        self.slots = [Slot(i) for i in range(processes)]
        self.log = logs.get_logger()
        #: the group's readiness and queue gauges (the rest of it is not exported)
        self.metrics = Metrics()
        self.group = GroupMetrics(self.metrics.registry)
        self.group.processes.set(processes)
        self.metrics_dir: str | None = None
        self.http_port: int | None = None
        self._stop = asyncio.Event()
        self._signal: int | None = None
        self._gave_up: tuple[Slot, int] | None = None
        self._failed = False
        self._killed = False

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        """Supervise until stopped; the exit code of the whole group."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            # the development key is created here, once, before any worker process reads it
            key = load_service_key(self.settings, self.log)
            self.metrics_dir = tempfile.mkdtemp(prefix="forge-worker-metrics-")
            async with contextlib.AsyncExitStack() as stack:
                stack.callback(shutil.rmtree, self.metrics_dir, True)
                if self.settings.http_port:
                    await self._serve(stack, self.metrics_dir)
                self.log.info(
                    "supervisor_started",
                    processes=len(self.slots),
                    service_did=key.signer.did,
                    queue=self.settings.queue,
                )
                lives = [
                    asyncio.create_task(self._keep(slot), name=f"forge-worker-{slot.index}")
                    for slot in self.slots
                ]
                await self._stop.wait()
                await self._stop_all(lives)
            code = self._exit_code()
            self.log.info(
                "supervisor_stopped",
                exit_code=code,
                exits={str(s.index): s.last_exit for s in self.slots},
            )
            return code
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._signal is None:
            self.log.info("supervisor_stopping", signal=signal.Signals(sig).name)
        self._signal = sig
        self._stop.set()
        for slot in self.slots:
            self._forward(slot, sig)

    def _forward(self, slot: Slot, sig: int) -> None:
        proc = slot.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    async def _stop_all(self, lives: list[asyncio.Task[None]]) -> None:
        """Wait for every worker process to drain and exit; kill the ones still running
        after their drain time and :data:`STOP_GRACE`."""
        budget = self.settings.shutdown_timeout + STOP_GRACE
        _, pending = await asyncio.wait(lives, timeout=budget)
        if pending:
            for slot in self.slots:
                if slot.proc is not None and slot.proc.returncode is None:
                    self.log.error(
                        "worker_process_killed",
                        worker=slot.index,
                        worker_pid=slot.pid,
                        note=f"still running {budget:g} s after the stop; killed",
                    )
                    self._killed = True
                    with contextlib.suppress(ProcessLookupError):
                        slot.proc.kill()
            await asyncio.wait(pending)
        for task in lives:
            if not task.cancelled() and task.exception() is not None:
                self._failed = True

    def _exit_code(self) -> int:
        if self._gave_up is not None:
            code = self._gave_up[1]
            return code if code > 0 else 1
        if self._failed or self._killed:
            return 1
        for slot in self.slots:
            last = slot.last_exit
            if last is None or last == 0:
                continue
            # killed by the forwarded signal before it could install its handlers: it had
            # not consumed anything, so there was nothing to drain
            early = -last in (signal.SIGTERM, signal.SIGINT) and not slot.last_exit_ran
            if not early:
                return 1
        return 0

    # --- one slot ----------------------------------------------------------------------------

    async def _keep(self, slot: Slot) -> None:
        """Keep ``slot`` filled with a worker process until the group stops."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stop.is_set():
                proc = await self._spawn(slot)
                code = await proc.wait()
                if slot.reader is not None:
                    await slot.reader
                self._exited(slot, code)
                if self._stop.is_set():
                    return
                delay = restart_delay(slot, loop.time(), self.policy)
                if delay is None:
                    self._give_up(slot, code)
                    return
                slot.state = "restarting"
                self.log.warning(
                    "worker_process_restarting", worker=slot.index, delay_s=delay, exit_code=code
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                if self._stop.is_set():
                    return
                slot.restarts += 1
                self.group.restarts.inc()
        except Exception as exc:
            self.log.error(
                "supervisor_failed", worker=slot.index, error=f"{type(exc).__name__}: {exc}"
            )
            self._failed = True
            self._stop.set()
            for other in self.slots:
                self._forward(other, signal.SIGTERM)
            raise

    async def _spawn(self, slot: Slot) -> asyncio.subprocess.Process:
        assert self.metrics_dir is not None
        env = config.process_environ(
            self.settings,
            **{config.PREFIX + "PROCESSES": "1", "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir},
        )
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                "--worker-index",
                str(slot.index),
                "--status-fd",
                str(write_fd),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        slot.proc, slot.state, slot.http_port, slot.running_since = proc, "starting", None, None
        slot.reader = asyncio.create_task(self._read_status(slot, read_fd))
        self.log.info("worker_process_started", worker=slot.index, worker_pid=proc.pid)
        if self._stop.is_set():  # a signal came while it was being started
            self._forward(slot, self._signal or signal.SIGTERM)
        return proc

    async def _read_status(self, slot: Slot, fd: int) -> None:
        """Read what the worker process reports until it exits (end of the pipe)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            async for raw in reader:
                try:
                    report = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(report, dict) and report.get("event") == "started":
                    port = report.get("http_port")
                    slot.http_port = port if isinstance(port, int) else None
                    slot.state, slot.running_since = "running", loop.time()
                    slot.start_failures.clear()
                    self.log.info(
                        "worker_process_ready",
                        worker=slot.index,
                        worker_pid=slot.pid,
                        http_port=slot.http_port,
                    )
        finally:
            transport.close()

    def _exited(self, slot: Slot, code: int) -> None:
        slot.last_exit, slot.last_exit_ran = code, slot.running_since is not None
        slot.state = "stopped" if self._stop.is_set() else "exited"
        slot.http_port = None
        if self.metrics_dir is not None and slot.pid is not None:
            # its live gauges (in flight) leave the sums; its counters stay in them
            multiprocess.mark_process_dead(slot.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        event = {
            "worker": slot.index,
            "worker_pid": slot.pid,
            "exit_code": code,
            "signal": _signal_name(code),
        }
        if self._stop.is_set() and code == 0:
            self.log.info("worker_process_stopped", **event)
        else:
            self.log.warning("worker_process_exited", consumed=slot.last_exit_ran, **event)

    def _give_up(self, slot: Slot, code: int) -> None:
        self._gave_up = (slot, code)
        failures = len(slot.start_failures)
        self.log.error(
            "worker_process_failing",
            worker=slot.index,
            exit_code=code,
            signal=_signal_name(code),
            failures=failures,
            within_s=self.policy.window,
            message=(
                f"worker process {slot.index} exited with code {code} {failures} times "
                f"within {self.policy.window:g} s without ever consuming; stopping the group "
                "(its own log lines above say why)"
            ),
        )
        self._stop.set()
        for other in self.slots:
            self._forward(other, signal.SIGTERM)

    # --- the group's endpoints ----------------------------------------------------------------

    async def _serve(self, stack: contextlib.AsyncExitStack, metrics_dir: str) -> None:
        connection = await _connect(self.settings)
        stack.push_async_callback(connection.close)
        await stack.enter_async_context(
            DepthPoller.for_settings(connection, self.settings, self.metrics)
        )
        exposed = CollectorRegistry(auto_describe=False)
        exposed.register(_GroupCollector(self.metrics.registry, metrics_dir))
        server = await stack.enter_async_context(
            serve_endpoints(
                HTTP_HOST, self.settings.http_port, lambda: generate_latest(exposed), self.readiness
            )
        )
        self.http_port = server.port
        self.log.info("http_serving", host=HTTP_HOST, port=server.port)

    async def readiness(self) -> GroupReadiness:
        """Every worker process's ``/readyz`` at once; the group's gauges are set from it."""
        answers = await asyncio.gather(*(self._probe(slot) for slot in self.slots))
        failures: dict[str, list[str]] = {name: [] for name in GROUP_CHECKS}
        processes: list[dict[str, object]] = []
        ready_count = 0
        for slot, (ready, failed, problem) in zip(self.slots, answers, strict=True):
            if problem is not None:
                failures["processes"].append(f"worker {slot.index}: {problem}")
            for name, error in failed.items():
                failures.setdefault(name, []).append(f"worker {slot.index}: {error}")
            ready_count += ready
            processes.append(
                {
                    "worker": slot.index,
                    "pid": slot.pid,
                    "state": slot.state,
                    "port": slot.http_port,
                    "ready": ready,
                    "failed": sorted(failed) + (["processes"] if problem else []),
                    "restarts": slot.restarts,
                }
            )
        checks = {name: "; ".join(v) if v else None for name, v in failures.items()}
        readiness = GroupReadiness(checks, processes)
        for name, failure in checks.items():
            self.metrics.ready_check.labels(check=name).set(0 if failure else 1)
        self.metrics.ready.set(1 if readiness.ready else 0)
        self.group.processes_ready.set(ready_count)
        return readiness

    async def _probe(self, slot: Slot) -> tuple[bool, dict[str, str], str | None]:
        """(ready, failed check -> error, a problem with the process itself) of one slot."""
        if slot.state != "running" or slot.http_port is None:
            return False, {}, f"not consuming ({slot.state})"
        try:
            status, body = await _ask_readyz(slot.http_port)
        except Exception as exc:
            return False, {}, f"/readyz did not answer: {type(exc).__name__}: {exc}"
        failed: dict[str, str] = {}
        checks = body.get("checks")
        if isinstance(checks, dict):
            for name, verdict in checks.items():
                if isinstance(verdict, dict) and not verdict.get("ok"):
                    failed[str(name)] = str(verdict.get("error", "failed"))
        if status != 200 and not failed:
            failed["processes"] = f"/readyz answered {status}"
        return status == 200 and not failed, failed, None


def supervise(settings: Settings, processes: int) -> int:
    """``run`` with ``processes`` > 1: supervise that many worker processes; the exit code.

    Raises:
        ConfigError: a bad service key (before any worker process starts).
        Unreachable: the broker cannot be reached for the group's queue gauges.
    """
    structlog.contextvars.bind_contextvars(role="supervisor", pid=os.getpid())
    return asyncio.run(Supervisor(settings, processes).run())
