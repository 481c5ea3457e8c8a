"""``make bench``: bff against nginx and the bare upstream, streaming memory, Redis per session.

Everything runs on loopback, every load is bounded (wrk runs for a fixed duration; loops have a
fixed count), and the whole run takes a few minutes. The numbers it prints are the result; it
asserts nothing.

Layout (all on 127.0.0.1, free ports):

* nginx #1, the *upstream*: answers ``200 ok`` to everything, keep-alive.
* nginx #2, the *baseline proxy*: ``proxy_pass`` to the upstream with a fixed Authorization header.
* nginx #3, the *edge*: edge mode as ``deploy/edge/nginx.conf`` does it (the same directives on
  the API path), ``auth_request`` to bff's
  ``/bff/authz`` (from 127.0.0.2, bff's only trusted proxy, so the direct runs stay untrusted)
  and ``proxy_pass`` to the upstream with the bearer bff answered; on a second port the same with
  ``deploy/edge/nginx.conf``'s optional auth cache on (1 s, one session: nearly every call a hit).
* bff (``bff run --workers N``, sessions in a real redis-server, encrypted), logged in once through
  the real OP (npm ``oidc-provider``), proxying ``/api`` to the same upstream with the session's
  token.
* a small aiohttp server for the 1 GiB up/download through bff.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support.procs import OidcProvider, RedisServer, browser_session, free_port, op_login

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key-" + "x" * 40
GiB = 1024**3
CHUNK = 256 * 1024


# -- processes --------------------------------------------------------------------------------


# deploy/edge/nginx.conf's optional auth cache: its key and its time.
_AUTHZ_CACHE = """
      proxy_cache bff_authz;
      proxy_cache_key "$http_cookie|$request_method|$request_uri|$http_x_csrf|$http_origin\
|$http_sec_fetch_site|$http_upgrade";
      proxy_cache_valid 200 1s;
      proxy_cache_lock off;
      proxy_ignore_headers Cache-Control Expires;"""


# How the edge asks bff (the auth subrequest and the denied call's second look), from 127.0.0.2.
_ASK_BFF = """
      proxy_bind 127.0.0.2;
      proxy_http_version 1.1;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header Connection "";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"""


def _edge_server(port: int, *, cache: bool) -> str:
    """An nginx server in edge mode as deploy/edge/nginx.conf has it on the API path: the same
    directives in the API location and the auth subrequest (WebSocket and DPoP headers, no
    buffering, the forwarding chain, the denied call's second look), the cache as it ships."""
    return f"""
  server {{
    listen 127.0.0.1:{port} reuseport;
    location /api/ {{
      auth_request /_bff_authz;
      auth_request_set $bff_authorization $upstream_http_authorization;
      auth_request_set $bff_dpop $upstream_http_dpop;
      error_page 401 403 500 = @bff_denied;
      proxy_pass http://api/;
      proxy_http_version 1.1;
      proxy_set_header Authorization $bff_authorization;
      proxy_set_header DPoP $bff_dpop;
      proxy_set_header Cookie "";
      proxy_set_header Host $proxy_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_hide_header Set-Cookie;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }}
    location = /_bff_authz {{
      internal;
      proxy_pass http://bff/bff/authz;{_ASK_BFF}{_AUTHZ_CACHE if cache else ""}
    }}
    location @bff_denied {{
      rewrite ^ /bff/authz break;
      proxy_pass http://bff;
      proxy_method GET;{_ASK_BFF}
      proxy_set_header X-Bff-Denied 1;
      proxy_hide_header Authorization;
    }}
  }}"""


@contextmanager
def nginx(
    workdir: Path,
    upstream_port: int,
    proxy_port: int,
    edge_port: int,
    cached_port: int,
    bff_port: int,
) -> Iterator[None]:
    conf = workdir / "nginx.conf"
    workdir.chmod(0o755)  # nginx's workers (nobody, when we are root) use the auth cache in it
    conf.write_text(
        f"""
worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fcgi;
  uwsgi_temp_path {workdir}/uwsgi;
  scgi_temp_path {workdir}/scgi;
  keepalive_requests 1000000;
  upstream api {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{upstream_port} reuseport;
    location / {{ default_type text/plain; return 200 "ok\\n"; }}
  }}
  server {{
    listen 127.0.0.1:{proxy_port} reuseport;
    location / {{
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer fixed-benchmark-token";
      proxy_set_header X-Forwarded-For $remote_addr;
    }}
  }}
  upstream bff {{ server 127.0.0.1:{bff_port}; keepalive 256; }}
  map $http_upgrade $connection_upgrade {{ default upgrade; "" ""; }}
  proxy_cache_path {workdir}/authz keys_zone=bff_authz:10m inactive=10s use_temp_path=off;
{_edge_server(edge_port, cache=False)}
{_edge_server(cached_port, cache=True)}
}}
"""
    )
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(f"http://127.0.0.1:{upstream_port}/")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def bff_server(config: Path, port: int, workers: int) -> Iterator[subprocess.Popen[bytes]]:
    log = open(config.parent / "bff.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bff", "run", "--config", str(config), "--workers", str(workers)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", timeout=30)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _wait_http(url: str, timeout: float = 15) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (loopback only)
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes: a cost per request that other load cannot skew."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _nginx_workers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "nginx: worker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- wrk --------------------------------------------------------------------------------------


def wrk(url: str, connections: int, seconds: int, headers: dict[str, str]) -> dict[str, float]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if m is None:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": 1.0 if errors else 0.0,
    }


# -- the parts that need asyncio --------------------------------------------------------------


async def login(public: str, username: str = "bench") -> str:
    """Log in once through the real OP; the session cookie as 'name=value'."""
    async with browser_session() as http:
        resp = await http.get(f"{public}/bff/login", allow_redirects=False)
        callback = await op_login(http, resp.headers["Location"], username)
        resp = await http.get(callback, allow_redirects=False)
        assert resp.status == 200, await resp.text()
        for cookie in http.cookie_jar:
            if cookie.key == "bff-session":
                return f"{cookie.key}={cookie.value}"
    raise RuntimeError("no session cookie after login")


async def many_logins(public: str, count: int) -> None:
    """``count`` separate sessions through the real OP (one OP login, then SSO each time)."""
    async with browser_session() as http:
        for _ in range(count):
            http.cookie_jar.clear(lambda c: c.key == "bff-session")
            resp = await http.get(f"{public}/bff/login", allow_redirects=False)
            callback = await op_login(http, resp.headers["Location"], "many")
            resp = await http.get(callback, allow_redirects=False)
            if resp.status != 200:
                raise RuntimeError(f"login failed: {resp.status} {await resp.text()}")


async def stream_server(port: int) -> web.AppRunner:
    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", GiB))
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        block = b"x" * CHUNK
        sent = 0
        while sent < size:
            part = block[: min(CHUNK, size - sent)]
            await response.write(part)
            sent += len(part)
        return response

    async def upload(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            total += len(chunk)
        return web.json_response({"received": total})

    app = web.Application(client_max_size=2 * GiB)
    app.router.add_get("/download", download)
    app.router.add_post("/upload", upload)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def stream_through(public: str, cookie: str, size: int) -> tuple[int, int, float]:
    headers = {"Cookie": cookie, "X-CSRF": "1"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        start = time.monotonic()
        got = 0
        async with http.get(f"{public}/stream/download?size={size}", headers=headers) as resp:
            resp.raise_for_status()
            async for chunk in resp.content.iter_chunked(CHUNK):
                got += len(chunk)

        async def body() -> object:
            block = b"y" * CHUNK
            for _ in range(size // CHUNK):
                yield block

        async with http.post(f"{public}/stream/upload", data=body(), headers=headers) as resp:
            resp.raise_for_status()
            sent = int((await resp.json())["received"])
        return got, sent, time.monotonic() - start


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each target, in turns; medians printed"
    )
    parser.add_argument("--logins", type=int, default=1000)
    parser.add_argument("--stream-bytes", type=int, default=GiB)
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "redis-server", "node"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} is missing (apt-get install wrk nginx-light redis-server nodejs)")
            return 2
    os.environ["PATH"] += ":/usr/sbin"

    with (
        tempfile.TemporaryDirectory(prefix="bff-bench-") as tmp,
        RedisServer() as redis,
        OidcProvider(access_ttl=3600) as op,
    ):
        work = Path(tmp)
        upstream, baseline, edge, cached, bff_port, stream_port = (free_port() for _ in range(6))
        public = f"http://127.0.0.1:{bff_port}"
        client = asyncio.run(op.register_client([f"{public}/bff/callback"]))
        config = work / "bff.yaml"
        config.write_text(
            f"""
public_url: {public}
listen: {{host: 127.0.0.1, port: {bff_port}}}
static: {ROOT / "static"}
oidc:
  issuer: {op.issuer}
  client_id: {client["client_id"]}
  client_secret: {client["client_secret"]}
  scopes: [openid, profile, email]
session:
  store: {redis.url}
  cookie: {{name: bff-session, secure: false}}
keys: ["{KEY}"]
log: {{level: warning}}
rate_limits: {{enabled: false}}  # 1,000 logins from one address are the point here
trusted_proxies: [127.0.0.2/32]  # the edge's auth calls come from there
upstreams:
  - {{path: /api, url: "http://127.0.0.1:{upstream}", token: user}}
  - {{path: /stream, url: "http://127.0.0.1:{stream_port}", token: user, timeout: 10m}}
"""
        )
        print(
            f"bench: {os.cpu_count()} cores, bff with {args.workers} workers, wrk -t2, "
            f"{args.seconds}s per run, all on loopback"
        )
        with (
            bff_server(config, bff_port, args.workers) as proc,
            nginx(work, upstream, baseline, edge, cached, bff_port),
        ):
            cookie = asyncio.run(login(public))
            auth = {"Cookie": cookie, "X-CSRF": "1"}
            # Warm up pools and caches so the first measured run is not a cold start.
            wrk(f"{public}/api/items", 32, 2, auth)
            bff_pids = _descendants(proc.pid)

            wrk(f"http://127.0.0.1:{edge}/api/items", 32, 2, auth)

            def measured(
                url: str, conns: int, headers: dict[str, str], pids: list[int]
            ) -> dict[str, float]:
                before = _cpu_seconds(pids)
                before_bff = _cpu_seconds(bff_pids)
                result = wrk(url, conns, args.seconds, headers)
                spent = _cpu_seconds(pids) - before
                requests = max(1.0, result["rps"] * args.seconds)
                result["cpu_us"] = spent / requests * 1e6
                result["bff_cpu_us"] = (_cpu_seconds(bff_pids) - before_bff) / requests * 1e6
                return result

            def interleaved(conns: int) -> list[dict[str, float]]:
                """Each target ``--repeat`` times, in turns (so a noisy moment of the machine
                hits one run of each, not every run of one), then each column's median."""
                runs: list[list[dict[str, float]]] = [[] for _ in range(5)]
                for _ in range(args.repeat):
                    nginx_pids = _nginx_workers()
                    for i, (url, headers, pids) in enumerate(
                        (
                            (f"http://127.0.0.1:{upstream}/items", {}, nginx_pids),
                            (f"http://127.0.0.1:{baseline}/items", {}, nginx_pids),
                            (f"{public}/api/items", auth, bff_pids),
                            (f"http://127.0.0.1:{edge}/api/items", auth, bff_pids + nginx_pids),
                            (f"http://127.0.0.1:{cached}/api/items", auth, bff_pids + nginx_pids),
                        )
                    ):
                        runs[i].append(measured(url, conns, headers, pids))
                return [
                    {key: statistics.median(run[key] for run in target) for key in target[0]}
                    for target in runs
                ]

            rows = []
            for conns in (32, 256):
                direct, plain, ours, at_edge, with_cache = interleaved(conns)
                rows.append((conns, direct, plain, ours, at_edge, with_cache))
            print()
            print(
                f"{'conns':>5} {'target':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
                f"{'non-2xx':>8} {'CPU us/req':>11}"
            )
            for conns, direct, plain, ours, at_edge, with_cache in rows:
                named = (
                    ("upstream", direct),
                    ("nginx proxy", plain),
                    ("bff", ours),
                    ("edge mode", at_edge),
                    ("edge cached", with_cache),
                )
                for name, r in named:
                    print(
                        f"{conns:>5} {name:<12} {r['rps']:>9.0f} {r['p50']:>8.2f} "
                        f"{r['p99']:>8.2f} {r['non2xx']:>8.0f} {r['cpu_us']:>11.1f}"
                    )
                print(
                    f"{conns:>5} ratios: bff/nginx req/s {ours['rps'] / plain['rps']:.1%}, "
                    f"bff/direct {ours['rps'] / direct['rps']:.1%}, "
                    f"p99 bff/nginx {ours['p99'] / plain['p99']:.1f}x; "
                    f"edge mode/nginx req/s {at_edge['rps'] / plain['rps']:.1%}, "
                    f"p99 {at_edge['p99'] / plain['p99']:.1f}x, "
                    f"bff's share {at_edge['bff_cpu_us']:.1f} CPU us/req; "
                    f"edge cached/nginx req/s {with_cache['rps'] / plain['rps']:.1%}"
                )
            print(
                "(CPU us/req: the measured processes' own CPU time per request - nginx counts "
                "all its servers; bff its workers only; edge mode counts nginx and bff. Each "
                f"figure is the median of {args.repeat} runs taken in turns with the others)"
            )

            # Streaming: 1 GiB down and 1 GiB up through bff, watching the workers' peak RSS.
            async def stream() -> tuple[int, int, float]:
                runner = await stream_server(stream_port)
                try:
                    return await stream_through(public, cookie, args.stream_bytes)
                finally:
                    await runner.cleanup()

            workers = [p for p in _descendants(proc.pid) if p != proc.pid] or [proc.pid]
            before = max(_status_kb(p, "VmRSS") for p in workers)
            got, sent, took = asyncio.run(stream())
            peak = max(_status_kb(p, "VmHWM") for p in workers)
            print()
            print(
                f"streaming: {got / GiB:.2f} GiB down + {sent / GiB:.2f} GiB up in {took:.1f}s; "
                f"peak RSS of a bff worker (VmHWM) {peak / 1024:.1f} MB "
                f"(RSS before streaming {before / 1024:.1f} MB)"
            )

            # Redis memory per logged-in session, after N logins through the real OP.
            import redis as redis_py

            r = redis_py.Redis.from_url(redis.url)
            r.flushdb()
            asyncio.run(many_logins(public, 10))  # warm the allocator and the OP's SSO session
            r.flushdb()
            before = int(r.info("memory")["used_memory"])
            start = time.monotonic()
            asyncio.run(many_logins(public, args.logins))
            took = time.monotonic() - start
            after = int(r.info("memory")["used_memory"])
            sessions = list(r.scan_iter("bff:{*}:s", count=1000))
            every = list(r.scan_iter("bff:*", count=1000))
            usage = sum(int(r.memory_usage(k) or 0) for k in every)
            n = max(1, len(sessions))
            print(
                f"redis: {len(sessions)} sessions after {args.logins} logins through the OP in "
                f"{took:.0f}s; used_memory grew {(after - before) / n:.0f} bytes/session; "
                f"MEMORY USAGE of all bff keys {usage / n:.0f} bytes/session ({len(every)} keys)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
