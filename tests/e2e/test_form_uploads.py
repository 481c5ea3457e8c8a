"""What a real Chromium sends on a route with ``methods:`` (its bodies are scanned for
``_method``): its forms, uploads and JSON pass, and a ``_method`` field is refused.

The review of issue 9 tightened the scan (one ``boundary`` outside its value, plain boundary
characters, only UTF-8 charsets, one name per part, bounded part heads): Chromium's own
bodies (its boundary is ``----WebKitFormBoundary...``, with "Boundary" in the value; a file
part has a Content-Type; URLSearchParams adds ``;charset=UTF-8``) must not trip any of it.
"""

from __future__ import annotations

from typing import Any

from playwright.async_api import Browser

from tests.e2e.conftest import Bff, log_in

SEND = """async (kind) => {
  let body;
  const headers = {'X-CSRF': '1'};
  if (kind === 'form-data' || kind === 'override') {
    body = new FormData();
    body.append('title', 'Grüße; "quoted" _method=DELETE');
    body.append('file', new Blob(['x'.repeat(300000)], {type: 'text/plain'}), 'a; "b".txt');
    body.append('photo', new Blob([new Uint8Array(70000)]), 'Fotó ü.bin');
    if (kind === 'override') body.append('_method', 'DELETE');
  } else if (kind === 'urlencoded') {
    body = new URLSearchParams({a: '1', q: '_method', 'ü': 'ß'});
  } else {
    body = JSON.stringify({paymentMethod: 'card', note: '_method'});
    headers['Content-Type'] = 'application/json';
  }
  const r = await fetch('/api/checked/orders/1', {method: 'POST', headers, body});
  return {status: r.status, body: await r.json()};
}"""


async def test_chromiums_bodies_pass_the_scan_and_its_override_is_refused(
    bff: Bff, browser: Browser
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, bff, "uploader")
    for kind in ("form-data", "urlencoded", "json"):
        result: dict[str, Any] = await page.evaluate(SEND, kind)
        assert result["status"] == 200, (kind, result)
        assert result["body"]["method"] == "POST"
    result = await page.evaluate(SEND, "override")
    assert result["status"] == 400 and result["body"]["error"] == "method_override", result
    await context.close()
