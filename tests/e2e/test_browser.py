"""A person's whole path in a real browser, login to logout, and what the browser must never get.

Issue 6, items 1-6, and invariant 2 (a SameSite=Strict cookie usable on the first page load after
the OP's cross-site redirect back).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Error, Page, Request, Response, expect

from tests.e2e.conftest import OP_ACCESS_TTL, SIGNED_OUT, Bff, log_in
from tests.support.procs import free_port


@dataclass
class Traffic:
    """Everything that reached the browser: request URLs and headers, responses and bodies."""

    requests: list[Request] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    unread: list[Response] = field(default_factory=list)  # bodies the browser had dropped
    _pending: list[asyncio.Task[None]] = field(default_factory=list)

    def attach(self, context: BrowserContext) -> None:
        context.on("request", self._on_request)
        context.on("response", self._on_response)

    def _on_request(self, request: Request) -> None:
        self.requests.append(request)
        self._pending.append(asyncio.ensure_future(self._capture_request(request)))

    def _on_response(self, response: Response) -> None:
        self.responses.append(response)
        self._pending.append(asyncio.ensure_future(self._capture_response(response)))

    async def _capture_request(self, request: Request) -> None:
        self.texts.append(request.url)
        self.texts.append(json.dumps(await asyncio.wait_for(request.all_headers(), 10)))
        if request.post_data is not None:
            self.texts.append(request.post_data)
        if request.redirected_from is not None:
            self.texts.append(request.redirected_from.url)

    async def _capture_response(self, response: Response) -> None:
        self.texts.append(response.url)
        self.texts.append(json.dumps(await asyncio.wait_for(response.all_headers(), 10)))
        try:
            body = await asyncio.wait_for(response.body(), 5)
            self.texts.append(body.decode("utf-8", "replace"))
        except (Error, TimeoutError):
            # Redirects have no body; a page left at once (the callback's meta refresh) may be
            # gone before we read it. The test checks that these are the only ones.
            self.unread.append(response)

    async def settle(self) -> None:
        while self._pending:
            pending, self._pending = self._pending, []
            await asyncio.gather(*pending)


def encodings(token: str) -> set[str]:
    """The token as it could appear anywhere: raw, URL-encoded, base64 (standard and URL-safe)."""
    raw = token.encode()
    forms = {token, quote(token, safe=""), quote_plus(token)}
    for b64 in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        forms.update({b64, b64.rstrip("="), quote(b64, safe="")})
    return forms


async def page_state(page: Page) -> str:
    """What scripts in the page can see: the DOM, document.cookie and web storage."""
    script = "() => JSON.stringify([document.cookie, {...localStorage}, {...sessionStorage}])"
    return str(await page.content()) + str(await page.evaluate(script))


async def call_api(page: Page, call: int, status: int) -> None:
    """Click the API button and wait for the answer of that very call (the app numbers them)."""
    await page.click("#call-api")
    await expect(page.locator("#api-status")).to_contain_text(f"Call #{call}: {status}")


# -------------------------------------------------------------------------------------------------


async def test_login_lands_on_the_app_with_claims_on_the_first_page_load(
    bff: Bff, browser: Browser
) -> None:
    # Two different sites: the OP's redirect back to /bff/callback is a cross-site navigation.
    assert urlsplit(bff.url).hostname == "localhost"
    assert urlsplit(bff.op.issuer).hostname == "127.0.0.1"
    context = await browser.new_context()
    page = await context.new_page()
    traffic = Traffic()
    traffic.attach(context)

    await log_in(page, bff, "e2e-first-load")

    await expect(page.locator("#claims")).to_contain_text('"sub": "e2e-first-load"')
    await expect(page.locator("#claims")).to_contain_text("e2e-first-load@example.com")
    await expect(page.locator("#user-name")).to_have_text("Test User e2e-first-load")
    assert urlsplit(page.url).path == "/"
    await traffic.settle()

    app_docs = [
        r
        for r in traffic.requests
        if r.is_navigation_request() and r.url.startswith(bff.url) and r.frame == page.main_frame
    ]
    callback = next(i for i, r in enumerate(app_docs) if "/bff/callback" in r.url)
    after = app_docs[callback + 1 :]
    # Exactly one load of returnTo after the callback: no reload needed to pick up the cookie.
    assert [urlsplit(r.url).path for r in after] == ["/"]
    # The callback answered a page (not a 302 the browser would follow cross-site, cookie-less).
    callback_response = await app_docs[callback].response()
    assert callback_response is not None and callback_response.status == 200
    assert callback_response.headers["content-type"].startswith("text/html")
    # That first load already carries the SameSite=Strict session cookie...
    first_load_headers = await after[0].all_headers()
    assert f"{bff.cookie_name}=" in first_load_headers.get("cookie", "")
    # ...and so does the app's first call to /bff/user, answered 200 with the claims.
    user_calls = [r for r in traffic.responses if urlsplit(r.url).path == "/bff/user"]
    assert user_calls[-1].status == 200
    assert [r.status for r in user_calls].count(200) == 1
    await context.close()


async def test_session_cookie_is_httponly_secure_strict_and_hidden_from_scripts(
    bff: Bff, browser: Browser
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, bff, "e2e-cookie")

    cookies = {c["name"]: c for c in await context.cookies(bff.url)}
    cookie = cookies[bff.cookie_name]
    assert cookie["name"].startswith("__Host-")
    assert cookie["httpOnly"] is True
    assert cookie["secure"] is True  # kept by Chromium on http://localhost, a secure context
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/"
    assert cookie["domain"] == "localhost"  # host-only: no Domain attribute
    assert len(cookie["value"]) >= 43

    visible = await page.evaluate("() => document.cookie")
    assert bff.cookie_name not in visible
    assert cookie["value"] not in visible
    await context.close()


async def test_no_token_reaches_the_browser_in_the_whole_flow(bff: Bff, browser: Browser) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    traffic = Traffic()
    traffic.attach(context)
    tokens: set[str] = set()
    states: list[str] = []

    async def collect() -> None:
        data = await bff.session_data(context)
        assert data is not None, "no live session for the browser's cookie"
        tokens.update(t for t in (data.access_token, data.refresh_token, data.id_token) if t)
        states.append(await page_state(page))

    await log_in(page, bff, "e2e-leak", settle=traffic.settle)
    await collect()
    first_access = (await bff.session_data(context)).access_token  # type: ignore[union-attr]
    await call_api(page, 1, 200)
    await expect(page.locator("#api-result")).to_contain_text('"sub": "e2e-leak"')
    await asyncio.sleep(OP_ACCESS_TTL + 1.5)  # the access token expires; bff refreshes it
    async with page.expect_response(lambda r: r.url.endswith("/bff/user")) as user:
        await call_api(page, 2, 200)  # the app then asks /bff/user for the new idle deadline
    await (await user.value).finished()
    await collect()
    refreshed = await bff.session_data(context)
    assert refreshed is not None and refreshed.access_token != first_access
    await traffic.settle()  # every body read before we navigate away
    await page.click("#logout")
    await page.click("#logout-yes")
    await page.wait_for_url(f"{bff.url}{SIGNED_OUT}*")
    await expect(page.locator("#login")).to_be_visible()
    states.append(await page_state(page))
    await traffic.settle()

    # The tokens are real: an access token before and after the refresh, a refresh and an ID token.
    assert len(tokens) >= 4
    assert any(t.count(".") == 2 for t in tokens)  # the ID token, a JWT
    assert len(traffic.responses) > 10 and any("/bff/logout" in r.url for r in traffic.requests)
    for response in traffic.unread:
        assert 300 <= response.status < 400 or "/bff/callback" in response.url, (
            response.url,
            response.status,
        )
    seen = traffic.texts + states
    for token in tokens:
        for form in encodings(token):
            leaks = [text[:200] for text in seen if form in text]
            assert not leaks, f"a token reached the browser: {leaks}"
    await context.close()


async def test_api_call_survives_access_token_expiry_without_navigation(
    bff: Bff, browser: Browser
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, bff, "e2e-refresh")
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    await page.evaluate("() => { window.__sameDocument = true; }")

    await call_api(page, 1, 200)
    result = page.locator("#api-result")
    await expect(result).to_contain_text('"sub": "e2e-refresh"')
    first = json.loads(await result.text_content() or "{}")
    refreshes = (await bff.op.stats())["token"]["refresh_token"]
    upstream_calls = bff.api.stats.with_token

    await asyncio.sleep(OP_ACCESS_TTL + 1.5)  # past the access token's lifetime
    started = time.time()
    await call_api(page, 2, 200)
    second = json.loads(await result.text_content() or "{}")

    assert second["claims"]["sub"] == "e2e-refresh"
    # A new access token (the API validated it at the OP's userinfo), from a refresh grant.
    assert second["token_fingerprint"] != first["token_fingerprint"]
    assert (await bff.op.stats())["token"]["refresh_token"] > refreshes
    assert bff.api.stats.with_token == upstream_calls + 1
    # No navigation of any kind: the same document did it all.
    assert navigations == []
    assert await page.evaluate("() => window.__sameDocument") is True
    assert time.time() - started < 10
    await context.close()


async def test_logout_lands_on_the_configured_page_and_back_does_not_restore_the_session(
    bff: Bff, browser: Browser
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, bff, "e2e-logout")
    await call_api(page, 1, 200)
    await expect(page.locator("#api-result")).to_contain_text('"sub": "e2e-logout"')

    await page.click("#logout")
    await page.wait_for_url(f"{bff.op.issuer}/**")  # the OP asks to confirm (no id_token_hint)
    await page.click("#logout-yes")
    await page.wait_for_url(f"{bff.url}{SIGNED_OUT}*")
    assert urlsplit(page.url).path == SIGNED_OUT
    await expect(page.locator("#logged-out-message")).to_have_text("You are signed out.")
    assert await bff.session_data(context) is None

    # The API now answers 401 and the app offers the login button.
    responses: list[Response] = []
    page.on("response", lambda response: responses.append(response))
    await call_api(page, 1, 401)  # a new document after the logout: its first call
    assert [r.status for r in responses if "/api/demo/" in r.url] == [401]
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#logged-in")).to_be_hidden()

    # Back through the history to the logged-in page: it does not come back logged in.
    for _ in range(4):
        await page.go_back()
        if page.url.rstrip("/") == bff.url:
            break
    assert page.url.rstrip("/") == bff.url, page.url
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#logged-in")).to_be_hidden()
    await expect(page.locator("#claims")).to_be_empty()
    status = await page.evaluate(
        "async () => (await fetch('/bff/user', {headers: {'X-CSRF': '1'}})).status"
    )
    assert status == 401
    await context.close()


EVIL_PAGE = """<!doctype html>
<html><head><title>evil</title></head><body>
<form id="post" method="post" action="{app}/api/demo/transfer">
  <input name="amount" value="1000"><button id="submit" type="submit">Win a prize</button>
</form>
<script>
async function attempt(name, url, init) {{
  try {{
    const r = await fetch(url, init);
    let body = '';
    try {{ body = await r.text(); }} catch (e) {{ body = 'unreadable: ' + e; }}
    return {{name, outcome: 'response', type: r.type, status: r.status, body}};
  }} catch (e) {{
    return {{name, outcome: 'error', error: String(e)}};
  }}
}}
window.results = Promise.all([
  attempt('api with X-CSRF', '{app}/api/demo/hello',
          {{credentials: 'include', headers: {{'X-CSRF': '1'}}}}),
  attempt('api plain cors', '{app}/api/demo/hello', {{credentials: 'include'}}),
  attempt('api no-cors', '{app}/api/demo/hello', {{credentials: 'include', mode: 'no-cors'}}),
  attempt('user with X-CSRF', '{app}/bff/user',
          {{credentials: 'include', headers: {{'X-CSRF': '1'}}}}),
  attempt('user no-cors', '{app}/bff/user', {{credentials: 'include', mode: 'no-cors'}}),
  attempt('api POST no-cors', '{app}/api/demo/transfer',
          {{method: 'POST', credentials: 'include', mode: 'no-cors', body: 'amount=1000',
            headers: {{'Content-Type': 'application/x-www-form-urlencoded'}}}}),
]);
</script>
</body></html>
"""


async def test_another_site_gets_nothing_usable_and_its_form_post_is_refused(
    bff: Bff, browser: Browser
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, bff, "e2e-evil")
    await call_api(page, 1, 200)
    await expect(page.locator("#api-result")).to_contain_text('"sub": "e2e-evil"')
    calls_before = bff.api.stats.requests

    # Another site: 127.0.0.1 is not localhost, and the port differs too.
    evil = web.Application()
    html = EVIL_PAGE.format(app=bff.url)

    async def evil_page_handler(_: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    evil.router.add_get("/", evil_page_handler)
    runner = web.AppRunner(evil)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        evil_page = await context.new_page()
        bff_answers: list[Response] = []
        evil_page.on(
            "response", lambda r: bff_answers.append(r) if r.url.startswith(bff.url) else None
        )
        await evil_page.goto(f"http://127.0.0.1:{port}/")
        results: list[dict[str, Any]] = await evil_page.evaluate("() => window.results")
        assert len(results) == 6
        for result in results:
            usable = result["outcome"] == "response" and (result["status"] != 0 or result["body"])
            assert not usable, result
            assert "e2e-evil" not in json.dumps(result)

        async with evil_page.expect_navigation() as navigation:
            await evil_page.click("#submit")
        answer = await navigation.value
        assert answer is not None and answer.url == f"{bff.url}/api/demo/transfer"
        assert answer.status in (401, 403), answer.status
        assert "e2e-evil" not in await answer.text()
        # bff refused them all itself: none of them reached the API.
        assert bff.api.stats.requests == calls_before
        assert all(r.status in (401, 403) for r in bff_answers if r.request.method != "OPTIONS")
    finally:
        await runner.cleanup()

    # The user's own tab still works: the attack changed nothing.
    await call_api(page, 2, 200)
    await context.close()


async def test_a_cancelled_login_lands_back_in_the_app_which_shows_why(
    bff: Bff, browser: Browser
) -> None:
    """Issue 9, point 11: the person cancels at the OP; the app, not a JSON page, says so."""
    context = await browser.new_context()
    page = await context.new_page()
    documents: list[tuple[str, int, dict[str, str]]] = []
    page.on(
        "response",
        lambda r: (
            documents.append((r.url, r.status, r.headers))
            if r.request.is_navigation_request() and r.frame == page.main_frame
            else None
        ),
    )
    async with page.expect_response(lambda r: r.url.endswith("/bff/user")) as first:
        await page.goto(f"{bff.url}/orders?tab=2")
    await (await first.value).finished()
    await expect(page.locator("#login-error")).to_be_hidden()
    await page.click("#login")
    await page.wait_for_url(f"{bff.op.issuer}/**")
    await page.click("#cancel")

    error = page.locator("#login-error")
    await expect(error).to_have_text("The login was cancelled or refused. You are not logged in.")
    assert await error.get_attribute("data-code") == "access_denied"
    await expect(page.locator("#logged-out")).to_be_visible()
    # Back on the page the login started from; the app took the code out of the address bar, so
    # a reload or the next login does not carry the old failure along.
    await expect(page).to_have_url(f"{bff.url}/orders?tab=2")
    href = await page.locator("#login").get_attribute("href")
    assert href == "/bff/login?returnTo=" + quote("/orders?tab=2", safe="")

    callback = next(d for d in documents if urlsplit(d[0]).path == "/bff/callback")
    assert callback[1] == 303
    assert callback[2]["location"] == "/orders?tab=2&bff_error=access_denied"
    assert not any(d[2].get("content-type", "").startswith("application/json") for d in documents)
    await context.close()
