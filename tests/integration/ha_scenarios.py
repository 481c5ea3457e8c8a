"""What every replicated Redis topology must carry, end to end (no tests here).

``test_redis_sentinel.py`` and ``test_redis_cluster.py`` run these scenarios against real
``bff run`` processes, the real OP and their topology (``tests/support/redis_procs.py``):

- ``functional_scenario``: login, proxied calls on two instances, one refresh for twenty calls
  at expiry (single flight through the topology's lock), ``bff sessions list/revoke --sub``,
  a back-channel logout by ``sid`` sent by the OP, and one by ``sub`` alone (another OP client
  whose logout tokens carry no ``sid``) that ends the user's sessions in two user agents.
- ``failover_scenario``: bounded steady load while the test kills a master; every answer is
  200 or 503 with ``Retry-After``, service comes back by itself, and every session written
  (and replicated) before the kill still works afterwards. The 503 window is printed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from bff.config import RedisSettings, Secret
from bff.keys import Keyring, SessionSecret, open_sealed, secret_key, store_id
from bff.sessions import SessionData, lock_key, session_key
from bff.store import open_store
from tests.support.bff_procs import (
    COOKIE_NAME,
    BffCluster,
    BffProcess,
    EchoUpstream,
    base_config,
    login,
    write_config,
)
from tests.support.procs import OidcProvider, browser_session, op_login, op_logout

ROOT = Path(__file__).resolve().parent.parent.parent
API = "/api/echo"


@dataclass(slots=True)
class Topology:
    """How bff reaches a topology: its store URL and its ``session.redis`` block."""

    url: str
    redis: Mapping[str, Any]

    def settings(self) -> RedisSettings:
        r = self.redis
        secret = {k: Secret(r[k]) for k in ("password", "sentinel_password") if k in r}
        return RedisSettings(
            username=r.get("username"),
            sentinel_username=r.get("sentinel_username"),
            password=secret.get("password"),
            sentinel_password=secret.get("sentinel_password"),
        )

    async def read_session(self, keys: list[str], cookie: str) -> SessionData | None:
        """The session a cookie names, decrypted straight from the store."""
        value = Keyring(keys).unsign(cookie)
        assert value is not None, "the cookie does not verify"
        secret = SessionSecret(value)
        sid = store_id(secret)
        store = open_store(self.url, timeout=5.0, redis=self.settings())
        try:
            blob = await store.get(session_key(sid))
        finally:
            await store.close()
        if blob is None:
            return None
        return SessionData.from_bytes(open_sealed(secret_key(secret), blob, sid.encode()))


def write_bff_config(
    workdir: Path,
    topology: Topology,
    public_url: str,
    op: OidcProvider,
    client: Mapping[str, Any],
    upstream: EchoUpstream,
    keys: list[str],
    *,
    cache_ttl: str = "1s",
) -> Path:
    config = base_config(
        public_url=public_url,
        issuer=op.issuer,
        client=client,
        store=topology.url,
        keys=keys,
        static=workdir / "static",
        upstreams=[{"path": API, "url": upstream.url, "token": "user"}],
        cache_ttl=cache_ttl,
    )
    config["session"]["redis"] = dict(topology.redis)
    return write_config(workdir, config)


async def call(http: aiohttp.ClientSession, base: str, cookie: str) -> tuple[int, str | None, Any]:
    """A proxied GET as the SPA makes it: (status, Retry-After, JSON body)."""
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}", "X-CSRF": "1"}
    async with http.get(f"{base}{API}/items", headers=headers) as resp:
        body = await resp.json(content_type=None)
        return resp.status, resp.headers.get("Retry-After"), body


async def bff_cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bff", *args,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("BFF_")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def wait_status(
    http: aiohttp.ClientSession, base: str, cookie: str, status: int, within: float = 10.0
) -> None:
    deadline = time.monotonic() + within
    while True:
        got, _, body = await call(http, base, cookie)
        if got == status:
            return
        assert time.monotonic() < deadline, f"still {got} {body} after {within} s"
        await asyncio.sleep(0.1)


async def wait_ready(http: aiohttp.ClientSession, base: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        async with http.get(f"{base}/readyz") as resp:
            if resp.status == 200:
                return
            assert time.monotonic() < deadline, f"/readyz still {resp.status} after {within} s"
        await asyncio.sleep(0.2)


async def refresh_grants(op: OidcProvider) -> tuple[int, int]:
    stats = await op.stats()
    return stats["token"]["refresh_token"], stats["token_errors"]["refresh_token"]


async def functional_scenario(topology: Topology, op: OidcProvider, workdir: Path) -> None:
    keys = [os.urandom(32).hex()]
    with EchoUpstream() as upstream:
        cluster = BffCluster(workdir / "bff.yaml", 2)
        client = await op.register_client(
            [f"{url}/bff/callback" for url in cluster.urls],
            backchannel_logout_uri=f"{cluster[0].url}/bff/backchannel-logout",
        )
        config = write_bff_config(workdir, topology, cluster[0].url, op, client, upstream, keys)
        with cluster:
            a, b = cluster.urls
            async with (
                browser_session(*cluster.urls) as browser,
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
            ):
                # Login through the real OP; the browser keeps its OP session for the logout.
                alice = await browser_login(browser, a, "ha-alice")
                bob = await login(b, "ha-bob")

                # Proxied calls on both instances carry the user's token.
                for base in (a, b):
                    for cookie in (alice, bob):
                        status, _, body = await call(http, base, cookie)
                        assert status == 200 and body["bearer"], body

                # Refresh single flight: 20 calls at expiry on two instances, one refresh.
                before = await topology.read_session(keys, alice)
                assert before is not None and before.access_expires_at is not None
                await asyncio.sleep(max(0.0, before.access_expires_at + 0.2 - time.time()))
                await op.reset_stats()
                answers = await asyncio.gather(
                    *(call(http, (a, b)[i % 2], alice) for i in range(20))
                )
                assert {s for s, _, _ in answers} == {200}, answers
                assert await refresh_grants(op) == (1, 0)
                after = await topology.read_session(keys, alice)
                assert after is not None and after.version == before.version + 1
                assert len({body["bearer"] for _, _, body in answers}) == 1

                # bff sessions list / revoke, as an operator runs them.
                code, out = await bff_cli(
                    "sessions", "list", "--config", str(config), "--sub", "ha-bob"
                )
                assert code == 0 and "1 live session(s) of sub 'ha-bob'" in out, out
                code, out = await bff_cli(
                    "sessions", "revoke", "--config", str(config), "--sub", "ha-bob"
                )
                assert code == 0 and "ended 1 session(s)" in out, out
                await wait_status(http, b, bob, 401)
                assert await topology.read_session(keys, bob) is None

                # Back-channel logout by sid: the user signs out at the OP.
                await op.reset_stats()
                end = f"{op.issuer}/session/end?" + urlencode({"client_id": client["client_id"]})
                await op_logout(browser, end)
                stats = await op.stats()
                assert stats["backchannel_logouts_sent"] == 1, stats
                assert stats["backchannel_logout_errors"] == 0, stats
                await wait_status(http, a, alice, 401)
                await wait_status(http, b, alice, 401)
                assert await topology.read_session(keys, alice) is None

        # Back-channel logout by sub: a client whose logout tokens name only the user.
        await subject_logout_scenario(topology, op, workdir / "by-sub", upstream)


async def subject_logout_scenario(
    topology: Topology, op: OidcProvider, workdir: Path, upstream: EchoUpstream
) -> None:
    keys = [os.urandom(32).hex()]
    proc = BffProcess(workdir / "bff.yaml")
    client = await op.register_client(
        [f"{proc.url}/bff/callback"],
        backchannel_logout_uri=f"{proc.url}/bff/backchannel-logout",
        backchannel_logout_session_required=False,
    )
    write_bff_config(workdir, topology, proc.url, op, client, upstream, keys)
    with proc:
        async with (
            browser_session(proc.url) as browser,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        ):
            laptop = await browser_login(browser, proc.url, "ha-carol")
            phone = await login(proc.url, "ha-carol")  # another user agent, another OP session
            for cookie in (laptop, phone):
                assert (await call(http, proc.url, cookie))[0] == 200
            await op.reset_stats()
            end = f"{op.issuer}/session/end?" + urlencode({"client_id": client["client_id"]})
            await op_logout(browser, end)
            assert (await op.stats())["backchannel_logouts_sent"] == 1
            # The token names the user only: every session of the user ends, on any OP session.
            await wait_status(http, proc.url, laptop, 401)
            await wait_status(http, proc.url, phone, 401)
            assert await topology.read_session(keys, phone) is None


async def browser_login(browser: aiohttp.ClientSession, bff_url: str, username: str) -> str:
    """Log in through ``bff_url`` with ``browser``, which keeps its OP session; the cookie."""
    async with browser.get(f"{bff_url}/bff/login", allow_redirects=False) as resp:
        assert resp.status == 302
        authorize = resp.headers["Location"]
    callback = await op_login(browser, authorize, username)
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 200, await resp.text()
    morsel = browser.cookie_jar.filter_cookies(URL(bff_url)).get(COOKIE_NAME)
    assert morsel is not None and morsel.value
    return morsel.value


# -------------------------------------------------------------------------------------------------
# Failover under load


@dataclass(slots=True)
class Answer:
    at: float  # monotonic
    user: int
    status: int
    retry_after: str | None
    error: str | None


@dataclass(slots=True)
class Load:
    answers: list[Answer] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(
        self, http: aiohttp.ClientSession, n: int, urls: list[str], cookies: list[str]
    ) -> None:
        for i in range(5000):  # bounded in count; the scenario also bounds it in time
            if self.stop.is_set():
                return
            user = (n + i) % len(cookies)
            try:
                status, retry, body = await call(http, urls[i % len(urls)], cookies[user])
                error = body.get("error") if isinstance(body, dict) else None
            except aiohttp.ClientError as exc:
                status, retry, error = 0, None, type(exc).__name__
            self.answers.append(Answer(time.monotonic(), user, status, retry, error))
            await asyncio.sleep(0.01)


def served_after(answers: list[Answer], since: float) -> set[int]:
    return {a.user for a in answers if a.at > since and a.status == 200}


async def failover_scenario(
    topology: Topology,
    op: OidcProvider,
    workdir: Path,
    *,
    users: int,
    wait_replicated: Callable[[], None],
    kill_master: Callable[[list[str]], object],
    wait_failover: Callable[[object], object],
    label: str,
) -> None:
    """``kill_master(session_keys)`` kills a master and returns it; ``wait_failover(it)``."""
    keys = [os.urandom(32).hex()]
    with EchoUpstream() as upstream:
        cluster = BffCluster(workdir / "bff.yaml", 2)
        client = await op.register_client([f"{url}/bff/callback" for url in cluster.urls])
        # No session cache: every call reads the store, so every call sees the failover.
        write_bff_config(
            workdir, topology, cluster[0].url, op, client, upstream, keys, cache_ttl="0s"
        )
        with cluster:
            urls = cluster.urls
            cookies = list(await asyncio.gather(*(login(urls[0], f"ha-{i}") for i in range(users))))
            ids = [store_id(SessionSecret(Keyring(keys).unsign(c) or "")) for c in cookies]
            async with aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=10)
            ) as http:
                for cookie in cookies:
                    assert (await call(http, urls[1], cookie))[0] == 200
                # Only what Redis' own replication kept can survive: wait until it has.
                await asyncio.to_thread(wait_replicated)

                load = Load()
                workers = [
                    asyncio.create_task(load.worker(http, n, urls, cookies)) for n in range(4)
                ]
                try:
                    await asyncio.sleep(1.0)
                    killed_at = time.monotonic()
                    dead = await asyncio.to_thread(kill_master, [session_key(i) for i in ids])
                    await asyncio.wait_for(asyncio.to_thread(wait_failover, dead), 90)
                    promoted_at = time.monotonic()
                    # Then every user must be served again, by itself, within a bound, and
                    # keep being served: a 200 for each a while after the promotion.
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        if served_after(load.answers, promoted_at + 1.0) == set(range(users)):
                            break
                        await asyncio.sleep(0.2)
                finally:
                    load.stop.set()
                    await asyncio.gather(*workers)

                answers = load.answers
                bad = [a for a in answers if a.status not in (200, 503)]
                assert not bad, f"answers other than 200/503 during failover: {bad[:5]}"
                no_retry = [a for a in answers if a.status == 503 and not a.retry_after]
                assert not no_retry, f"503 without Retry-After: {no_retry[:5]}"
                served = served_after(answers, promoted_at + 1.0)
                assert served == set(range(users)), "service did not resume for every user"
                # Every instance is ready again (a load balancer would send it traffic).
                for url in urls:
                    await wait_ready(http, url)
                # No session written (and replicated) before the kill is lost.
                for cookie in cookies:
                    status, _, body = await call(http, urls[0], cookie)
                    assert status == 200, (status, body)
                for cookie in cookies:
                    assert await topology.read_session(keys, cookie) is not None
                # The promoted master runs bff's Lua scripts (loaded again behind NOSCRIPT if
                # need be): a lock on the first user's shard, then a whole new login (rate-limit
                # bucket, login transaction, session and its indexes).
                store = open_store(topology.url, timeout=5.0, redis=topology.settings())
                try:
                    lock = lock_key(ids[0])
                    assert await store.acquire_lock(lock, "me", 5)
                    assert await store.renew_lock(lock, "me", 5)
                    await store.release_lock(lock, "me")
                    assert await store.acquire_lock(lock, "you", 5)
                    await store.release_lock(lock, "you")
                finally:
                    await store.close()
                newcomer = await login(urls[1], "ha-after-failover")
                assert (await call(http, urls[0], newcomer))[0] == 200

                failed = [a for a in answers if a.status != 200]
                window = (failed[-1].at - failed[0].at) if failed else 0.0
                healed = next((a.at for a in answers if failed and a.at > failed[-1].at), killed_at)
                print(
                    f"\n[{label}] {len(answers)} calls, {len(failed)} answered 503 "
                    f"({sorted({a.error for a in failed if a.error})}); 503 window {window:.2f} s;"
                    f" promotion seen {promoted_at - killed_at:.2f} s after the kill;"
                    f" every call 200 again from {healed - killed_at:.2f} s after the kill"
                )
