"""The ``bff`` command: ``run``, ``check-config`` and ``sessions`` (operators' session control).

A bad config prints one line per problem and exits 2; no traceback ever reaches an operator.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence

import aiohttp

from bff.config import ConfigError, Settings, dump_redacted, load_settings
from bff.errors import ProviderUnavailable

__all__ = ["main"]


def _load(path: str | None) -> Settings:
    path = path or os.environ.get("BFF_CONFIG")
    if not path:
        raise ConfigError(["no config file: pass --config FILE or set BFF_CONFIG"])
    return load_settings(path)


def _run_worker(config: str | None, host: str, port: int, reuse_port: bool) -> None:
    from bff import log
    from bff.app import create_app
    from bff.server import run

    settings = _load(config)
    log.configure(settings)
    _install_fast_loop()
    _tune_gc()
    run(create_app(settings), settings, host, port, reuse_port=reuse_port)


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


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    host = args.host or settings.listen.host
    port = args.port if args.port is not None else settings.listen.port
    workers = args.workers or os.cpu_count() or 1
    print(
        f"bff: serving {settings.public_url} on {host}:{port} with {workers} worker(s)", flush=True
    )
    if workers == 1:
        _run_worker(args.config, host, port, reuse_port=False)
        return 0
    # One process per core, all bound to one port with SO_REUSEPORT; the kernel spreads
    # connections. They share nothing but the store, like instances behind a load balancer.
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_run_worker, args=(args.config, host, port, True), daemon=False)
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()

    def stop(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for proc in procs:
        proc.join()
    return max((p.exitcode or 0) for p in procs)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.file)
    print(f"{args.file}: configuration is valid")
    if args.show:
        print(json.dumps(dump_redacted(settings), indent=2, default=str))
    if args.offline:
        return 0
    try:
        asyncio.run(_check_issuer(settings))
    except ProviderUnavailable as exc:
        print(
            f"{args.file}: oidc.issuer {settings.oidc.issuer} is unreachable: {exc}",
            file=sys.stderr,
        )
        return 1
    print(f"oidc.issuer {settings.oidc.issuer}: discovery OK")
    return 0


async def _check_issuer(settings: Settings) -> None:
    from bff.oidc import OidcClient

    async with aiohttp.ClientSession() as http:
        client = OidcClient(settings.oidc, http, redirect_uri=settings.redirect_uri)
        await client.metadata()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bff", description="Backend-for-frontend session proxy")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve")
    run.add_argument("--config", help="YAML config file (default: $BFF_CONFIG)")
    run.add_argument("--host", help="override listen.host")
    run.add_argument("--port", type=int, help="override listen.port")
    run.add_argument("--workers", type=int, help="worker processes (default: number of cores)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file without serving")
    check.add_argument("file")
    check.add_argument("--show", action="store_true", help="print the settings, secrets masked")
    check.add_argument("--offline", action="store_true", help="skip the OP discovery check")
    check.set_defaults(func=cmd_check_config)

    try:
        from bff import admin
    except ImportError:
        pass
    else:
        admin.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
