"""`session.store_timeout` and `session.redis`: how long a store call may take, and how bff
authenticates to Redis (ACL user and password, Sentinel auth, TLS files).

Where the nodes are stays in `session.store`'s URL; this block holds what a URL is a poor place
for (secrets from `${VAR}`, file paths). Everything is checked against that URL here, so that a
TLS file with a plain `redis://`, or a password in two places, fails at start-up, not on the
first login.
"""

from __future__ import annotations

from typing import Any, Final

from bff.config.checks import Reader, readable_file_problem
from bff.config.problems import Key
from bff.config.settings import RedisSettings, RedisTls, Secret
from bff.store.url import StoreUrl, StoreUrlError, parse_store_url

MAX_STORE_TIMEOUT: Final = 30.0


def build_store_timeout(r: Reader, d: dict[str, Any], p: Key) -> float:
    timeout = r.positive(d, p, "store_timeout", 0.5)
    tp = (*p, "store_timeout")
    if timeout > MAX_STORE_TIMEOUT and r.ctx.ok(tp):
        r.ctx.report(tp, "must be at most 30s: every request waits this long on a hung Redis")
    return timeout


def build_redis(r: Reader, d: dict[str, Any], p: Key, store: str) -> RedisSettings:
    """The `redis` block of `session` (at path `p`), checked against the `store` URL."""
    rp: Key = (*p, "redis")
    raw = r.get(d, p, "redis", {})
    if not isinstance(raw, dict):
        return RedisSettings()
    try:
        url: StoreUrl | None = parse_store_url(store)
    except StoreUrlError:
        url = None  # reported with session.store already
    if raw and url is not None and url.kind == "memory":
        r.ctx.report(rp, "is only used with a Redis store (session.store is memory://)")

    def secret(key: str) -> Secret | None:
        value = r.get(raw, rp, key, None)
        return Secret(value) if isinstance(value, str) else None

    username = r.get(raw, rp, "username", None)
    password = secret("password")
    if url is not None and password is not None and url.password is not None:
        r.ctx.report((*rp, "password"), "the store URL has a password too: set it in one place")
    if url is not None and username is not None and url.username is not None:
        r.ctx.report((*rp, "username"), "the store URL has a user too: set it in one place")
    sentinel_username = r.get(raw, rp, "sentinel_username", None)
    sentinel_password = secret("sentinel_password")
    # Redis authenticates a user only with a password (AUTH user password): without one, the
    # client would silently connect as `default`.
    url_password = url is not None and url.password is not None
    if username is not None and password is None and not url_password:
        r.ctx.report((*rp, "username"), "needs a password (session.redis.password)")
    if sentinel_username is not None and sentinel_password is None:
        r.ctx.report((*rp, "sentinel_username"), "needs session.redis.sentinel_password")
    if url is not None and url.kind != "sentinel":
        for key in ("sentinel_username", "sentinel_password"):
            if raw.get(key) is not None and r.ctx.ok((*rp, key)):
                r.ctx.report((*rp, key), "is only used with redis+sentinel:// (or rediss+...)")
    return RedisSettings(
        username=username,
        password=password,
        sentinel_username=sentinel_username,
        sentinel_password=sentinel_password,
        tls=_tls(r, raw, rp, url),
    )


def _tls(r: Reader, d: dict[str, Any], p: Key, url: StoreUrl | None) -> RedisTls:
    tp: Key = (*p, "tls")
    raw = r.get(d, p, "tls", {})
    if not isinstance(raw, dict) or not raw:
        return RedisTls()
    if url is not None and url.kind != "memory" and not url.tls:
        r.ctx.report(
            tp, "needs a TLS store URL: rediss://, rediss+sentinel:// or rediss+cluster://"
        )
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        value = r.get(raw, tp, key, None)
        if not isinstance(value, str):
            continue
        path = r.local_path(value)
        problem = readable_file_problem(path)
        if problem:
            r.ctx.report((*tp, key), f"{problem}: {path}")
        files[key] = path
    if ("cert_file" in files) != ("key_file" in files):
        r.ctx.report(tp, "cert_file and key_file go together (a client certificate and its key)")
    return RedisTls(
        ca_file=files.get("ca_file"),
        cert_file=files.get("cert_file"),
        key_file=files.get("key_file"),
        check_hostname=r.get(raw, tp, "check_hostname", True),
    )
