"""Real edge proxies for edge-mode tests: nginx and Caddy running the shipped configs.

``NginxEdge`` and ``CaddyEdge`` are ``ChildProcess`` subclasses (``tests/support/procs.py``) that
render ``deploy/edge/nginx.conf`` or ``deploy/edge/Caddyfile`` into their work directory with
this test's ports, and nothing else changed: what is tested is what is shipped. Each address to
replace must occur exactly once in the shipped file, so a config that drifts from these tests
fails loudly instead of being tested half. ``edge_missing(kind)`` says why an edge cannot run
(its binary is not installed), for ``pytest.skip``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.procs import HOST, ChildProcess, http_status, tail

__all__ = ["EDGE_DIR", "CaddyEdge", "Edge", "NginxEdge", "edge_missing", "make_edge", "render"]

EDGE_DIR = Path(__file__).resolve().parent.parent.parent / "deploy" / "edge"


def render(template: str, replacements: Mapping[str, str]) -> str:
    """``template`` with each key replaced; each key must occur exactly once."""
    for old, new in replacements.items():
        count = template.count(old)
        if count != 1:
            raise AssertionError(f"{old!r} occurs {count} times in the shipped edge config")
        template = template.replace(old, new)
    return template


class Edge(ChildProcess):
    """An edge proxy on 127.0.0.1:``port`` in front of bff (``bff_port``) and one API."""

    binary = ""

    def __init__(self, *, port: int | None = None) -> None:
        super().__init__(port)
        self.bff_port = 0
        self.api_port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def configure(self, bff_port: int, api_port: int) -> None:
        """Render the shipped config for these ports (call before ``start``)."""
        self.bff_port = bff_port
        self.api_port = api_port
        self.write_config()

    def write_config(self) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        """bff answers through the edge (its health check)."""
        return http_status(self.url + "/healthz") == 200

    def stop(self) -> None:
        self.terminate(timeout=5)


class NginxEdge(Edge):
    """The shipped nginx.conf; with ``cache_seconds``, its optional auth cache switched on (the
    ``#cache`` lines) for that long, and each API answer saying whether bff's answer came from
    the cache (``X-Test-Authz-Cache``: MISS, HIT, ...), which only tests add."""

    name = "nginx"
    binary = "nginx"

    def __init__(self, *, port: int | None = None, cache_seconds: int | None = None) -> None:
        super().__init__(port=port)
        self.cache_seconds = cache_seconds

    def write_config(self) -> None:
        template = (EDGE_DIR / "nginx.conf").read_text()
        extra: dict[str, str] = {}
        if self.cache_seconds is not None:
            if template.count("#cache ") < 5:
                raise AssertionError("the shipped nginx.conf lost its #cache lines")
            template = template.replace("#cache ", "")
            status = "auth_request_set $bff_authorization $upstream_http_authorization;\n"
            extra = {
                "/run/nginx-bff-authz": str(self.workdir / "cache"),
                "proxy_cache_valid 200 1s;": f"proxy_cache_valid 200 {self.cache_seconds}s;",
                status: status + "            auth_request_set $bff_cache $upstream_cache_status;\n"
                "            add_header X-Test-Authz-Cache $bff_cache always;\n",
            }
        text = render(
            template,
            {
                **extra,
                "listen 127.0.0.1:8000;": f"listen {HOST}:{self.port};",
                "server 127.0.0.1:8080;": f"server {HOST}:{self.bff_port};",
                "server 127.0.0.1:9000;": f"server {HOST}:{self.api_port};",
                # Temporary files in the work directory, not the packaged /var/lib/nginx.
                "http {\n": "http {\n    client_body_temp_path tmp/body;\n"
                "    proxy_temp_path tmp/proxy;\n",
            },
        )
        for sub in ("logs", "tmp"):
            (self.workdir / sub).mkdir(exist_ok=True)
            (self.workdir / sub).chmod(0o777)  # workers run as nobody when we are root
        self.workdir.chmod(0o755)
        (self.workdir / "nginx.conf").write_text(text)

    def command(self) -> tuple[Sequence[str], Path, Mapping[str, str] | None]:
        directives = f"daemon off; pid {self.workdir}/nginx.pid;"
        argv = ["nginx", "-p", f"{self.workdir}/", "-c", "nginx.conf", "-g", directives]
        return argv, self.workdir, None

    def logs(self) -> str:
        return super().logs() + "\n--- error.log ---\n" + tail(self.workdir / "logs/error.log")


class CaddyEdge(Edge):
    name = "caddy"
    binary = "caddy"

    def write_config(self) -> None:
        text = render(
            (EDGE_DIR / "Caddyfile").read_text(),
            {
                "http://127.0.0.1:8000 {": f"http://{HOST}:{self.port} {{",
                "reverse_proxy 127.0.0.1:8080 {": f"reverse_proxy {HOST}:{self.bff_port} {{",
                "reverse_proxy 127.0.0.1:9000 {": f"reverse_proxy {HOST}:{self.api_port} {{",
                "reverse_proxy 127.0.0.1:8080\n": f"reverse_proxy {HOST}:{self.bff_port}\n",
            },
        )
        (self.workdir / "Caddyfile").write_text(text)

    def command(self) -> tuple[Sequence[str], Path, Mapping[str, str] | None]:
        argv = ["caddy", "run", "--config", "Caddyfile", "--adapter", "caddyfile"]
        # Caddy keeps state under $HOME/XDG dirs: the work directory, not the test user's.
        env = {
            "HOME": str(self.workdir),
            "XDG_DATA_HOME": str(self.workdir / "data"),
            "XDG_CONFIG_HOME": str(self.workdir / "config"),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        return argv, self.workdir, env


EDGES: dict[str, type[Edge]] = {"nginx": NginxEdge, "caddy": CaddyEdge}


def edge_missing(kind: str) -> str | None:
    """Why the ``kind`` edge cannot run here, or None."""
    binary = EDGES[kind].binary
    if shutil.which(binary) is None:
        return f"{binary} not found on PATH (.ci/run installs it)"
    return None


def make_edge(kind: str) -> Edge:
    return EDGES[kind]()
