"""``python -m demo.screenshots``: the README's pictures of the demo, logged out and logged in.

Starts the demo in-process on free ports, drives headless Chromium through a login with
Playwright, and writes docs/screenshots/logged-out.png and docs/screenshots/logged-in.png.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

from playwright.async_api import async_playwright, expect

from demo.run import DEMO_USER, ROOT, DemoOptions, run_demo

OUT = ROOT / "docs" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def take(out: Path = OUT, chromium: str = "/usr/bin/chromium") -> list[Path]:
    options = DemoOptions(port=_free_port(), op_port=_free_port(), api_port=_free_port())
    async with run_demo(options) as urls, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 900, "height": 900})
        await page.goto(urls.app)
        await expect(page.locator("#login")).to_be_visible()
        logged_out = out / "logged-out.png"
        await page.screenshot(path=logged_out, full_page=True)
        await page.click("#login")
        await page.wait_for_url(f"{urls.op}/**")
        await page.fill("input[name=sub]", DEMO_USER)
        await page.click("button:has-text('Authorize')")
        await expect(page.locator("#logged-in")).to_be_visible()
        await page.click("#call-api")
        await expect(page.locator("#api-status")).to_contain_text("Call #1: 200")
        logged_in = out / "logged-in.png"
        await page.screenshot(path=logged_in, full_page=True)
        await browser.close()
    return [logged_out, logged_in]


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(take()):
        print(path.relative_to(ROOT))
    sys.exit(0)
