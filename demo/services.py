"""The demo's OP and echo API as processes of their own, for ``deploy/compose.yaml``.

``make run`` starts everything in one process on loopback (``demo.run``); the compose topology
runs each piece in its own container instead:

    python -m demo.services op  --port 9400            # the mock OP, users alice and bob
    python -m demo.services api --port 8090 --issuer http://localhost:9400

The mock OP takes its issuer from the ``Host`` the caller used, so the browser and bff must reach
it under one name (compose: ``localhost:9400`` in a shared network namespace). Both serve until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from aiohttp import web

from demo.api import create_api
from demo.op import MockProvider
from demo.run import USERS

__all__ = ["main"]


def _serve_op(host: str, port: int, access_ttl: int) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    with MockProvider(port, users=USERS, access_ttl=access_ttl, host=host):
        print(f"demo OP listening on {host}:{port}", flush=True)
        stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.services")
    sub = parser.add_subparsers(dest="what", required=True)
    op = sub.add_parser("op", help="the mock OpenID Provider")
    op.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a container's own interface
    op.add_argument("--port", type=int, default=9400)
    op.add_argument("--access-ttl", type=int, default=15, help="access token lifetime, seconds")
    api = sub.add_parser("api", help="the echo API (checks tokens at the OP's userinfo)")
    api.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a container's own interface
    api.add_argument("--port", type=int, default=8090)
    api.add_argument("--issuer", required=True, help="the OP whose userinfo checks tokens")
    args = parser.parse_args(argv)
    if args.what == "op":
        return _serve_op(args.host, args.port, args.access_ttl)
    web.run_app(create_api(args.issuer.rstrip("/")), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
