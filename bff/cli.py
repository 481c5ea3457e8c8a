"""The ``bff`` command: ``run``, ``check-config`` and ``sessions`` (operators' session control).

One shape for all: each takes ``--config FILE``, else ``$BFF_CONFIG``. A bad config prints one line
per problem and exits 2; no traceback ever reaches an operator, not even when the output is piped
into ``head`` (exit 141, as for a process that SIGPIPE ended). What ``check-config`` checks beyond
the file is in ``bff.preflight``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import signal
import sys
from collections.abc import Sequence

from bff.config import ConfigError, Settings, dump_redacted, load_settings
from bff.multiproc import metrics_dir, worker_exited
from bff.supervisor import available_cpus

__all__ = ["main"]


def _load(path: str | None) -> Settings:
    path = path or os.environ.get("BFF_CONFIG")
    if not path:
        raise ConfigError(["no config file: pass --config FILE or set BFF_CONFIG"])
    return load_settings(path)


def _worker_count(settings: Settings, flag: int | None) -> tuple[int, str]:
    """How many worker processes, and where that number comes from (for messages)."""
    if flag is not None:
        if flag < 1:
            raise ConfigError([f"--workers must be at least 1, got {flag}"])
        return flag, "set by --workers"
    if settings.workers is not None:
        return settings.workers, "set by workers: in the config"
    return available_cpus(), "the default: one per CPU this process may use"


def _check_workers(settings: Settings, source: str, workers: int, why: str) -> None:
    """A memory:// store lives in one process: with more workers, each has its own sessions and a
    user is logged out whenever the kernel hands a request to another worker. Refuse, loudly."""
    if settings.session.store == "memory://" and workers > 1:
        raise ConfigError([
            f"{source}: session.store: memory:// (the default when store: is left out) holds "
            f"sessions in one process, but bff would run {workers} workers ({why}); each would "
            "have its own sessions. Set session.store to a redis:// URL, or run --workers 1 "
            "(workers: 1 in the config)."
        ])  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    from bff.supervisor import read_config

    path = args.config or os.environ.get("BFF_CONFIG")
    if not path:
        raise ConfigError(["no config file: pass --config FILE or set BFF_CONFIG"])
    text, settings = read_config(path)
    host = args.host or settings.listen.host
    port = args.port if args.port is not None else settings.listen.port
    workers, why = _worker_count(settings, args.workers)
    _check_workers(settings, path, workers, why)
    metrics_port = args.metrics_port
    metrics = settings.metrics.listen
    where = (
        f"/metrics on {metrics.host}:{metrics_port if metrics_port is not None else metrics.port}"
        if metrics is not None
        else "no metrics listener"
    )
    print(
        f"bff: serving {settings.public_url} on {host}:{port} with {workers} worker(s); {where}",
        flush=True,
    )
    with metrics_dir():  # one scrape sums every worker (bff.multiproc)
        return _supervise(path, text, settings, host, port, workers, metrics_port)


def _supervise(
    path: str,
    text: str,
    settings: Settings,
    host: str,
    port: int,
    workers: int,
    metrics_port: int | None,
) -> int:
    """Bind the sockets and run the workers under the supervisor until SIGTERM (even one
    worker: restarts and SIGHUP reloads work the same). The workers share nothing but the store,
    like instances behind a load balancer."""
    from bff import log
    from bff.supervisor import Supervisor, bind_slots

    log.configure(settings)
    try:
        socks = bind_slots(host, port, workers)
    except OSError as exc:
        raise ConfigError([f"cannot listen on {host}:{port}: {exc.strerror or exc}"]) from None
    supervisor = Supervisor(path, text, settings, socks, metrics_port=metrics_port)
    supervisor.on_exit.append(worker_exited)  # its gauges leave the metrics (bff.multiproc)
    return asyncio.run(supervisor.run())


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exit 0: bff will run (warnings may be printed); 1: a check failed (see bff.preflight);
    2: the file is not a config bff runs (or the command line is wrong)."""
    path = _check_config_path(args)
    settings = _load(path)
    _check_workers(settings, path, *_worker_count(settings, None))
    print(f"{path}: configuration is valid")
    if args.show:
        print(json.dumps(dump_redacted(settings), indent=2, default=str))
    if args.offline:
        return 0
    from bff.preflight import run_checks

    report = asyncio.run(run_checks(settings))
    for line in report.infos:
        print(line)
    for line in report.warnings:  # worth knowing, but the config works: still exit 0
        print(f"warning: {line}", file=sys.stderr)
    for line in report.errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if report.errors else 0


def _check_config_path(args: argparse.Namespace) -> str:
    """FILE (the original form), else --config, else $BFF_CONFIG, like every other command."""
    if args.file and args.config and args.file != args.config:
        raise ConfigError([f"two config files given: {args.file} and --config {args.config}"])
    path: str | None = args.file or args.config or os.environ.get("BFF_CONFIG")
    if not path:
        raise ConfigError(["no config file: pass --config FILE or set BFF_CONFIG"])
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bff", description="Backend-for-frontend session proxy")
    parser.add_argument("--version", action="version", version=f"bff {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve")
    run.add_argument("--config", help="YAML config file (default: $BFF_CONFIG)")
    run.add_argument("--host", help="override listen.host")
    run.add_argument("--port", type=int, help="override listen.port")
    run.add_argument(
        "--workers", type=int, help="worker processes (default: workers:, else number of cores)"
    )
    run.add_argument("--metrics-port", type=int, help="override metrics.listen.port")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check-config",
        help="validate a config, then check the store, the OP and the SPA folder",
        description="Exit 0: bff will run (warnings may be printed); 1: a store, OP or static "
        "check failed; 2: the config is invalid.",
    )
    check.add_argument("file", nargs="?", help="YAML config file (same as --config)")
    check.add_argument("--config", help="YAML config file (default: $BFF_CONFIG)")
    check.add_argument("--show", action="store_true", help="print the settings, secrets masked")
    check.add_argument(
        "--offline",
        action="store_true",
        help="check the file only: not the store, the OP nor the static folder (for CI)",
    )
    check.set_defaults(func=cmd_check_config)

    try:
        from bff import admin
    except ImportError:
        pass
    else:
        admin.add_commands(sub)
    return parser


def _version() -> str:
    """The installed distribution's version: one number, in pyproject.toml."""
    try:
        return importlib.metadata.version("bff")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_went_away()


def _reader_went_away() -> int:
    """``bff ... | head``: the reader closed the pipe. End quietly with the status of a process
    that SIGPIPE ended (128 + 13), as other Unix tools do; stdout goes to /dev/null so that the
    interpreter's last flush cannot fail again with a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())
