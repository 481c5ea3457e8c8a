"""Real processes for integration tests: ``redis-server``, the test OpenID Provider, and the base.

``ChildProcess`` is the one process helper: ``RedisServer`` and ``OidcProvider`` here and
``BffProcess`` (``tests/support/bff_procs.py``) are small subclasses that say what to run and when
it is ready. All listen on 127.0.0.1 only, on a free port chosen at construction and kept across
``restart()``, so a client configured with ``.url`` / ``.issuer`` can reconnect after a fault.

The OP is ``tests/op/server.mjs`` (npm ``oidc-provider`` 8); read its header for the endpoints,
forms and settings. ``op_login`` and ``op_logout`` drive its HTML pages the way a browser would,
with a plain ``aiohttp.ClientSession``. That session must keep cookies for an IP-address host,
which aiohttp refuses by default: create it with ``aiohttp.CookieJar(unsafe=True)``, or use
``browser_session()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urljoin, urlsplit

import aiohttp

__all__ = [
    "HOST",
    "OP_DIR",
    "ChildProcess",
    "OidcProvider",
    "OpInteractionError",
    "RedisServer",
    "browser_session",
    "ensure_op_installed",
    "free_port",
    "http_status",
    "op_login",
    "op_logout",
    "tail",
]

HOST = "127.0.0.1"
OP_DIR = Path(__file__).resolve().parent.parent / "op"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, limit: int = 4000) -> str:
    """The last ``limit`` characters of a log file ("" when there is none yet)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-limit:]


def http_status(url: str) -> int | None:
    """The status of a GET to ``url`` right now, or None when nothing answers (1 s at most)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


class ChildProcess:
    """The one base of every process a test starts: ``redis-server``, the OP, ``bff run``.

    What they share lives here once: a free port chosen at construction and kept across
    ``restart()``; a temporary directory holding ``stdout.log`` and ``stderr.log`` (appended to, so
    a restart keeps the earlier output); a process group of its own, so that signals reach the
    children a process starts (``bff run --workers N``); a bounded wait for readiness that fails
    with the log tails when the process exits or the time is up; and ``kill()`` (SIGKILL: a
    crash), ``terminate()`` (SIGTERM, then SIGKILL), ``close()`` and the ``with`` statement.

    A subclass says what to run (``command()``) and when it is ready (``ready()``); ``stop()`` is
    ``kill()`` unless it overrides it.
    """

    name = "process"
    startup_timeout = 20.0

    def __init__(self, port: int | None = None, *, startup_timeout: float | None = None) -> None:
        self.port = port if port is not None else free_port()
        if startup_timeout is not None:
            self.startup_timeout = startup_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bff-{self.name}-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout_mark = 0  # size of stdout.log when the current process was spawned

    # -- what a subclass provides

    def command(self) -> tuple[Sequence[str], Path, Mapping[str, str] | None]:
        """``(argv, cwd, env)``; env None inherits the test process's environment."""
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the process serves (polled by ``wait_started``)."""
        raise NotImplementedError

    # -- the shared machinery

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def spawn(self) -> None:
        """Start the process without waiting for it (see ``wait_started``)."""
        if self.is_running():
            return
        argv, cwd, env = self.command()
        stdout = self.workdir / "stdout.log"
        self._stdout_mark = stdout.stat().st_size if stdout.exists() else 0
        with open(stdout, "ab") as out, open(self.workdir / "stderr.log", "ab") as err:
            self._proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: signals reach its children
            )

    def wait_started(self) -> None:
        """Block until ``ready()``; fail with the logs if the process exits or time runs out."""
        deadline = time.monotonic() + self.startup_timeout
        while not self.ready():
            if not self.is_running():
                raise self._fail("exited during startup")
            if time.monotonic() > deadline:
                raise self._fail(f"not ready within {self.startup_timeout} s")
            time.sleep(0.05)

    def start(self) -> None:
        """Spawn and wait until ready; a no-op when already running."""
        if self.is_running():
            return
        self.spawn()
        self.wait_started()

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to end by itself and return its exit code."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._proc.wait(timeout=timeout)

    def output(self) -> str:
        """What the current process wrote to stdout so far (not earlier runs)."""
        try:
            with open(self.workdir / "stdout.log", "rb") as f:
                f.seek(self._stdout_mark)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def full_logs(self) -> str:
        """Everything the process wrote to stderr and stdout, in every run: for assertions about
        what was (or was never) logged, which the tails of ``logs()`` may have scrolled past."""
        text = []
        for name in ("stderr.log", "stdout.log"):
            with contextlib.suppress(FileNotFoundError):
                text.append((self.workdir / name).read_bytes().decode(errors="replace"))
        return "\n".join(text)

    def logs(self) -> str:
        """The tails of stderr and stdout, for failure messages."""
        return (
            f"--- stderr ---\n{tail(self.workdir / 'stderr.log')}\n"
            f"--- stdout ---\n{tail(self.workdir / 'stdout.log')}"
        )

    def _signal_group(self, signum: int) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL the process and its children (a crash: nothing is cleaned up) and reap it."""
        proc = self._proc
        if proc is None:
            return
        self._signal_group(signal.SIGKILL)
        proc.wait(timeout=10)
        self._proc = None

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM (a graceful shutdown), SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        self.kill()

    def stop(self) -> None:
        """Stop the process; a no-op when it is not running. ``kill()`` unless overridden."""
        self.kill()

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def _fail(self, reason: str) -> RuntimeError:
        self.kill()
        return RuntimeError(f"{self.name} on port {self.port}: {reason}\n{self.logs()}")

    def close(self) -> None:
        """Stop and remove the temporary directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

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


class RedisServer(ChildProcess):
    """A throw-away ``redis-server`` on 127.0.0.1: no persistence, data lives until ``stop()``.

    ``stop()`` kills it (a crash, as far as clients can tell); ``restart()`` brings back an empty
    server on the same port. With ``unix_socket=True`` it listens on a Unix socket only
    (``socket_path``, mode 700) and ``url`` is a ``unix://`` URL.
    """

    name = "redis-server"
    startup_timeout = 10.0

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str = "redis-server",
        startup_timeout: float | None = None,
        unix_socket: bool = False,
    ) -> None:
        super().__init__(port, startup_timeout=startup_timeout)
        self.executable = executable
        self.socket_path = self.workdir / "redis.sock" if unix_socket else None

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}?db=0"
        return f"redis://{HOST}:{self.port}/0"

    def command(self) -> tuple[Sequence[str], Path, Mapping[str, str] | None]:
        if self.socket_path is not None:
            path = str(self.socket_path)
            listen = ["--port", "0", "--unixsocket", path, "--unixsocketperm", "700"]
        else:
            listen = ["--port", str(self.port), "--bind", HOST]
        argv = [
            self.executable, *listen,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip
        return argv, self.workdir, None

    def ready(self) -> bool:
        return self.ping()

    def ping(self) -> bool:
        """True when the server answers PING right now."""
        try:
            if self.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(1)
                sock.connect(str(self.socket_path))
            else:
                sock = socket.create_connection((HOST, self.port), timeout=1)
            with sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def ensure_op_installed() -> None:
    """Run ``npm ci`` in tests/op when its node_modules is missing (once, even across processes)."""
    marker = OP_DIR / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return
    lock_path = Path(tempfile.gettempdir()) / "bff-tests-op-npm.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return
        result = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=OP_DIR,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"npm ci in {OP_DIR} failed:\n{result.stdout}\n{result.stderr}")


class OidcProvider(ChildProcess):
    """The test OP (``node tests/op/server.mjs``) on 127.0.0.1; issuer ``http://127.0.0.1:PORT``.

    All OP state (clients registered at runtime, sessions, grants, tokens, signing keys, stats) is
    in memory: ``restart()`` keeps the port and the issuer but loses all of it, so registered
    clients must register again and every token issued before is dead. Static ``clients`` given
    here come back on restart.

    With ``persistent=True`` the clients, sessions, grants and tokens survive ``restart()`` (a
    state file in the work directory) while the signing keys are new: ``restart()`` is then a
    key rotation. ``fixed_kids=True`` keeps the kids, so the new key material comes under known
    kids. ``revocation_in`` is where the revocation endpoint is published (``"discovery"``,
    ``"rfc8414"`` or ``"none"``); ``revoke_grant=False`` makes revoking a token revoke only that
    token (oidc-provider itself revokes the whole grant). ``discovery_patch`` is merged into the
    discovery document (``None`` removes a key): an OP that advertises less than it offers.
    ``dpop`` turns on DPoP (RFC 9449) at the OP, ``dpop_nonce`` makes it require its nonces.
    ``resource_servers`` (RFC 8707 URI -> ``{"scope", "ttl"}``) get JWT access tokens;
    ``token_exchange=True`` registers the RFC 8693 grant (issue 12).
    ``par`` is ``"optional"`` (oidc-provider's default: PAR offered), ``"required"`` or ``"off"``;
    ``cookie_prefix`` renames the OP's cookies, so one browser can log in at two test OPs.
    """

    name = "oidc-provider"

    def __init__(
        self,
        port: int | None = None,
        *,
        access_ttl: int = 60,
        refresh_ttl: int = 86400,
        clients: Sequence[Mapping[str, Any]] = (),
        node: str = "node",
        startup_timeout: float | None = None,
        persistent: bool = False,
        fixed_kids: bool = False,
        revocation_in: str = "discovery",
        revoke_grant: bool = True,
        discovery_patch: Mapping[str, Any] | None = None,
        dpop: bool = False,
        dpop_nonce: bool = False,
        resource_servers: Mapping[str, Mapping[str, Any]] | None = None,
        token_exchange: bool = False,
        par: str = "optional",
        cookie_prefix: str = "",
    ) -> None:
        super().__init__(port, startup_timeout=startup_timeout)
        # issue 12: OP_RESOURCE_SERVERS and OP_TOKEN_EXCHANGE (see tests/op/server.mjs)
        self.resource_servers = {k: dict(v) for k, v in (resource_servers or {}).items()}
        self.token_exchange = token_exchange
        self.par = par
        self.cookie_prefix = cookie_prefix
        self.persistent = persistent
        self.fixed_kids = fixed_kids
        self.revocation_in = revocation_in
        self.revoke_grant = revoke_grant
        self.discovery_patch = dict(discovery_patch or {})
        self.dpop, self.dpop_nonce = dpop, dpop_nonce  # OP_DPOP, OP_DPOP_NONCE (server.mjs)
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.clients = list(clients)
        self.node = node

    @property
    def issuer(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def command(self) -> tuple[Sequence[str], Path, Mapping[str, str] | None]:
        env = {
            **os.environ,
            "OP_PORT": str(self.port),
            "OP_ACCESS_TTL": str(self.access_ttl),
            "OP_REFRESH_TTL": str(self.refresh_ttl),
            "OP_CLIENTS": json.dumps(self.clients),
            "OP_STATE_FILE": str(self.workdir / "state.json") if self.persistent else "",
            "OP_FIXED_KIDS": "1" if self.fixed_kids else "0",
            "OP_REVOCATION_IN": self.revocation_in,
            "OP_REVOKE_GRANT": "1" if self.revoke_grant else "0",
            "OP_DISCOVERY_PATCH": json.dumps(self.discovery_patch),
            "OP_DPOP": "1" if self.dpop else "0",
            "OP_DPOP_NONCE": "1" if self.dpop_nonce else "0",
            "OP_RESOURCE_SERVERS": json.dumps(self.resource_servers),
            "OP_TOKEN_EXCHANGE": "1" if self.token_exchange else "0",
            "OP_PAR": self.par,
            "OP_COOKIE_PREFIX": self.cookie_prefix,
            "NODE_ENV": "test",
        }
        return [self.node, str(OP_DIR / "server.mjs")], OP_DIR, env

    def spawn(self) -> None:
        ensure_op_installed()
        super().spawn()

    def ready(self) -> bool:
        """The server prints READY once it listens."""
        return "READY" in self.output().splitlines()

    def stop(self) -> None:
        """SIGTERM (the server exits at once), SIGKILL if it lingers; then wait."""
        self.terminate(timeout=5)

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, f"{self.issuer}{path}", **kwargs) as resp,
        ):
            body = await resp.json(content_type=None)
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path} -> {resp.status}: {body}")
            return body

    async def discovery(self) -> dict[str, Any]:
        """The OP's discovery document."""
        doc: dict[str, Any] = await self._request("GET", "/.well-known/openid-configuration")
        return doc

    async def stats(self) -> dict[str, Any]:
        """Counters since start or the last reset.

        ``{"token": {"authorization_code": n, "refresh_token": n, "client_credentials": n},
        "token_errors": {...same keys, failures only}, "revocations": n, "revocation_errors": n,
        "revoked": {"RefreshToken": n, "AccessToken": n, "ClientCredentials": n},
        "backchannel_logouts_sent": n, "backchannel_logout_errors": n, "end_sessions": n,
        "authorizations": n}``. ``token`` counts token endpoint requests, successes and failures.
        """
        stats: dict[str, Any] = await self._request("GET", "/__test/stats")
        return stats

    async def live_tokens(self, account: str) -> dict[str, int]:
        """``{"RefreshToken": n, "AccessToken": n}``: the account's tokens the OP still accepts."""
        counts: dict[str, int] = await self._request(
            "GET", "/__test/live-tokens", params={"account": account}
        )
        return counts

    async def jwks(self) -> dict[str, Any]:
        """The OP's published signing keys."""
        keys: dict[str, Any] = await self._request("GET", "/jwks")
        return keys

    async def reset_stats(self) -> None:
        """Zero every counter."""
        await self._request("POST", "/__test/reset")

    async def register_client(
        self,
        redirect_uris: Sequence[str] = (),
        post_logout_redirect_uris: Sequence[str] = (),
        backchannel_logout_uri: str | None = None,
        token_endpoint_auth_method: str = "client_secret_basic",
        jwks: Mapping[str, Any] | None = None,
        grant_types: Sequence[str] = ("authorization_code", "refresh_token"),
        **metadata: Any,
    ) -> dict[str, Any]:
        """Register a client (RFC 7591) and return the OP's answer.

        The answer holds ``client_id``, ``client_secret`` (not for private_key_jwt) and the
        metadata as stored. A back-channel logout client gets
        ``backchannel_logout_session_required`` so its logout tokens carry ``sid``. Any other
        client metadata can be passed as keyword arguments (``scope``, ``client_name``,
        ``id_token_signed_response_alg="ES256"``, ...).
        """
        body: dict[str, Any] = {
            "redirect_uris": list(redirect_uris),
            "grant_types": list(grant_types),
            "response_types": ["code"] if "authorization_code" in grant_types else [],
            "token_endpoint_auth_method": token_endpoint_auth_method,
        }
        if post_logout_redirect_uris:
            body["post_logout_redirect_uris"] = list(post_logout_redirect_uris)
        if backchannel_logout_uri is not None:
            body["backchannel_logout_uri"] = backchannel_logout_uri
            body["backchannel_logout_session_required"] = True
        if jwks is not None:
            body["jwks"] = dict(jwks)
        body.update(metadata)
        client: dict[str, Any] = await self._request("POST", "/reg", json=body)
        return client


# -------------------------------------------------------------------------------------------------
# Driving the OP's HTML pages


class OpInteractionError(RuntimeError):
    """The OP answered with something op_login/op_logout cannot continue from."""


def browser_session(*secure_origins: str, **kwargs: Any) -> aiohttp.ClientSession:
    """An ``aiohttp.ClientSession`` that keeps cookies like a browser on 127.0.0.1.

    ``secure_origins`` (e.g. a loopback bff's ``http://127.0.0.1:PORT``) are treated as secure,
    so ``Secure`` / ``__Host-`` cookies they set are sent back over plain HTTP.
    """
    jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=list(secure_origins) or None)
    return aiohttp.ClientSession(cookie_jar=jar, **kwargs)


class _Form:
    def __init__(self, attrs: Mapping[str, str | None]) -> None:
        self.id = attrs.get("id") or ""
        self.action = attrs.get("action") or ""
        self.method = (attrs.get("method") or "get").upper()
        self.fields: dict[str, str] = {}  # hidden and text-like inputs, in order
        self.input_types: dict[str, str] = {}
        self.buttons: list[tuple[str, str]] = []  # (name, value) of named submit buttons


class _FormParser(HTMLParser):
    """Collects forms, their inputs and named submit buttons (also those with ``form="id"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []
        self._current: _Form | None = None

    def _owner(self, attrs: Mapping[str, str | None]) -> _Form | None:
        form_id = attrs.get("form")
        if form_id:
            return next((f for f in self.forms if f.id == form_id), None)
        return self._current

    def handle_starttag(self, tag: str, attr_list: list[tuple[str, str | None]]) -> None:
        attrs = dict(attr_list)
        if tag == "form":
            self._current = _Form(attrs)
            self.forms.append(self._current)
            return
        form = self._owner(attrs)
        name = attrs.get("name")
        if form is None or not name:
            return
        kind = (attrs.get("type") or ("submit" if tag == "button" else "text")).lower()
        if tag == "button" or kind == "submit":
            form.buttons.append((name, attrs.get("value") or ""))
        elif tag == "input":
            form.fields[name] = attrs.get("value") or ""
            form.input_types[name] = kind

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def _forms(html: str) -> list[_Form]:
    parser = _FormParser()
    parser.feed(html)
    parser.close()
    return parser.forms


def _auto_submitted(form: _Form) -> bool:
    """A form of hidden fields only, as in oidc-provider's self-submitting pages."""
    return bool(form.fields) and set(form.input_types.values()) == {"hidden"}


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


async def _submit(
    http: aiohttp.ClientSession, page_url: str, form: _Form, extra: Mapping[str, str]
) -> aiohttp.ClientResponse:
    data = {**form.fields, **extra}
    url = urljoin(page_url, form.action or page_url)
    if form.method == "POST":
        return await http.post(url, data=data, allow_redirects=False)
    return await http.get(url, params=data, allow_redirects=False)


async def _walk(
    http: aiohttp.ClientSession,
    start_url: str,
    fill: Callable[[str, list[_Form]], tuple[_Form, dict[str, str]] | None],
    max_steps: int = 20,
) -> str:
    """GET ``start_url``, follow redirects within its origin, answer forms with ``fill``.

    Returns the first Location outside the OP's origin, or the URL of an OP page that ``fill``
    answers with None (the logout success page, for instance).
    """
    op = _origin(start_url)
    url = start_url
    resp = await http.get(url, allow_redirects=False)
    for _ in range(max_steps):
        async with resp:
            if resp.status in (301, 302, 303, 307, 308):
                location = urljoin(url, resp.headers["Location"])
                if _origin(location) != op:
                    return location
                answer = None
            else:
                body = await resp.text()
                if resp.status != 200 or "html" not in resp.content_type:
                    raise OpInteractionError(f"{resp.method} {url} -> {resp.status}: {body[:2000]}")
                answer = fill(body, _forms(body))
                if answer is None:
                    return url
                action = urljoin(url, answer[0].action or url)
                if _origin(action) != op:
                    raise OpInteractionError(f"a form on {url} posts to {action} (form_post?)")
        if answer is None:
            url = location
            resp = await http.get(url, allow_redirects=False)
        else:
            resp = await _submit(http, url, *answer)
            url = str(resp.url)
    raise OpInteractionError(f"more than {max_steps} steps from {start_url}")


async def op_login(
    http: aiohttp.ClientSession,
    authorize_url: str,
    username: str,
    password: str = "pw",
) -> str:
    """Log in at the test OP and return the URL it redirects to (not requested).

    ``authorize_url`` is the full authorization request (as a bff ``/bff/login`` redirect gives).
    Follows the OP's redirects, fills the login form (``login``, ``password``), submits a consent
    form if one is shown (only with ``prompt=consent``) and the OP's self-submitting forms, and
    returns the first Location outside the OP: normally ``redirect_uri?code=...&state=...&iss=...``,
    or an error response such as ``redirect_uri?error=invalid_request&...``.

    ``http`` must use ``aiohttp.CookieJar(unsafe=True)`` (see ``browser_session``); its cookies are
    the user's OP session, so give the same session to ``op_logout``. While that OP session lives,
    a new authorization request is answered without any form (``username`` is then ignored)
    unless it has ``prompt=login``. Logging in as a *different* user in the same session makes the
    OP first end the old session, exactly like an RP-initiated logout of every client in it:
    back-channel logouts are sent and the old session's grants are revoked.
    """

    def fill(html: str, forms: list[_Form]) -> tuple[_Form, dict[str, str]] | None:
        for form in forms:
            if "password" in form.input_types.values():
                values: dict[str, str] = {}
                for name, kind in form.input_types.items():
                    if kind == "password":
                        values[name] = password
                    elif kind in ("text", "email"):
                        values[name] = username
                return form, values
        for form in forms:
            if form.id == "consent-form":
                return form, {}
        for form in forms:
            if _auto_submitted(form):
                return form, {}
        raise OpInteractionError(f"no login or consent form on the OP page:\n{html[:2000]}")

    location = await _walk(http, authorize_url, fill)
    if _origin(location) == _origin(authorize_url):
        raise OpInteractionError(f"the OP never redirected back to the client; ended at {location}")
    return location


async def op_logout(http: aiohttp.ClientSession, end_session_url: str) -> str:
    """Confirm an RP-initiated logout at the test OP and return where it redirects (not requested).

    ``end_session_url`` is the OP's ``end_session_endpoint`` with its query (``client_id``,
    ``post_logout_redirect_uri``, ``state``, ``logout_hint``, ``id_token_hint``). The OP shows a
    form (``xsrf`` hidden field, a ``logout=yes`` button); submitting it ends the OP session of
    ``http``'s cookies, revokes that session's grants (so their refresh tokens die, unless granted
    with offline_access), and sends a back-channel logout to every client of that session that
    registered a ``backchannel_logout_uri`` before it answers. Returns the
    ``post_logout_redirect_uri`` (with ``state``) when one was given and registered, else the OP's
    own ``.../session/end/success`` page URL.
    """

    def fill(html: str, forms: list[_Form]) -> tuple[_Form, dict[str, str]] | None:
        for form in forms:
            if form.id == "op.logoutForm" or "xsrf" in form.fields:
                extra = dict(b for b in form.buttons if b == ("logout", "yes"))
                return form, extra
        if "signed-out" in html:
            return None
        raise OpInteractionError(f"no logout form on the OP page:\n{html[:2000]}")

    return await _walk(http, end_session_url, fill)
