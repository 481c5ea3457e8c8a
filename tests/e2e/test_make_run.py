"""Issue 6, item 7: ``make run`` as a newcomer runs it, a login through it, and Ctrl-C.

The demo brings its own OP (oidc-provider-mock) and store (memory), so this needs neither the
npm OP nor redis-server; only make, the virtualenv (make creates it if missing) and Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import pytest
from playwright.async_api import Browser, expect

from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
BANNER_TIMEOUT = 600.0  # a first `make run` creates the virtualenv and installs from PyPI


class Output:
    """The lines a process prints, collected by a thread so a test can wait for one."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    async def wait_for(self, pattern: str, within: float) -> re.Match[str]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self._proc.poll() is not None and not self._thread.is_alive():
                break
            await asyncio.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}; output so far:\n" + self.text())

    def text(self) -> str:
        return "\n".join(self.lines)


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(pgid: int, seconds: float) -> bool:
    """True once no process of the group is left (polls for at most ``seconds``)."""
    deadline = time.monotonic() + seconds
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not group_alive(pgid)


def start_make_run(env: dict[str, str], stderr: IO[str]) -> subprocess.Popen[str]:
    # Its own process group, as a terminal gives a foreground job: Ctrl-C signals all of it.
    return subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


async def test_make_run_serves_a_demo_a_person_can_log_in_to_and_ctrl_c_stops_it(
    browser: Browser, tmp_path: Path
) -> None:
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    ports = {"DEMO_PORT": free_port(), "DEMO_OP_PORT": free_port(), "DEMO_API_PORT": free_port()}
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update({k: str(v) for k, v in ports.items()}, PYTHONUNBUFFERED="1")
    stderr = (tmp_path / "stderr.log").open("w")
    proc = start_make_run(env, stderr)
    output = Output(proc)
    try:
        url = (await output.wait_for(r"Open\s+(http://\S+)", BANNER_TIMEOUT)).group(1)
        assert url == f"http://localhost:{ports['DEMO_PORT']}"
        user = (await output.wait_for(r"Log in as\s+(\S+)", 1)).group(1)

        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(url)
        await page.click("#login")
        await page.wait_for_url(f"http://127.0.0.1:{ports['DEMO_OP_PORT']}/**")
        await page.fill("input[name=sub]", user)  # the mock OP's form: a user name, no password
        await page.click("button:has-text('Authorize')")
        await expect(page.locator("#logged-in")).to_be_visible(timeout=15_000)
        await expect(page.locator("#claims")).to_contain_text(f'"sub": "{user}"')
        await page.click("#call-api")
        await expect(page.locator("#api-status")).to_contain_text("Call #1: 200")
        await expect(page.locator("#api-result")).to_contain_text(f'"sub": "{user}"')
        await context.close()

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        await asyncio.to_thread(proc.wait, 30)
        gone = await asyncio.to_thread(wait_group_gone, proc.pid, 15)
        assert gone, "a process of `make run` outlived Ctrl-C"
        await output.wait_for(r"Stopped\.", 5)
        for name, port in ports.items():
            assert not listening(port), f"{name} {port} still accepts connections"
        log = (tmp_path / "stderr.log").read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        stderr.close()
