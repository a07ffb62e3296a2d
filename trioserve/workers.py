"""Worker processes: ``--workers N`` with N > 1 runs this supervisor in the parent process.

With ``--workers 1`` (the default) and in embedded use there is no supervisor:
the one process serves, exactly as without this module.

Design
======

**The parent binds, the workers inherit.** The supervisor binds every listener
once, with the same code as a single process (``--bind`` through
:func:`~trioserve.listeners.open_listeners`, with the backlog and unix socket
mode, or the sockets of systemd socket activation), then starts N workers that
serve those very sockets. All workers accept from one shared accept queue per
listener. We chose inherited sockets over ``SO_REUSEPORT`` (a socket per
worker, with the kernel spreading connections by a hash of the addresses):

* one accept queue: a connection waits for whichever worker is free to accept
  it, never in the queue of a worker that is busy, stopping or dead (with
  REUSEPORT, connections already queued on a dying worker's socket are reset);
* it works for every kind of listener: unix sockets, ``fd://N`` and systemd's
  sockets (REUSEPORT is TCP/UDP only, and sockets passed in cannot be re-bound);
* no port stealing: another process cannot bind the same port with REUSEPORT
  and take a share of our connections, and port 0 means one port for all;
* the sockets outlive every worker, so replacing workers (crash, recycling,
  reload) never closes the port: connections queue in the kernel meanwhile.

The kernel's wake-ups are not balanced as evenly as REUSEPORT's hash, which
matters little for a WSGI server whose workers accept only when they can serve.

**Workers are fresh processes, not forks.** Each worker is
``python -m trioserve <the same app and options> --bind fd://A --bind fd://B
--workers 1`` with the sockets passed as those descriptors (``pass_fds``):
:func:`worker_command` writes the supervisor's :class:`~trioserve.config.Config`
back as flags (every field that differs from its default, except those only
the supervisor acts on: binding, the pid file, the working directory, the user,
the umask and ``--reload``, whose effects the workers inherit). On SIGHUP the
supervisor reads its options again (``--config FILE`` included) through the
``load_config`` callable it was given, so a reload picks up a changed file;
options that do not load keep the running workers. The worker imports the app itself; the
parent never imports or runs app code. So a reload (SIGHUP) really loads new
code, an app's import-time state (threads, connections, an asyncio loop) is
never forked half-made, and a crash in app code can only take down a worker.
The environment variable ``TRIOSERVE_WORKER=1`` tells the process it is a
worker: it then ignores SIGINT and SIGHUP (a Ctrl-C or a closed terminal
reaches the whole process group; the parent decides what happens), still stops
gracefully on a SIGTERM sent to it (and at once on a second one), and does not
look for systemd sockets.

**The channel: readiness, stop requests, the lifeline.** Each worker gets one
end of a socketpair (descriptor named by ``TRIOSERVE_READY_FD``;
:func:`report_ready` is the worker's side):

* the worker writes one byte once its app is imported and it serves; the parent
  counts a worker as booted only then: that is what a reload waits for before
  stopping the old workers, and what separates "failed to boot" from "died";
* the parent asks a worker to stop by writing ``S`` (gracefully; ``s`` for the
  routine replacements of ``--reload``, which the worker logs at debug level) or
  ``Q`` (at once) rather than by sending it SIGTERM: under systemd's default
  ``KillMode=control-group`` every process of the service gets SIGTERM at the
  same moment, and a worker would count that one and a forwarded one as two
  signals, turning every graceful stop into an immediate one. A request sent
  to a worker still importing its app waits in the socket and takes effect
  once it serves. SIGKILL is the only signal the parent sends, as a last resort;
* end-of-file means the parent is gone (even killed with SIGKILL): the worker
  stops gracefully instead of serving on, orphaned;
* with ``--metrics-bind``, the parent writes ``P`` when scraped: the worker
  writes its gauges into its counters' block and answers ``p`` (below).

**Metrics** (``--metrics-bind``). The supervisor serves ``/metrics``
(:mod:`trioserve.metrics`) and sums its workers. Each worker counts into a
block of shared memory the supervisor made for it
(:class:`trioserve.stats.SharedStats`; descriptor named by
``TRIOSERVE_STATS_FD``), so its counters are read directly, exact and current,
with no message per request. Only gauges (requests in flight, busy threads)
are asked for, once per scrape, over the channel, and awaited at most
``PUBLISH_TIMEOUT``; a worker that does not answer in time is counted with its
last published gauges. When a worker exits, whatever ended it (recycling,
reload, crash, SIGKILL), its last counts are folded into a retired total and
its block is freed: counters never go backwards, gauges are the live workers'.

**Supervision** (:class:`Supervisor`, one trio task per worker plus one loop
that reconciles wanted and actual workers):

* a worker that exits with status 0 on its own has served ``--max-requests``
  (or was sent SIGTERM by someone): it is replaced at once (recycling);
* a worker that dies (non-zero status or a signal) or exits before it was ready
  is replaced after a delay that starts at 0.1 s and doubles up to 10 s, so a
  crashing app does not spin; a worker that lived 10 s resets the delay;
* with ``--reload`` (:mod:`trioserve.reloader`), a change to a watched file is a
  reload, and a worker that fails to boot is not retried: the supervisor waits
  for the next change (the worker has shown its error), while an older worker,
  if any, keeps serving;
* a worker that fails to boot before any worker has ever been ready stops
  everything, with that worker's exit status (2 for "no such module"): at
  startup such a failure is nearly always a mistake a retry will not fix (a
  wrong app path, a syntax error, a missing dependency), and the one running
  the command is watching. gunicorn exits in the same situation. Once workers
  have been serving, the supervisor never gives up: the remaining workers keep
  serving while it retries with backoff (a reload with broken code keeps the
  old workers, see below).

**Signals to the parent:**

========== ======================================================================
SIGTERM,   graceful stop: stop starting workers, tell every worker to stop
SIGINT     gracefully (each drains for up to ``--graceful-timeout``), close the
           parent's copies of the sockets, wait for the workers, exit 0. Workers
           still running ``--graceful-timeout`` + 5 s later are killed.
again      every worker is told to stop at once; any still running 5 s later
           is killed with SIGKILL.
SIGHUP     graceful reload: start N new workers (they import the app anew and
           re-read ``--config``); once all of them are ready, stop the old ones
           gracefully. Sockets stay open throughout, so no connection is
           refused and no request fails. If the new workers cannot boot, the old
           ones keep serving while the new ones are retried with backoff.
SIGTTIN    one worker more.
SIGTTOU    one worker fewer (the oldest stops gracefully; never below one).
========== ======================================================================

Every log line carries the pid of the process writing it; the parent logs each
worker's start, readiness and exit (with exit status or signal).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from . import reloader
from .config import Config, ConfigError, options
from .listeners import bind_listeners, format_sockname, remove_socket_files, systemd_listeners
from .server import Server
from .stats import ServerStats, SharedStats, Snapshot, attach_shared_stats
from .tls import check_tls_files

LOGGER = logging.getLogger("trioserve.error")

WORKER_ENV = "TRIOSERVE_WORKER"
READY_FD_ENV = "TRIOSERVE_READY_FD"
STATS_FD_ENV = "TRIOSERVE_STATS_FD"

BACKOFF_INITIAL = 0.1  # seconds before replacing a worker that died
BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that lived this long resets the backoff
KILL_MARGIN = 5.0  # beyond --graceful-timeout before a stopping worker is killed
IMMEDIATE_GRACE = 5.0  # after a second stop signal, before the remaining workers are killed
# A scrape waits this long for the workers' gauges: a worker's trio loop answers
# in microseconds unless it is stuck, and Prometheus's scrape timeout is 10 s.
PUBLISH_TIMEOUT = 1.0

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SIGNALS = (*_STOP_SIGNALS, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


def in_worker() -> bool:
    """True in a worker process started by the supervisor."""
    return os.environ.get(WORKER_ENV) == "1"


def ignore_terminal_signals() -> None:
    """In a worker: leave SIGINT (Ctrl-C) and SIGHUP (hangup) to the parent.

    Terminals send them to the whole process group; a worker would otherwise
    take a Ctrl-C plus the parent's SIGTERM as two stop signals (stop at once)
    and die of a hangup the parent turns into a reload.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


READY = b"R"  # worker -> parent: serving
STOP = b"S"  # parent -> worker: stop gracefully
QUIT = b"Q"  # parent -> worker: stop now
RETIRE = b"s"  # parent -> worker: stop gracefully, a routine replacement (--reload): quietly
PUBLISH = b"P"  # parent -> worker: write your gauges into your stats block (a scrape)
PUBLISHED = b"p"  # worker -> parent: done


async def report_ready(server: Server, cancel_scope: trio.CancelScope) -> None:
    """In a worker: tell the parent we serve, then obey its stop requests (see the docstring).

    Run as a task beside the server; does nothing outside a worker. A stop
    request is :meth:`Server.stop_nowait`, stopping now cancels ``cancel_scope``
    (the same two steps as a first and a second SIGTERM), and the parent
    going away is a graceful stop.
    """
    fd = os.environ.get(READY_FD_ENV)
    if not fd:
        return
    try:
        raw = socket.socket(fileno=int(fd))
    except (OSError, ValueError):
        LOGGER.warning("%s=%s is not a socket: not reporting readiness", READY_FD_ENV, fd)
        return
    raw.set_inheritable(False)  # not for processes the app starts
    with trio.socket.from_stdlib_socket(raw) as channel:
        try:
            await channel.send(READY)
            while data := await channel.recv(64):
                if PUBLISH in data:
                    server.snapshot()  # publishes the gauges into the shared block
                    await channel.send(PUBLISHED)
                if QUIT in data:
                    LOGGER.info("Supervisor: stop now")
                    cancel_scope.cancel()
                    return
                if STOP in data or RETIRE in data:
                    LOGGER.log(
                        logging.INFO if STOP in data else logging.DEBUG,
                        "Supervisor: stop gracefully; finishing in-flight requests (up to %.0fs)",
                        server.config.graceful_timeout,
                    )
                    server.stop_nowait()
        except OSError:
            pass
    LOGGER.warning("The supervisor process is gone: stopping gracefully")
    server.stop_nowait()


def worker_stats() -> ServerStats | None:
    """In a worker: the counters' block the supervisor shares with us, if it made one."""
    fd = os.environ.get(STATS_FD_ENV)
    if not fd:
        return None
    stats = attach_shared_stats(int(fd)) if fd.isdigit() else None
    if stats is None:
        LOGGER.warning(
            "%s=%s is not a counters block of this trioserve version:"
            " this worker's requests are missing from /metrics",
            STATS_FD_ENV,
            fd,
        )
    return stats


# Options whose effect a worker inherits from the supervisor rather than acts on:
# the sockets (passed as descriptors), the pid file, the working directory, the
# user and group, the umask, watching files for --reload, and serving metrics.
SUPERVISOR_ONLY = frozenset(
    {
        "bind",
        "workers",
        "pid",
        "chdir",
        "user",
        "group",
        "umask",
        "reload",
        "reload_dir",
        "metrics_bind",
    }
)


def worker_command(config: Config, app: str | None, binds: Sequence[str]) -> list[str]:
    """The command line of a worker: ``app``, ``config`` as flags, ``binds``, ``--workers 1``.

    Only fields that differ from their defaults are written, and none of
    :data:`SUPERVISOR_ONLY`; parsing the result gives back ``config`` with the
    worker's ``bind`` and ``workers`` (and the supervisor-only fields at their
    defaults).
    """
    command = [sys.executable, "-m", "trioserve"]
    if app is not None:
        command.append(app)
    defaults = Config()
    for field in options():
        value = getattr(config, field.name)
        if field.name in SUPERVISOR_ONLY or value == getattr(defaults, field.name):
            continue
        flags = field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)
        flag = next(flag for flag in flags if flag.startswith("--"))
        if isinstance(value, bool):
            command.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            command.extend(f"{flag}={item}" for item in value)
        else:
            command.append(f"{flag}={value}")  # "=": a value may start with "-"
    command.extend(f"--bind={bind}" for bind in binds)
    command.append("--workers=1")
    return command


async def run_supervisor(
    config: Config,
    app: str | None,
    load_config: Callable[[], Config] | None = None,
    after_bind: Callable[[], None] | None = None,
) -> int:
    """Bind, run ``config.workers`` workers until stopped; the exit status for the parent.

    Args:
      config: the options (with ``reload``, a change to a watched file reloads).
      app: ``MODULE:ATTR`` for the workers (None with ``--root``).
      load_config: reads the options again on SIGHUP (the command line over
        ``--config FILE``); None keeps ``config``.
      after_bind: called once the sockets are bound, before the TLS files are
        read and any worker starts (the place to drop root privileges).

    Raises:
      ConfigError: an address cannot be bound or the TLS files cannot be read
        (checked here too, so the error is reported once, before any worker).
    """
    listeners = systemd_listeners()
    if listeners:
        LOGGER.info("Serving %d socket(s) from systemd (LISTEN_FDS)", len(listeners))
    metrics_listeners: list[trio.SocketListener] = []
    try:
        if not listeners:
            listeners = await bind_listeners(config)
        if config.metrics_bind is not None:
            from .metrics import bind_metrics  # prometheus_client: only when asked for

            metrics_listeners = await bind_metrics(config)
        if after_bind is not None:
            after_bind()
        if config.certfile:
            check_tls_files(config)
        scheme = "https" if config.certfile else "http"
        for listener in listeners:
            address = format_sockname(listener.socket)
            LOGGER.info(
                "Listening on %s",
                address if address.startswith("unix:") else f"{scheme}://{address}",
            )
        supervisor = Supervisor(config, app, listeners, load_config, metrics_listeners)
        return await supervisor.run()
    finally:
        for listener in (*listeners, *metrics_listeners):
            listener.socket.close()
        remove_socket_files([*listeners, *metrics_listeners])


def describe_exit(returncode: int) -> str:
    """``exit status 1`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


@dataclasses.dataclass(eq=False)
class _Worker:
    generation: int
    started_at: float
    process: trio.Process | None = None  # None while it is being started
    channel: socket.socket | None = None  # our end of the channel, once started
    ready: bool = False
    retiring: bool = False  # we asked it to stop
    hurried: bool = False  # ... and then to stop now
    kill_at: float = math.inf  # SIGKILL if still running then
    stop_message: bytes = STOP  # how it is asked to stop gracefully (RETIRE: quietly)
    stats: SharedStats | None = None  # its counters (--metrics-bind), until folded in
    published: int = 0  # PUBLISHED answers received

    def tell(self, message: bytes) -> None:
        """Send a stop request (ignored if the worker is gone, or not started: see _run_worker)."""
        if self.channel is not None:
            try:
                self.channel.send(message)
            except OSError:
                pass  # it exited: nothing left to stop

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


class Supervisor:
    """Runs and replaces the worker processes; see the module docstring.

    Args:
      config: the parent's options (workers, graceful_timeout, the workers' options).
      app: ``MODULE:ATTR`` for the workers' command line.
      listeners: the bound sockets the workers inherit; closed by the caller.
      load_config: reads the options again for a reload (see :meth:`reload`).
      metrics_listeners: where to serve ``/metrics`` (bound ``--metrics-bind``), if anywhere.
    """

    def __init__(
        self,
        config: Config,
        app: str | None,
        listeners: Sequence[trio.SocketListener],
        load_config: Callable[[], Config] | None = None,
        metrics_listeners: Sequence[trio.SocketListener] = (),
    ) -> None:
        self.config = config
        self.app = app
        self.load_config = load_config
        self.listeners = list(listeners)
        self.fds = tuple(listener.socket.fileno() for listener in self.listeners)
        self.binds = [f"fd://{fd}" for fd in self.fds]
        self.command = worker_command(config, app, self.binds)
        # --reload: a worker that fails to boot waits for the next change, and
        # starting and stopping workers is routine, so only the reload itself
        # is announced at INFO.
        self.reload_on_change = config.reload
        self._routine = logging.DEBUG if config.reload else logging.INFO
        self.target = config.workers
        self.generation = 0
        self.workers: list[_Worker] = []
        self.stopping = False
        self.stop_signals = 0
        self.exit_status = 0
        self.ever_ready = False
        self.failures = 0
        self.next_spawn_at = -math.inf
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.metrics_listeners = list(metrics_listeners)
        self.retired = Snapshot()  # the counters of workers that have exited
        self._published = trio.Event()  # a worker answered PUBLISH, or exited

    def _notify(self) -> None:
        self._changed.set()

    async def run(self) -> int:
        """Supervise until stopped (a signal, or a boot failure at startup); the exit status."""
        with trio.open_signal_receiver(*_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._handle_signals, signals)
                if self.metrics_listeners:
                    from .metrics import serve_metrics

                    await nursery.start(serve_metrics, self.read_stats, self.metrics_listeners)
                if self.reload_on_change:
                    nursery.start_soon(reloader.watch, self.config.reload_dir, self.reload)
                LOGGER.log(self._routine, "Starting %d worker processes", self.target)
                await self._supervise()
                nursery.cancel_scope.cancel()
        return self.exit_status

    async def _supervise(self) -> None:
        while True:
            changed = self._changed = trio.Event()
            now = trio.current_time()
            wake = math.inf
            if self.stopping:
                if not any(worker.process is None for worker in self.workers):
                    # No worker is being started with these descriptors: close our copies,
                    # so each socket closes when the last worker stops listening.
                    for listener in self.listeners:
                        listener.socket.close()
                if not self.workers:
                    return
            else:
                wake = self._reconcile(now)
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    if worker.kill_at <= now:
                        LOGGER.warning("Worker %d did not stop in time: killing it", worker.pid)
                        worker.process.kill()
                        worker.kill_at = math.inf
                    wake = min(wake, worker.kill_at)
            with trio.move_on_at(wake):
                await changed.wait()

    def _reconcile(self, now: float) -> float:
        """Start, stop and retire workers towards the wanted state; when to look again."""
        current = [w for w in self.workers if w.generation == self.generation and not w.retiring]
        for extra in current[: max(0, len(current) - self.target)]:  # oldest first
            LOGGER.info("Stopping worker %d gracefully (one worker fewer)", extra.pid)
            self._retire(extra, now)
            current.remove(extra)
        missing = self.target - len(current)
        if missing > 0:
            if now < self.next_spawn_at:
                return self.next_spawn_at
            for _ in range(missing):
                self._spawn(now)
        elif all(worker.ready for worker in current):
            old = [w for w in self.workers if w.generation < self.generation and not w.retiring]
            if old:
                LOGGER.log(
                    self._routine,
                    "New workers are ready: stopping %d old worker(s) gracefully (%s)",
                    len(old),
                    ", ".join(str(worker.pid) for worker in old),
                )
                for worker in old:
                    self._retire(worker, now)
        return math.inf

    def _spawn(self, now: float) -> None:
        assert self._nursery is not None
        worker = _Worker(generation=self.generation, started_at=now)
        self.workers.append(worker)
        self._nursery.start_soon(self._run_worker, worker)

    def _retire(self, worker: _Worker, now: float) -> None:
        """Ask a worker to stop gracefully, with a deadline for SIGKILL."""
        worker.retiring = True
        worker.kill_at = now + self.config.graceful_timeout + KILL_MARGIN
        worker.stop_message = RETIRE if self.reload_on_change and not self.stopping else STOP
        worker.tell(worker.stop_message)

    async def _handle_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            now = trio.current_time()
            if signum in _STOP_SIGNALS:
                self.stop_signals += 1
                if self.stop_signals == 1:
                    LOGGER.info(
                        "Received %s: stopping the workers gracefully (up to %.0fs);"
                        " send again to stop now",
                        name,
                        self.config.graceful_timeout,
                    )
                    self._begin_stop(now)
                else:
                    LOGGER.info("Received %s again: stopping the workers now", name)
                    for worker in self.workers:
                        worker.hurried = True
                        worker.tell(QUIT)
                        worker.kill_at = min(worker.kill_at, now + IMMEDIATE_GRACE)
            elif self.stopping:
                LOGGER.info("Received %s while stopping: ignored", name)
            elif signum == signal.SIGHUP:
                self.reload("Received SIGHUP")
            elif signum == signal.SIGTTIN:
                self.target += 1
                LOGGER.info("Received SIGTTIN: %d workers", self.target)
            elif signum == signal.SIGTTOU:
                if self.target > 1:
                    self.target -= 1
                LOGGER.info("Received SIGTTOU: %d worker(s)", self.target)
            self._notify()

    def reload(self, reason: str) -> None:
        """Replace every worker by a new one, with the options read again.

        Options that no longer load (a broken ``--config`` file, TLS files
        that do not load) are logged and the running workers kept.
        """
        if self.load_config is not None:
            try:
                config = self.load_config()
                if config.certfile:
                    check_tls_files(config)
            except ConfigError as exc:
                LOGGER.error("%s: not reloading, the options do not load: %s", reason, exc)
                return
            self.config = config
            self.command = worker_command(config, self.app, self.binds)
        self.generation += 1
        self.next_spawn_at = -math.inf  # new code: no backoff left over from the old
        if self.reload_on_change:
            workers = "the worker" if self.target == 1 else f"{self.target} workers"
            LOGGER.info("%s: restarting %s", reason, workers)
        else:
            LOGGER.info(
                "%s: starting %d new workers, then stopping the old ones", reason, self.target
            )
        self._notify()

    def _begin_stop(self, now: float) -> None:
        self.stopping = True
        for worker in self.workers:
            if not worker.retiring:  # a retiring one is already stopping gracefully
                self._retire(worker, now)
        self._notify()

    async def read_stats(self) -> Snapshot:
        """Every worker's counts summed, exited ones' included; the live ones' gauges, fresh.

        Asks the serving workers to publish their gauges and waits for their
        answers (at most PUBLISH_TIMEOUT), then reads every block at once.
        """
        asked = [
            (worker, worker.published)
            for worker in self.workers
            if worker.ready and worker.stats is not None and worker.channel is not None
        ]
        for worker, _ in asked:
            worker.tell(PUBLISH)
        with trio.move_on_after(PUBLISH_TIMEOUT):
            while any(w.published == before and w in self.workers for w, before in asked):
                await self._published.wait()
        total = self.retired
        for worker in self.workers:
            if worker.stats is not None:
                total += worker.stats.stats.read()
        return total

    def _answered(self) -> None:
        self._published.set()
        self._published = trio.Event()

    async def _run_worker(self, worker: _Worker) -> None:
        parent_end, child_end = socket.socketpair()
        try:
            try:
                with child_end:
                    env = dict(os.environ)
                    env[WORKER_ENV] = "1"
                    env[READY_FD_ENV] = str(child_end.fileno())
                    fds = (*self.fds, child_end.fileno())
                    if self.metrics_listeners:
                        worker.stats = SharedStats()
                        env[STATS_FD_ENV] = str(worker.stats.fd)
                        fds += (worker.stats.fd,)
                    process = await trio.lowlevel.open_process(
                        self.command, stdin=subprocess.DEVNULL, pass_fds=fds, env=env
                    )
            except OSError as exc:
                LOGGER.error("Cannot start a worker process: %s", exc)
                self._worker_exited(worker, 1)
                return
            worker.process = process
            worker.channel = parent_end
            LOGGER.log(self._routine, "Started worker %d", process.pid)
            if worker.retiring:  # asked while it was being started
                worker.tell(worker.stop_message)
            if worker.hurried:
                worker.tell(QUIT)
            channel = trio.socket.from_stdlib_socket(parent_end)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_channel, worker, channel)
                    await process.wait()
                    nursery.cancel_scope.cancel()
            finally:
                if process.returncode is None:  # the supervisor itself is being cancelled
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
            if not worker.ready:
                try:  # it may have reported ready just before it exited
                    if parent_end.recv(1):
                        self._mark_ready(worker)
                except OSError:
                    pass
        finally:
            worker.channel = None
            parent_end.close()
        assert process.returncode is not None
        self._worker_exited(worker, process.returncode)

    async def _read_channel(self, worker: _Worker, channel: trio.socket.SocketType) -> None:
        """The worker's side of the channel: READY once, then PUBLISHED answers."""
        while True:
            try:
                data = await channel.recv(64)
            except OSError:
                return
            if not data:
                return
            if READY in data and not worker.ready:
                self._mark_ready(worker)
            if PUBLISHED in data:
                worker.published += data.count(PUBLISHED)
                self._answered()

    def _mark_ready(self, worker: _Worker) -> None:
        worker.ready = True
        self.ever_ready = True
        LOGGER.log(
            self._routine,
            "Worker %d is serving (ready after %.1fs)",
            worker.pid,
            trio.current_time() - worker.started_at,
        )
        self._notify()

    def _worker_exited(self, worker: _Worker, returncode: int) -> None:
        self.workers.remove(worker)
        if worker.stats is not None:
            self.retired += worker.stats.stats.read().retired()
            worker.stats.close()
            worker.stats = None
            self._answered()  # a scrape waiting for this worker waits no more
        now = trio.current_time()
        lived = now - worker.started_at
        how = describe_exit(returncode)
        if self.stopping or worker.retiring:
            LOGGER.log(self._routine, "Worker %d exited (%s)", worker.pid, how)
        elif worker.generation < self.generation:
            # A reload is replacing it anyway: nothing to start in its place.
            level = self._routine if returncode == 0 else logging.WARNING
            LOGGER.log(level, "Worker %d exited (%s) during a reload", worker.pid, how)
        elif not worker.ready and self.reload_on_change:
            # The error is on stderr already, from the worker: wait for a fix.
            LOGGER.error(
                "Worker %d failed to boot (%s): waiting for a change to the code", worker.pid, how
            )
            self.next_spawn_at = math.inf
        elif not worker.ready and not self.ever_ready:
            LOGGER.error(
                "Worker %d failed to boot (%s) before any worker was serving: stopping",
                worker.pid,
                how,
            )
            self.exit_status = returncode if returncode > 0 else 1
            self._begin_stop(now)
        elif worker.ready and returncode == 0:
            LOGGER.info(
                "Worker %d exited (%s) after %.1fs (max-requests reached or told to stop):"
                " starting a new one",
                worker.pid,
                how,
                lived,
            )
        else:
            if lived >= STABLE_AFTER:
                self.failures = 0
            delay = min(BACKOFF_INITIAL * 2 ** min(self.failures, 20), BACKOFF_MAX)
            self.failures += 1
            self.next_spawn_at = max(self.next_spawn_at, now + delay)
            LOGGER.error(
                "Worker %d %s (%s) after %.1fs: starting a new one in %.1fs",
                worker.pid,
                "died" if worker.ready else "failed to boot",
                how,
                lived,
                delay,
            )
        self._notify()
