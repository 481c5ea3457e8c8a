"""The ``bff run`` parent: it binds the sockets, runs the workers, restarts them, reloads, stops.

One listening socket per worker *slot*, bound here (with SO_REUSEPORT when there are several, so
the kernel spreads connections evenly) and inherited by the slot's worker. A socket outlives its
workers: connections that arrive while a worker restarts wait in its queue, and on SIGHUP the new
worker of a slot accepts on the very socket the old one used, so nothing is refused or reset (a
socket of its own per new worker would drop what the kernel had queued on the old one when it
closed). Even one worker runs under the supervisor, so reload and restart work the same.

* A worker that dies is logged and restarted, after a backoff that doubles (0.5 s .. 30 s) while
  workers keep dying young, so a crash loop does not spin.
* SIGTERM/SIGINT: every worker drains (``/readyz`` 503, still accepting) for ``shutdown.drain``,
  stops accepting, finishes in-flight requests within ``shutdown.grace`` and exits; the parent
  waits for them (SIGKILL after drain + grace + 10 s) and exits 0 when all did.
* SIGHUP: the config file is read and validated; if it is invalid, nothing changes and the log
  says why. Else each slot gets a new worker; once it serves, the old one is told (SIGUSR2) to
  stop accepting and finish its requests. If the first new worker does not come up, the reload
  is abandoned and the old workers stay. Listen address and worker count need a restart.
* The workers die with the parent (``bff.worker.die_with_parent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bff.config import MAX_CONFIG_BYTES, ConfigError, Settings, parse_settings

__all__ = ["Supervisor", "available_cpus", "bind_slots", "read_config"]

log = logging.getLogger("bff.lifecycle")

#: How long a new worker may take to say it serves before a reload gives up on it.
START_TIMEOUT: Final = 60.0
#: A worker that lived this long before dying restarts at once (its crash was not a loop).
STABLE_AFTER: Final = 10.0
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 30.0
_POLL: Final = 0.1


def available_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    A container limited to 2 CPUs on a 64-core host must not start 64 workers. cgroup v2
    ``cpu.max`` ("max 100000" or "QUOTA PERIOD") and v1 ``cpu.cfs_quota_us`` / ``cfs_period_us``
    (-1: none) are read; a fractional quota rounds up.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    try:
        fields = (root / "cpu.max").read_text().split()
        if len(fields) == 2 and fields[0] != "max" and int(fields[1]) > 0:
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def read_config(path: str) -> tuple[str, Settings]:
    """The file's text and its settings: the text is what workers get, so they run exactly
    what was validated here (raises ConfigError)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a config file"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not valid UTF-8 (byte {exc.start})"]) from None
    return text, parse_settings(text, path, base_dir=Path(path).absolute().parent)


def bind_slots(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on ``host:port`` (SO_REUSEPORT when more than one).

    First a plain bind, without SO_REUSEPORT, which fails while anything listens there: a second
    ``bff run`` on the same port must be refused, not served beside the first with another
    config (SO_REUSEPORT alone would let it in).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        probe.bind((host, port))
        port = probe.getsockname()[1]
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if count > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


@dataclass(slots=True)
class _Worker:
    slot: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid


def _exit_text(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


class Supervisor:
    """Runs the workers of one ``bff run`` (see the module docstring for what it guarantees)."""

    def __init__(
        self,
        path: str,
        text: str,
        settings: Settings,
        socks: list[socket.socket],
        *,
        metrics_port: int | None = None,
    ) -> None:
        self.path, self.text, self.settings = path, text, settings
        self.socks = socks
        self.metrics_port = metrics_port
        self.slots: list[_Worker | None] = [None] * len(socks)
        self.retiring: list[_Worker] = []  # replaced on reload, finishing their requests
        self.pending: _Worker | None = None  # a reload's new worker, not yet serving
        self.failures = [0] * len(socks)  # consecutive early deaths per slot (backoff)
        self.restart_at: list[float | None] = [None] * len(socks)
        self.restarts = 0  # workers restarted after they died, since start
        # Called with the pid of every worker that ended, whatever the cause (e.g. for metrics
        # kept per process, which must be told when one is gone).
        self.on_exit: list[Callable[[int], None]] = []
        self.stopping = False
        self._reload: asyncio.Task[None] | None = None
        self._reload_again = False

    # -- workers

    def _spawn(self, slot: int) -> tuple[_Worker, int]:
        """A new worker on ``slot``'s socket; and the read end of its ready pipe."""
        sock = self.socks[slot]
        ready_r, ready_w = os.pipe()
        argv = [
            sys.executable, "-m", "bff.worker",
            "--source", self.path,
            "--fd", str(sock.fileno()),
            "--ready-fd", str(ready_w),
            "--parent", str(os.getpid()),
        ]  # fmt: skip
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_port)]
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                argv, stdin=subprocess.PIPE, pass_fds=(sock.fileno(), ready_w)
            )
        finally:
            os.close(ready_w)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # a worker that died at once: seen as exited
            proc.stdin.write(self.text.encode())
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        worker = _Worker(slot, proc)
        log.info("worker.started", extra={"event": "worker.started", "slot": slot, "pid": proc.pid})
        return worker, ready_r

    async def _wait_ready(self, worker: _Worker, ready_r: int, limit: float) -> bool:
        """True once the worker wrote its ready byte; False if it exited or timed out."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            if not done.done():
                try:
                    done.set_result(os.read(ready_r, 1))
                except OSError:
                    done.set_result(b"")

        loop.add_reader(ready_r, readable)
        try:
            return await asyncio.wait_for(done, limit) == b"R"
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(ready_r)
            os.close(ready_r)

    def _start(self, slot: int) -> None:
        worker, ready_r = self._spawn(slot)
        os.close(ready_r)  # nobody waits: the socket queues connections until it accepts
        self.slots[slot] = worker

    def _reap(self) -> None:
        """Notice dead workers: restart a slot's (with backoff), forget a retired one's."""
        now = time.monotonic()
        for old in list(self.retiring):
            code = old.proc.poll()
            if code is not None:
                self.retiring.remove(old)
                self._exited(old.pid)
                log.info(
                    "worker.retired",
                    extra={"event": "worker.retired", "slot": old.slot, "pid": old.pid,
                           "status": _exit_text(code)},
                )  # fmt: skip
        for slot, worker in enumerate(self.slots):
            if worker is None:
                due = self.restart_at[slot]
                if due is not None and now >= due and not self.stopping:
                    self.restart_at[slot] = None
                    self.restarts += 1
                    self._start(slot)
                continue
            code = worker.proc.poll()
            if code is None or self.stopping:
                continue
            lived = now - worker.started
            self.failures[slot] = 0 if lived >= STABLE_AFTER else self.failures[slot] + 1
            n = self.failures[slot]
            delay = 0.0 if n == 0 else min(BACKOFF_FIRST * 2 ** (n - 1), BACKOFF_MAX)
            self.slots[slot] = None
            self._exited(worker.pid)
            self.restart_at[slot] = now + delay
            log.error(
                "worker.died",
                extra={"event": "worker.died", "slot": slot, "pid": worker.pid,
                       "status": _exit_text(code), "lived_seconds": round(lived, 3),
                       "restart_in": delay, "restarts": self.restarts + 1},
            )  # fmt: skip

    def _exited(self, pid: int) -> None:
        for hook in self.on_exit:
            try:
                hook(pid)
            except Exception:  # a hook must not take the supervisor down
                log.exception("worker.exit_hook_failed", extra={"event": "worker.exit_hook_failed"})

    def _live(self) -> list[_Worker]:
        return [w for w in (*self.slots, *self.retiring, self.pending) if w is not None]

    # -- reload

    def _request_reload(self) -> None:
        if self.stopping:
            return
        if self._reload is not None and not self._reload.done():
            self._reload_again = True
            log.info("reload.queued", extra={"event": "reload.queued"})
            return
        self._reload = asyncio.create_task(self._reload_workers())

    async def _reload_workers(self) -> None:
        while True:
            self._reload_again = False
            await self._reload_once()
            if not self._reload_again or self.stopping:
                return

    async def _reload_once(self) -> None:
        log.info("reload.start", extra={"event": "reload.start", "config": self.path})
        try:
            text, settings = read_config(self.path)
        except ConfigError as exc:
            log.error(
                "reload.refused",
                extra={"event": "reload.refused", "config": self.path,
                       "problems": exc.problems, "detail": "nothing changed"},
            )  # fmt: skip
            return
        if settings.session.store == "memory://" and len(self.socks) > 1:
            log.error(
                "reload.refused",
                extra={"event": "reload.refused", "config": self.path, "detail": "nothing changed",
                       "problems": [f"session.store: memory:// holds sessions in one process, "
                                    f"but bff runs {len(self.socks)} workers"]},
            )  # fmt: skip
            return
        old = self.settings
        needs_restart = [
            name
            for name, changed in (
                ("listen", settings.listen != old.listen),
                ("workers", settings.workers != old.workers),
            )
            if changed
        ]
        if needs_restart:
            log.warning(
                "reload.needs_restart",
                extra={"event": "reload.needs_restart", "keys": needs_restart},
            )
        previous_text = self.text
        self.text = text
        replaced = 0
        for slot in range(len(self.socks)):
            if self.stopping:
                return
            worker, ready_r = self._spawn(slot)
            self.pending = worker
            if not await self._wait_ready(worker, ready_r, START_TIMEOUT):
                self.pending = None
                worker.proc.kill()
                await asyncio.to_thread(worker.proc.wait)
                self._exited(worker.pid)
                if replaced == 0:
                    self.text = previous_text  # restarts keep running the old config
                log.error(
                    "reload.failed",
                    extra={"event": "reload.failed", "slot": slot, "replaced": replaced,
                           "detail": "a new worker did not start; see its output above"},
                )  # fmt: skip
                return
            current = self.slots[slot]
            self.slots[slot], self.pending = worker, None
            self.failures[slot] = 0
            self.restart_at[slot] = None
            if current is not None and current.proc.poll() is None:
                self.retiring.append(current)
                current.proc.send_signal(signal.SIGUSR2)
            replaced += 1
        self.settings = settings
        from bff import log as bff_log

        bff_log.configure(settings)  # the parent's own log level and format follow the file
        log.info("reload.done", extra={"event": "reload.done", "workers": replaced})

    # -- the whole life

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        for slot in range(len(self.socks)):
            self._start(slot)
        while not stop.is_set():
            self._reap()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _POLL)
        return await self._shutdown()

    async def _shutdown(self) -> int:
        self.stopping = True
        shutdown = self.settings.shutdown
        live = self._live()
        log.info(
            "shutdown.start",
            extra={"event": "shutdown.start", "workers": len(live), "drain": shutdown.drain,
                   "grace": shutdown.grace},
        )  # fmt: skip
        if self._reload is not None:
            self._reload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload
            live = self._live()
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)  # it may have had it from the group too
        deadline = time.monotonic() + shutdown.drain + shutdown.grace + 10
        # Polled: child exit has no event here (no SIGCHLD handler, no child watcher thread).
        while any(w.proc.poll() is None for w in live) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_POLL)
        code = 0
        for worker in live:
            if worker.proc.poll() is None:
                log.error("shutdown.kill", extra={"event": "shutdown.kill", "pid": worker.pid})
                worker.proc.kill()
            status = await asyncio.to_thread(worker.proc.wait)
            self._exited(worker.pid)
            if status != 0:
                code = 1
        for sock in self.socks:
            sock.close()
        log.info("shutdown.done", extra={"event": "shutdown.done", "exit": code})
        return code
