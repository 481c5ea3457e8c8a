"""One worker process of ``bff run`` (started by :mod:`bff.supervisor`, never by hand).

The parent hands each worker three things: the config text it validated (on stdin, so a file
edited without a SIGHUP never reaches a restarted worker), a listening socket it bound (``--fd``;
the socket outlives any one worker, so a replacement accepts what queued meanwhile and a reload
never refuses a connection), and a pipe (``--ready-fd``) on which the worker says "serving".

Signals: SIGTERM/SIGINT drain (``/readyz`` 503 for ``shutdown.drain`` while still accepting), then
stop accepting, close WebSockets with 1001 and let requests finish within ``shutdown.grace``.
SIGUSR2 (sent by the parent on reload) skips the drain: the new worker already accepts on the same
socket. SIGHUP is the parent's business and is ignored here. The worker dies with its parent
(``PR_SET_PDEATHSIG`` on Linux, else a watch on the parent's pid).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from aiohttp import web

from bff.config import ConfigError, Settings, parse_settings
from bff.lifecycle import GOING_AWAY, LIFECYCLE

__all__ = ["main", "serve_worker"]

log = logging.getLogger("bff.lifecycle")

_PR_SET_PDEATHSIG: Final = 1
#: How long a new worker waits for the OP's metadata before it says it is ready anyway.
READY_WAIT: Final = 10.0


def die_with_parent(parent: int) -> bool:
    """SIGTERM this process when ``parent`` dies (a SIGKILLed ``bff run`` leaves no orphans);
    False when the kernel cannot do it, and :func:`_watch_parent` must.

    ``prctl(PR_SET_PDEATHSIG)`` is kernel-enforced and costs nothing; it is set after exec, so a
    parent that died in between is caught by the pid check.
    """
    armed = False
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        armed = int(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)) == 0
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
    return armed


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent:  # noqa: ASYNC110 - no event tells a parent died
        await asyncio.sleep(1.0)
    stop.set()


async def _announce_ready(app: web.Application, ready_fd: int | None) -> None:
    """Tell the parent "serving" once every OP's metadata is loaded (bounded: an OP that is down
    must not block a reload forever; bff then answers 503 on login as it would anyway)."""
    if ready_fd is None:
        return
    from bff.services import SERVICES

    deadline = time.monotonic() + READY_WAIT
    providers = app[SERVICES].providers.values()
    while not all(p.ready for p in providers) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    with contextlib.suppress(OSError):
        os.write(ready_fd, b"R")
    os.close(ready_fd)


async def serve_worker(
    app: web.Application,
    settings: Settings,
    sock: socket.socket,
    *,
    ready_fd: int | None = None,
    parent: int | None = None,
) -> None:
    """Serve ``app`` on the inherited ``sock`` until told to stop, then stop as the module says;
    ``parent``: a pid to watch when :func:`die_with_parent` could not arm the kernel."""
    from bff.server import FrontDoorRunner

    loop = asyncio.get_running_loop()
    stop, retire = asyncio.Event(), asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, retire.set)
    watcher = asyncio.create_task(_watch_parent(parent, stop)) if parent is not None else None
    grace = settings.shutdown.grace
    runner = FrontDoorRunner(app, limits=settings.limits, shutdown_timeout=grace)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    await _announce_ready(app, ready_fd)
    pid = os.getpid()
    log.info("worker.serving", extra={"event": "worker.serving", "pid": pid})
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(retire.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        # A second signal must not cut the graceful stop. Replaced, never removed: removing
        # restores SIG_DFL for a moment, and a second SIGTERM in that moment (killpg and the
        # parent's forward arrive together) killed the worker mid-drain.
        loop.add_signal_handler(signum, _ignore)
    if watcher is not None:
        watcher.cancel()
    lifecycle = app[LIFECYCLE]
    lifecycle.draining = True
    if not retire.is_set():
        drain = settings.shutdown.drain
        log.info(
            "shutdown.draining",
            extra={"event": "shutdown.draining", "pid": pid, "drain": drain, "grace": grace},
        )
        await asyncio.sleep(drain)
    else:
        log.info("reload.retiring", extra={"event": "reload.retiring", "pid": pid, "grace": grace})
    await site.stop()  # closes this process's copy of the socket: no more accepts here
    log.info(
        "shutdown.stopped_accepting",
        extra={"event": "shutdown.stopped_accepting", "pid": pid,
               "websockets": len(lifecycle.websockets)},
    )  # fmt: skip
    sockets = list(lifecycle.websockets)
    if sockets:
        closing = [ws.close(code=GOING_AWAY, message=b"server going away") for ws in sockets]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), grace)
    started = time.monotonic()
    await runner.cleanup()  # idle keep-alives closed; in-flight requests get `grace` seconds
    log.info(
        "shutdown.done",
        extra={"event": "shutdown.done", "pid": pid,
               "finish_seconds": round(time.monotonic() - started, 3)},
    )  # fmt: skip


def _tune_gc() -> None:
    """Fewer cyclic-GC passes: a proxied request allocates hundreds of short-lived objects, and
    with the default threshold (700) the collector ran several times per request. Objects from
    start-up are frozen so full collections skip them. Measured: ~12% less CPU per request."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def _install_fast_loop() -> None:
    try:
        import uvloop  # optional: a faster event loop when installed
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _ignore() -> None:
    """A signal during the graceful stop: already stopping."""


def _exit_before_serving(signum: int, frame: object) -> None:
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bff-worker")
    parser.add_argument("--source", required=True, help="the config file's path (messages, base)")
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--ready-fd", type=int, help="pipe to write one byte to when serving")
    parser.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    parser.add_argument("--metrics-port", type=int, help="override metrics.listen.port")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a terminal hangup reaches the whole group
    # Told to stop before serving (nothing accepted yet, nothing to finish): a clean exit, not
    # death by the signal, which the parent would report as a failure. serve_worker takes over.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(signum, _exit_before_serving)
    armed = die_with_parent(args.parent)
    text = sys.stdin.read()
    try:
        settings = parse_settings(text, args.source, base_dir=Path(args.source).absolute().parent)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    from bff import log as bff_log
    from bff.app import create_app
    from bff.health import add_metrics_listener

    bff_log.configure(settings)
    _install_fast_loop()
    app = create_app(settings)
    metrics = settings.metrics.listen
    if metrics is not None:
        port = metrics.port if args.metrics_port is None else args.metrics_port
        # Always SO_REUSEPORT: on reload the new worker binds it while the old one still does.
        add_metrics_listener(app, metrics.host, port, reuse_port=True)
    sock = socket.socket(fileno=args.fd)
    _tune_gc()
    watch = None if armed else args.parent
    asyncio.run(serve_worker(app, settings, sock, ready_fd=args.ready_fd, parent=watch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
