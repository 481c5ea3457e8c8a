"""What the deploy files run, run for real on loopback (CI has no Docker engine).

- ``python -m bff.healthcheck`` (the image's HEALTHCHECK) asks ``/healthz`` on the port the
  config names and says so by its exit code.
- The compose topology's pieces: the demo OP and echo API as processes of their own
  (``python -m demo.services``), two ``bff run`` instances on ``deploy/compose/bff.yaml`` sharing
  one Redis; a login through one instance serves an API call through the other, and the
  healthcheck passes on that config with the instance's ``BFF_PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from bff.healthcheck import healthz_url
from bff.healthcheck import main as healthcheck
from tests.support.bff_procs import BffProcess
from tests.support.procs import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_CONFIG = ROOT / "deploy" / "compose" / "bff.yaml"
KEY = "compose-test-key-" + "x" * 32
STARTUP_TIMEOUT = 30.0


def test_healthz_url_asks_a_wildcard_listener_on_loopback() -> None:
    assert healthz_url("0.0.0.0", 8080) == "http://127.0.0.1:8080/healthz"
    assert healthz_url("::", 8080) == "http://[::1]:8080/healthz"
    assert healthz_url("127.0.0.2", 81) == "http://127.0.0.2:81/healthz"
    assert healthz_url("::1", 81) == "http://[::1]:81/healthz"


def write_config(path: Path, port: int) -> Path:
    path.write_text(
        "public_url: https://app.example.com\n"
        f"listen: {{host: 0.0.0.0, port: {port}}}\n"
        "oidc: {issuer: https://idp.example.com, client_id: c, client_secret: s}\n"
        f"keys: [{KEY}]\n"
    )
    return path


async def test_the_healthcheck_exit_code_follows_healthz_on_the_configured_port(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    status = [200]

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({}, status=status[0])

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    server = await aiohttp_server(app, host="127.0.0.1")
    config = write_config(tmp_path / "bff.yaml", server.port)

    assert await asyncio.to_thread(healthcheck, ["--config", str(config)]) == 0
    status[0] = 503
    assert await asyncio.to_thread(healthcheck, ["--config", str(config)]) == 1
    dead = write_config(tmp_path / "dead.yaml", free_port())
    assert await asyncio.to_thread(healthcheck, ["--config", str(dead)]) == 1
    (tmp_path / "broken.yaml").write_text("listen: [\n")
    assert await asyncio.to_thread(healthcheck, ["--config", str(tmp_path / "broken.yaml")]) == 1


def test_the_healthcheck_without_a_config_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BFF_CONFIG", raising=False)
    assert healthcheck([]) == 1


@contextlib.contextmanager
def demo_service(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m demo.services ARGS``; SIGTERM at the end, which must exit it cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo.services", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError(f"demo.services {args[0]} ignored SIGTERM") from None
        assert code == 0, f"demo.services {args[0]} exited {code}"


async def wait_status(http: aiohttp.ClientSession, url: str, want: int) -> dict[str, Any]:
    """Poll ``url`` until it answers ``want`` (bounded); its JSON body."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(url) as resp:
                if resp.status == want:
                    body: dict[str, Any] = await resp.json(content_type=None)
                    return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never answered {want}")
        await asyncio.sleep(0.2)


def as_this_checkout_reads_it(source: Path, path: Path) -> dict[str, Any]:
    """The config at ``source``, also written to ``path``."""
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    path.write_text(yaml.safe_dump(config))
    return config


def compose_config(path: Path, *, app: int, op: int, api: int, store: str) -> Path:
    """deploy/compose/bff.yaml with this test's ports, store and secrets (BffProcess passes no
    BFF_* variables), every other setting as the file has it."""
    config = as_this_checkout_reads_it(COMPOSE_CONFIG, path)
    config["public_url"] = f"http://localhost:{app}"
    config["static"] = str(ROOT / "static")
    config["oidc"]["issuer"] = f"http://localhost:{op}"
    config["oidc"]["client_secret"] = "demo-secret"
    config["session"]["store"] = store
    config["keys"] = [KEY]
    (upstream,) = config["upstreams"]
    upstream["url"] = f"http://127.0.0.1:{api}"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not found")
async def test_the_compose_pieces_serve_a_session_across_two_instances(tmp_path: Path) -> None:
    op_port, api_port = free_port(), free_port()
    issuer = f"http://localhost:{op_port}"
    with (
        RedisServer() as redis,
        demo_service("op", "--host", "127.0.0.1", "--port", str(op_port)),
        demo_service("api", "--host", "127.0.0.1", "--port", str(api_port), "--issuer", issuer),
    ):
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            discovery = await wait_status(http, f"{issuer}/.well-known/openid-configuration", 200)
            assert discovery["issuer"] == issuer, "the mock OP names itself after the Host used"
            await wait_status(http, f"http://127.0.0.1:{api_port}/", 401)  # no bearer: refused

            one, two = free_port(), free_port()
            config = compose_config(
                tmp_path / "bff.yaml", app=one, op=op_port, api=api_port, store=redis.url
            )
            first = BffProcess(config, port=one, startup_timeout=STARTUP_TIMEOUT)
            second = BffProcess(config, port=two, startup_timeout=STARTUP_TIMEOUT)
            with first, second:
                async with http.get(
                    f"http://localhost:{one}/bff/login", allow_redirects=False
                ) as resp:
                    assert resp.status == 302
                    authorize = resp.headers["Location"]
                assert authorize.startswith(f"{issuer}/")
                async with http.post(
                    authorize, data={"sub": "alice"}, allow_redirects=False
                ) as resp:
                    assert resp.status == 302, await resp.text()
                    callback = resp.headers["Location"]
                async with http.get(callback, allow_redirects=False) as resp:
                    assert resp.status == 200, await resp.text()

                # The session lives in the shared Redis: the other instance serves it.
                async with http.get(
                    f"http://localhost:{two}/api/demo/hello", headers={"X-CSRF": "1"}
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    answer = await resp.json()
                assert answer["claims"]["name"] == "Alice Example"
                assert answer["path"] == "/hello"

                # The image's HEALTHCHECK on the compose file itself, as bff2 would run it.
                compose_file = tmp_path / "compose-bff.yaml"
                as_this_checkout_reads_it(COMPOSE_CONFIG, compose_file)
                env = {
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "BFF_CONFIG": str(compose_file),
                    "BFF_PORT": str(two),
                    "OIDC_CLIENT_SECRET": "demo-secret",
                    "BFF_KEY_CURRENT": KEY,
                }
                check = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "bff.healthcheck"],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert check.returncode == 0, check.stderr
