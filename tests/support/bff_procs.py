"""Real ``bff run`` processes for integration tests, and what it takes to use them.

A test that wants to prove something about several instances sharing one store must run them as
separate operating-system processes: an in-process app shares the event loop, the per-process
refresh future and the session cache with its siblings, which hides exactly the races under test.

- ``BffProcess``: one ``python -m bff run --config FILE --workers N`` on its own free port (with
  ``--workers 3`` the workers share that port through SO_REUSEPORT), ``/metrics`` on another free
  port (``metrics_url``); ``start()`` waits for ``/healthz`` (and, by default, ``/readyz``: the
  OP's metadata is loaded), ``kill()`` sends SIGKILL to the whole process group, ``terminate()``
  SIGTERM, ``wait_exit()`` waits for a process that should end by itself (a refused config).
  It is a ``ChildProcess`` (``tests/support/procs.py``) like the Redis server and the OP.
- ``BffCluster``: N such processes on one config, started in parallel.
- ``write_config`` / ``base_config``: a YAML config in a temporary directory.
- ``login``: a real login through ``/bff/login``, the real OP's form and ``/bff/callback``;
  returns the session cookie.
- ``read_session``: the decrypted session record as the store holds it, for assertions.
- ``EchoUpstream``: an HTTP upstream in a thread of the test process that answers 200 with a
  digest of the bearer token it received (never the token), and 401 to tokens a test rejects;
  it records each request's method, path, bearer and headers (``seen()``).
- ``op_delay_refresh`` / ``op_fail_refresh``: the test OP's fault injection for refresh grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import yaml
from aiohttp import web

from bff.keys import Keyring, SessionSecret, open_sealed, secret_key, store_id
from bff.sessions import SessionData, session_key
from bff.store.redis import RedisStore
from tests.support.procs import (
    HOST,
    ChildProcess,
    OidcProvider,
    browser_session,
    free_port,
    http_status,
    op_login,
)

__all__ = [
    "COOKIE_NAME",
    "BffCluster",
    "BffProcess",
    "EchoUpstream",
    "Seen",
    "base_config",
    "login",
    "op_delay_refresh",
    "op_fail_refresh",
    "read_session",
    "token_digest",
    "write_config",
]

ROOT = Path(__file__).resolve().parent.parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
COOKIE_NAME = "bff-session"  # not __Host-: the loopback test origin is plain http


class BffProcess(ChildProcess):
    """``bff run`` as a child process in its own process group, on 127.0.0.1:``port``.

    ``/metrics`` is on a listener of its own (``metrics_url``), on a free port passed with
    ``--metrics-port``: never the fixed default, which parallel test runs would fight over.
    ``workers=None`` leaves ``--workers`` out (bff's own default then applies).
    """

    name = "bff"

    def __init__(
        self,
        config: Path,
        *,
        port: int | None = None,
        workers: int | None = 1,
        startup_timeout: float | None = None,
        wait_ready: bool = True,
        metrics_port: int | None = None,
    ) -> None:
        super().__init__(port, startup_timeout=startup_timeout)
        self.config = config
        self.workers = workers
        self.wait_ready = wait_ready
        self.metrics_port = metrics_port if metrics_port is not None else free_port()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}"

    def command(self) -> tuple[Sequence[str], Path, Mapping[str, str] | None]:
        argv = [
            str(PYTHON), "-m", "bff", "run",
            "--config", str(self.config),
            "--host", HOST,
            "--port", str(self.port),
            "--metrics-port", str(self.metrics_port),
        ]  # fmt: skip
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BFF_")}
        return argv, ROOT, env

    def ready(self) -> bool:
        """``/healthz`` is 200, and ``/readyz`` too when ``wait_ready`` (OP metadata loaded)."""
        if http_status(self.url + "/healthz") != 200:
            return False
        return not self.wait_ready or http_status(self.url + "/readyz") == 200


class BffCluster:
    """``count`` bff processes of one config, each on its own port: instances behind an LB."""

    def __init__(self, config: Path, count: int, *, workers: int = 1) -> None:
        self.procs = [BffProcess(config, workers=workers) for _ in range(count)]

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.procs]

    def __getitem__(self, index: int) -> BffProcess:
        return self.procs[index]

    def __len__(self) -> int:
        return len(self.procs)

    def __iter__(self) -> Iterator[BffProcess]:
        return iter(self.procs)

    def start(self) -> None:
        """Spawn all at once (startup is mostly imports), then wait for each."""
        try:
            for proc in self.procs:
                proc.spawn()
            for proc in self.procs:
                proc.wait_started()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in self.procs:
            proc.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -------------------------------------------------------------------------------------------------
# Configuration


def base_config(
    *,
    public_url: str,
    issuer: str,
    client: Mapping[str, Any],
    store: str,
    keys: Sequence[str],
    static: Path,
    upstreams: Sequence[Mapping[str, Any]] = (),
    refresh_skew: str = "1s",
    http_timeout: str = "3s",
    cache_ttl: str = "1s",
) -> dict[str, Any]:
    """A loopback dev config (plain-http cookie) for one registered OP client."""
    return {
        "public_url": public_url,
        "static": str(static),
        "oidc": {
            "issuer": issuer,
            "client_id": client["client_id"],
            "client_secret": client["client_secret"],
            "scopes": ["openid", "profile", "email", "api:read"],
            "refresh_skew": refresh_skew,
            "http_timeout": http_timeout,
        },
        "session": {
            "store": store,
            "cookie": {"name": COOKIE_NAME, "same_site": "strict", "secure": False},
            "cache_ttl": cache_ttl,
        },
        "keys": list(keys),
        "upstreams": [dict(u) for u in upstreams],
        "log": {"level": "info", "format": "json"},
    }


def write_config(directory: Path, config: Mapping[str, Any], name: str = "bff.yaml") -> Path:
    """Write ``config`` as YAML into ``directory`` (created, with an empty ``static/``)."""
    directory.mkdir(parents=True, exist_ok=True)
    static = Path(config.get("static", directory / "static"))
    static.mkdir(parents=True, exist_ok=True)
    (static / "index.html").write_text("<!doctype html><title>spa</title>")
    path = directory / name
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


# -------------------------------------------------------------------------------------------------
# Users


async def login(bff_url: str, username: str) -> str:
    """Log ``username`` in through bff at ``bff_url`` and the real OP; the session cookie value.

    Each call uses a fresh user agent (its own OP session), so logins can run concurrently.
    """
    async with browser_session(bff_url) as http:
        async with http.get(f"{bff_url}/bff/login", allow_redirects=False) as resp:
            if resp.status != 302:
                raise RuntimeError(f"/bff/login -> {resp.status}: {await resp.text()}")
            authorize = resp.headers["Location"]
        callback = await op_login(http, authorize, username)
        async with http.get(callback, allow_redirects=False) as resp:
            if resp.status != 200:
                raise RuntimeError(f"/bff/callback -> {resp.status}: {await resp.text()}")
            cookie = resp.cookies.get(COOKIE_NAME)
        if cookie is None or not cookie.value:
            raise RuntimeError("the callback set no session cookie")
        return cookie.value


async def read_session(redis_url: str, keys: Sequence[str], cookie: str) -> SessionData | None:
    """The session a cookie names, decrypted straight from the store; None when it is gone.

    Raises (``DecryptError``, ``ValueError``) when a record is there but does not decrypt or
    parse: a corrupted session, which no test may ever leave behind.
    """
    value = Keyring(list(keys)).unsign(cookie)
    if value is None:
        raise ValueError("the cookie does not verify with these keys")
    secret = SessionSecret(value)
    sid = store_id(secret)
    store = RedisStore.from_url(redis_url)
    try:
        blob = await store.get(session_key(sid))
    finally:
        await store.close()
    if blob is None:
        return None
    return SessionData.from_bytes(open_sealed(secret_key(secret), blob, sid.encode()))


# -------------------------------------------------------------------------------------------------
# The test OP's fault injection


async def _op_post(op: OidcProvider, path: str, body: Mapping[str, Any]) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{op.issuer}{path}", json=dict(body)) as resp,
    ):
        if resp.status != 200:
            raise RuntimeError(f"POST {path} -> {resp.status}: {await resp.text()}")


async def op_delay_refresh(
    op: OidcProvider, ms: int, *, drop_if_disconnected: bool = False, after: bool = False
) -> None:
    """Hold each refresh_token grant ``ms`` at the OP before it is handled (0: off); with
    ``after``, the OP handles it at once (the token rotates) and holds only its answer."""
    await _op_post(
        op,
        "/__test/delay",
        {"refresh_token_ms": ms, "drop_if_disconnected": drop_if_disconnected, "after": after},
    )


async def op_fail_refresh(op: OidcProvider, status: int) -> None:
    """Answer refresh_token grants with HTTP ``status`` without handling them (0: off)."""
    await _op_post(op, "/__test/fail", {"refresh_token_status": status})


# -------------------------------------------------------------------------------------------------
# The upstream API


def token_digest(token: str) -> str:
    """How the echo upstream names a bearer token in its answers: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(slots=True)
class Seen:
    method: str
    path: str
    token: str | None  # the bearer token the upstream received (stays in the test process)
    status: int
    headers: tuple[tuple[str, str], ...] = ()  # every request header as received, in order
    raw_headers: tuple[tuple[bytes, bytes], ...] = ()  # as the upstream's parser got them

    def header(self, name: str) -> list[str]:
        """The values of header ``name`` (any case), in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass(slots=True)
class _EchoState:
    seen: list[Seen] = field(default_factory=list)
    reject: set[str] = field(default_factory=set)  # bearer tokens answered with 401
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)  # ends held event streams


class EchoUpstream:
    """An upstream API on 127.0.0.1:``port``, served from a thread of the test process.

    Answers every request with 200 JSON ``{"ok": true, "method", "path", "bearer": <digest>}``
    (``bearer`` null when no ``Authorization: Bearer`` came), or 401 for tokens in ``reject``.
    Two paths stream instead: ``/__stream/events`` sends the server-sent event ``first`` at once
    and ``last`` only after ``release_streams()`` (at most 10 s later), so a client that got
    ``first`` before that proves nothing buffered the stream; ``/__stream/ws`` is a WebSocket
    that echoes text messages.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self._state = _EchoState()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def seen(self) -> list[Seen]:
        with self._state.lock:
            return list(self._state.seen)

    def clear(self) -> None:
        with self._state.lock:
            self._state.seen.clear()
            self._state.reject.clear()

    def reject(self, token: str) -> None:
        with self._state.lock:
            self._state.reject.add(token)

    def release_streams(self) -> None:
        """Let held ``/__stream/events`` responses send their last event and end."""
        self._state.release.set()

    def _record(self, request: web.Request, token: str | None, status: int) -> None:
        with self._state.lock:
            self._state.seen.append(
                Seen(
                    request.method,
                    request.path_qs,
                    token,
                    status,
                    tuple(request.headers.items()),
                    request.raw_headers,
                )
            )

    @staticmethod
    def _bearer(request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self._state.release.clear()
        self._record(request, self._bearer(request), 200)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, self._state.release.wait, 10):
            with contextlib.suppress(ConnectionError):
                await response.write(b"data: last\n\n")
                await response.write_eof()
        return response

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request, self._bearer(request), 101)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    async def _handle(self, request: web.Request) -> web.Response:
        token = self._bearer(request)
        await request.read()
        with self._state.lock:
            status = 401 if token is not None and token in self._state.reject else 200
            self._state.seen.append(
                Seen(
                    request.method,
                    request.path_qs,
                    token,
                    status,
                    tuple(request.headers.items()),
                    request.raw_headers,
                )
            )
        if status == 401:
            return web.json_response(
                {"error": "invalid_token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return web.json_response(
            {
                "ok": True,
                "method": request.method,
                "path": request.path_qs,
                "bearer": token_digest(token) if token is not None else None,
            }
        )

    def start(self) -> None:
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/__stream/events", self._events)
            app.router.add_get("/__stream/ws", self._ws)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            try:
                loop.run_until_complete(runner.setup())
                loop.run_until_complete(web.TCPSite(runner, HOST, self.port).start())
            except BaseException as exc:  # reported to start()
                errors.append(exc)
                started.set()
                return
            self._runner = runner
            started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="echo-upstream", daemon=True)
        self._thread.start()
        if not started.wait(10) or errors:
            raise RuntimeError(f"echo upstream did not start: {errors}")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
