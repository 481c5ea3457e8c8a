"""``python -m bench.profile_direct``: where a proxied GET's CPU time goes, in one process.

bff's app served through the front door as ``bff run`` serves it (``bff.server.listen``), one
session planted in a real redis-server, nginx as the upstream, and ``wrk`` (32 connections, a
bounded run) for load. It prints the process's CPU time per request (with ``--profile``, under
cProfile: calls per request and the share of each part of the path). The numbers in
docs/design.md ("Performance") come from it. Loopback only; the run is bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import os
import pstats
import re
import subprocess
import tempfile
import time
from pathlib import Path

from aiohttp import web

from bff.app import create_app
from bff.config import parse_settings
from bff.server import listen
from bff.services import SERVICES
from bff.sessions import SessionData
from tests.support.procs import RedisServer, free_port

#: (part of the path, substrings of the file names whose own time counts there), first match wins.
PARTS = (
    ("upstream client (exchange, pool, parse)", ("aiohttp/client", "aiohttp/connector",
                                                 "bff/proxy/upstream", "aiohttp/streams")),
    ("aiohttp router + middleware chain", ("web_urldispatcher", "web_app", "web_middlewares")),
    ("request id, metrics, errors, access", ("bff/access", "bff/metrics", "bff/middlewares",
                                             "bff/tracing", "bff/proxy/direct")),
    ("answer to the browser (hooks, write)", ("web_response", "http_writer", "aiosignal")),
    ("aiohttp server (protocol, request, cookies)", ("web_protocol", "web_request",
                                                    "aiohttp/helpers", "base_protocol",
                                                    "_cookie_helpers", "http/cookies")),
    ("front-door gate", ("bff/server",)),
    ("session: cookie, cache, token", ("bff/cookies", "bff/sessions", "bff/keys", "bff/refresh")),
    ("proxy: route, headers, deadline", ("bff/proxy/", "bff/peers")),
    ("asyncio (timeouts, tasks)", ("asyncio",)),
)  # fmt: skip


def _nginx(work: Path, port: int) -> subprocess.Popen[bytes]:
    conf = work / "nginx.conf"
    temp = " ".join(f"{k}_temp_path {work}/{k};" for k in ("client_body", "proxy", "fastcgi"))
    conf.write_text(
        f"worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log warn; daemon off;"
        f"events {{ worker_connections 1024; }} http {{ access_log off; {temp}"
        f"uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi; keepalive_requests 1000000;"
        f'server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok\\n"; }} }} }}'
    )
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])


def _table(stats: pstats.Stats, requests: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for (file, _, _), (_, count, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        part = "C functions called from Python" if file == "~" else "other"
        for name, needles in PARTS:
            if any(n in file for n in needles):
                part = name
                break
        own[part] += tottime
        calls[part] += count
    total = sum(own.values())
    print("| part | share of profiled time | calls per request |\n|---|---:|---:|")
    for part, seconds in own.most_common():
        print(f"| {part} | {seconds / total:.0%} | {calls[part] / requests:.0f} |")
    print(f"| total | | {sum(calls.values()) / requests:.0f} |")


async def main(seconds: int, profile: bool, edge: bool, top: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bff-profile-"))
    upstream, port = free_port(), free_port()
    nginx = _nginx(work, upstream)
    try:
        with RedisServer() as redis:
            settings = parse_settings(
                f"""
public_url: http://127.0.0.1:{port}
oidc: {{issuer: "http://127.0.0.1:9", client_id: x, client_secret: y}}
session: {{store: {redis.url}, cookie: {{name: bff-session, secure: false}}}}
keys: ["{"k" * 50}"]
rate_limits: {{enabled: false}}
upstreams: [{{path: /api, url: "http://127.0.0.1:{upstream}", token: user}}]
trusted_proxies: ["127.0.0.0/8"]
""",
                base_dir=work,
            )
            app = create_app(settings)
            runner = await listen(app, settings, "127.0.0.1", port)
            try:
                services = app[SERVICES]
                now = time.time()
                session = await services.sessions.create(
                    SessionData(
                        sub="u", claims={}, access_token="t", access_expires_at=now + 3600,  # noqa: S106
                        refresh_token=None, id_token=None, scopes=("openid",), created_at=now,
                        expires_at=now + 7200,
                    )
                )  # fmt: skip
                response = web.Response()
                services.cookies.set_session(response, session.secret)
                cookie = f"bff-session={response.cookies['bff-session'].value}"
                url = f"http://127.0.0.1:{port}/api/items"
                cmd = ["wrk", "-t1", "-c32", "-H", f"Cookie: {cookie}", "-H", "X-CSRF: 1"]
                if edge:  # what nginx's auth_request asks for each API call
                    url = f"http://127.0.0.1:{port}/bff/authz"
                    cmd += ["-H", "X-Original-URI: /api/items", "-H", "X-Original-Method: GET"]
                warm = await asyncio.create_subprocess_exec(
                    *cmd, "-d2s", url, stdout=subprocess.DEVNULL
                )
                await warm.wait()
                profiler = cProfile.Profile()
                started = time.process_time()
                times = os.times()
                if profile:
                    profiler.enable()
                load = await asyncio.create_subprocess_exec(
                    *cmd, f"-d{seconds}s", url, stdout=subprocess.PIPE
                )
                out = (await load.communicate())[0].decode()
                profiler.disable()
                cpu = time.process_time() - started
                kernel = os.times().system - times.system
            finally:
                await runner.cleanup()
    finally:
        nginx.terminate()
        nginx.wait(10)
    found = re.search(r"(\d+) requests in", out)
    requests = int(found.group(1)) if found else 1
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    print(f"{requests} requests, {rate.group(1) if rate else '?'}/s, 32 connections, {url}")
    print(
        f"CPU per request (this process, everything in it): {cpu / requests * 1e6:.0f} us, "
        f"of which in the kernel (sockets): {kernel / requests * 1e6:.0f} us"
    )
    if profile:
        stats = pstats.Stats(profiler)
        _table(stats, requests)
        if top:
            stats.sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.profile_direct")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="under cProfile, with the table")
    parser.add_argument("--edge", action="store_true", help="edge mode: the auth endpoint alone")
    parser.add_argument("--top", type=int, default=0, help="with --profile: the N costliest")
    args = parser.parse_args()
    os.environ["PATH"] += ":/usr/sbin"
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.seconds, args.profile, args.edge, args.top))
