"""``python -m bff.healthcheck``: exit 0 when this host's bff answers ``/healthz``, else 1.

For container health checks (the Dockerfile's HEALTHCHECK, compose): it reads the same config as
``bff run`` (``--config`` or ``$BFF_CONFIG``) so that it asks the *configured* port, not a port
baked into the image. A wildcard listen address is asked on loopback. Only the standard library
and bff's own config loader: no extra dependency in the image.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from bff.config import ConfigError, load_settings

__all__ = ["healthz_url", "main"]

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - mapped, not bound


def healthz_url(host: str, port: int) -> str:
    """The URL of ``/healthz`` on a listener bound to ``host:port`` (wildcards -> loopback)."""
    host = _WILDCARDS.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bff.healthcheck", description=__doc__)
    parser.add_argument("--config", help="YAML config file (default: $BFF_CONFIG)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    path = args.config or os.environ.get("BFF_CONFIG")
    if not path:
        print("healthcheck: no config: pass --config FILE or set BFF_CONFIG", file=sys.stderr)
        return 1
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"healthcheck: {path}: {exc}", file=sys.stderr)
        return 1
    url = healthz_url(settings.listen.host, settings.listen.port)
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:  # noqa: S310 - http URL built above
            ok = resp.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"healthcheck: {url}: status {resp.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
