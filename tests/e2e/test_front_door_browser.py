"""Issue 9, point 1, in real Chromium: a page script cannot read the HttpOnly cookie back out of
bff's answer to an oversized request.

The attack: any script on the app's origin (an XSS, a compromised dependency) can set cookies for
that origin, but cannot read the HttpOnly session cookie. It can make the Cookie header the browser
sends too large for the server, then read whatever the server answers. If that answer quotes the
header, the session cookie is the script's. So after a real login the page inflates
``document.cookie`` (cookies of almost 4 KB each, Chromium's limit per cookie) until bff refuses
the request, then fetches a proxied API path, ``/bff/user``, an SPA path and a random path, and
loads one into an iframe, reading everything a script can: status, status text, every readable
header, the body, the iframe's document. The cookie's value (which the test reads from the
browser context, since the page cannot) must be in none of it, and each answer must be 431 or 400,
so that the oversize path really was taken.

The last test is the review's finding 2 in Chromium: cookies planted under longer paths, with lone
quotes, must not let a planted session cookie choose the session.

bff runs as a real ``bff run`` process: the server layer under test (its parser limits and error
answers) is set up by ``bff run``, not by ``create_app``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page

from tests.support.bff_procs import (
    COOKIE_NAME,
    BffProcess,
    EchoUpstream,
    base_config,
    write_config,
)
from tests.support.leaks import echoes, secret_forms
from tests.support.procs import OidcProvider, RedisServer, free_port

KEY = "front-door-browser-key-0123456789abcdef01"
PASSWORD = "pw"  # the test OP takes any non-empty password
API = "/api"
FILLER_BYTES = 4000  # name + value stay under Chromium's 4096-byte limit per cookie
MAX_FILLERS = 150  # 600 KB of cookies: far beyond any sane header limit, under Chromium's 180
FETCH_TIMEOUT_MS = 15_000


@dataclass
class App:
    url: str  # http://localhost:PORT: a secure context for Chromium, another site than the OP
    op: OidcProvider
    proc: BffProcess


@pytest.fixture
async def app(
    oidc_op: OidcProvider, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[App]:
    upstream = EchoUpstream()
    upstream.start()
    port = free_port()
    public = f"http://localhost:{port}"
    client = await oidc_op.register_client(redirect_uris=[f"{public}/bff/callback"])
    config = base_config(
        public_url=public,
        issuer=oidc_op.issuer,
        client=client,
        store=redis_server.url,
        keys=[KEY],
        static=tmp_path / "static",
        upstreams=[{"path": API, "url": upstream.url}],
        http_timeout="20s",
    )
    proc = BffProcess(write_config(tmp_path, config), port=port)
    try:
        await asyncio.to_thread(proc.start)
        yield App(url=public, op=oidc_op, proc=proc)
    finally:
        await asyncio.to_thread(proc.close)
        upstream.stop()


async def log_in(page: Page, app: App, username: str) -> None:
    """Straight to ``/bff/login``, the OP's form, and back through the callback to ``/``."""
    await page.goto(f"{app.url}/bff/login?returnTo=/")
    await page.wait_for_url(f"{app.op.issuer}/**")
    await page.fill("#login", username)
    await page.fill("#password", PASSWORD)
    await page.click("#sign-in")
    await page.wait_for_url(f"{app.url}/", timeout=20_000)


async def session_cookie(context: BrowserContext, url: str) -> str:
    cookie = next((c for c in await context.cookies(url) if c["name"] == COOKIE_NAME), None)
    assert cookie is not None and cookie["value"], "no session cookie after the login"
    assert cookie["httpOnly"], "the session cookie must be HttpOnly for this test to mean much"
    return cookie["value"]


# What the page runs. Everything it can read goes into the returned JSON.
FETCH_ALL = """
async ({requests, timeoutMs}) => {
  const read = async ({path, method, headers, body}) => {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    try {
      const r = await fetch(path, {method, headers, body, signal: abort.signal,
                                   credentials: 'same-origin', cache: 'no-store'});
      const seen = {path, status: r.status, statusText: r.statusText, url: r.url, type: r.type,
                    redirected: r.redirected, headers: [...r.headers.entries()]};
      seen.body = await r.text();
      return seen;
    } catch (e) {
      return {path, status: 0, error: String(e)};
    } finally {
      clearTimeout(timer);
    }
  };
  const seen = [];
  for (const request of requests) seen.push(await read(request));
  // The same oversized request as a document: an iframe of this origin is readable too.
  const frame = document.createElement('iframe');
  const loaded = new Promise(resolve => {
    frame.onload = resolve;
    setTimeout(resolve, timeoutMs);
  });
  frame.src = requests[requests.length - 1].path;
  document.body.appendChild(frame);
  await loaded;
  let doc = '';
  try { doc = frame.contentDocument.documentElement.outerHTML; } catch (e) { doc = String(e); }
  seen.push({path: 'iframe:' + frame.src, body: doc});
  // And as XMLHttpRequest, whose getAllResponseHeaders() is another view of the answer.
  const xhr = await new Promise(resolve => {
    const x = new XMLHttpRequest();
    x.open('GET', '/bff/user');
    x.setRequestHeader('X-CSRF', '1');
    x.timeout = timeoutMs;
    x.onloadend = () => resolve({path: 'xhr:/bff/user', status: x.status,
                                 headers: x.getAllResponseHeaders(), body: x.responseText});
    x.send();
  });
  seen.push(xhr);
  seen.push({path: 'document.cookie', body: document.cookie});
  return seen;
}
"""

INFLATE = """
async ({fillerBytes, maxFillers, timeoutMs}) => {
  // Add cookies of almost 4 KB until /bff/user stops answering 200: the Cookie header is then
  // too large for bff. Returns how many were set and the last probe's status.
  let status = 200;
  let n = 0;
  while (n < maxFillers && status === 200) {
    const name = 'fill' + n;
    document.cookie = `${name}=${'x'.repeat(fillerBytes - name.length - 1)}; path=/`;
    n += 1;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    try {
      const r = await fetch('/bff/user', {headers: {'X-CSRF': '1'}, signal: abort.signal,
                                          cache: 'no-store'});
      status = r.status;
      await r.text();
    } catch (e) {
      status = 0;
    } finally {
      clearTimeout(timer);
    }
  }
  return {count: n, status, cookieBytes: document.cookie.length};
}
"""

DEFLATE = """
(count) => {
  for (let n = 0; n < count; n++) document.cookie = `fill${n}=; max-age=0; path=/`;
  return document.cookie.length;
}
"""

USER_STATUS = """
async () => (await fetch('/bff/user', {headers: {'X-CSRF': '1'}, cache: 'no-store'})).status
"""


async def test_a_page_that_inflates_its_cookies_cannot_read_the_session_cookie_back(
    app: App, browser: Browser
) -> None:
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await log_in(page, app, "front-door-browser")
        # The login cookie lives 10 minutes; once it is gone the session cookie is the first one
        # in the Cookie header, where a parser error that quotes the header's start shows it.
        await context.clear_cookies(name=f"{COOKIE_NAME}-tx")
        cookie = await session_cookie(context, app.url)
        forms = secret_forms(cookie)
        assert await page.evaluate(USER_STATUS) == 200, "the session must work before inflating"

        inflated: dict[str, Any] = await page.evaluate(
            INFLATE,
            {"fillerBytes": FILLER_BYTES, "maxFillers": MAX_FILLERS, "timeoutMs": FETCH_TIMEOUT_MS},
        )
        assert inflated["count"] < MAX_FILLERS, f"bff took a {inflated['cookieBytes']} B Cookie"

        rng = random.Random(9001)
        random_path = "/" + "".join(
            rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(24)
        )
        csrf = {"X-CSRF": "1"}
        requests = [
            {"path": f"{API}/items?x=1", "method": "GET", "headers": csrf},
            {
                "path": f"{API}/items",
                "method": "POST",
                "headers": {**csrf, "Content-Type": "application/json"},
                "body": '{"a": 1}',
            },
            {"path": "/bff/user", "method": "GET", "headers": csrf},
            {"path": random_path, "method": "GET", "headers": {}},
            {"path": "/app/settings", "method": "GET", "headers": {}},
        ]
        seen: list[dict[str, Any]] = await page.evaluate(
            FETCH_ALL, {"requests": requests, "timeoutMs": FETCH_TIMEOUT_MS}
        )
        readable = json.dumps(seen).encode() + (await page.content()).encode()
        found = echoes(readable, forms)
        brief = [{k: v[:300] if isinstance(v, str) else v for k, v in s.items()} for s in seen]
        shown = json.dumps(brief, indent=1).replace(cookie, "<SESSION-COOKIE>")
        assert not found, f"the page read {', '.join(found[:3])} of the session cookie:\n{shown}"
        statuses = {s["path"]: s.get("status") for s in seen if "status" in s}
        assert inflated["status"] in (400, 431), f"inflating ended with {inflated}"
        assert all(status in (400, 431) for status in statuses.values()), (
            f"every oversized request must get 431 or 400: {statuses}\n{shown}"
        )

        # Clean up: without the fillers the same session works again (nothing was harmed).
        assert await page.evaluate(DEFLATE, inflated["count"]) < FILLER_BYTES
        assert await page.evaluate(USER_STATUS) == 200
        assert await session_cookie(context, app.url) == cookie
    finally:
        await context.close()


PLANT = """
(planted) => {
  // Path-scoped cookies come first in Chromium's Cookie header, then the real one (path /), then
  // y: `bff-session=<planted>; a="x\\"; bff-session=<real>; y="`. A parser that reads "..." as a
  // quoted string across ";" sees only the planted session.
  document.cookie = `${planted}; path=/bff/user`;
  document.cookie = 'a="x\\\\"; path=/bff';
  document.cookie = 'y="; path=/';
}
"""


async def test_planted_quoted_cookies_cannot_pick_the_session_in_chromium(
    app: App, browser: Browser
) -> None:
    """Issue 9 review, finding 2: a script (or a sibling subdomain) plants its own valid session
    under a longer path plus two cookies holding a lone quote around the real one. bff counts
    the name as Chromium writes the header, finds it twice, and treats the request as anonymous
    instead of as the attacker."""
    attacker = await browser.new_context()
    victim = await browser.new_context()
    try:
        page = await attacker.new_page()
        await log_in(page, app, "planter")
        planted = await session_cookie(attacker, app.url)
        page = await victim.new_page()
        await log_in(page, app, "victim")
        await victim.clear_cookies(name=f"{COOKIE_NAME}-tx")
        assert await page.evaluate(USER_STATUS) == 200
        await page.evaluate(PLANT, f"{COOKIE_NAME}={planted}")
        async with page.expect_request(lambda r: r.url.endswith("/bff/user")) as sent:
            seen = await page.evaluate(
                "async () => { const r = await fetch('/bff/user', {headers: {'X-CSRF': '1'},"
                " cache: 'no-store'}); return [r.status, await r.text()]; }"
            )
        header = (await (await sent.value).all_headers()).get("cookie", "")
        assert seen[0] == 401, seen
        assert "planter" not in seen[1]
        # The attack's shape was really sent: the planted session first, a lone quote before and
        # after the real one (Playwright reports the header as Chromium wrote it).
        start = f"{COOKIE_NAME}={planted}; "
        assert header.startswith(start + 'a="x\\"; ') and header.endswith('; y="'), header
        assert header.count(f"{COOKIE_NAME}=") == 2, header
    finally:
        await attacker.close()
        await victim.close()
