"""What a ``session.store`` URL names: one Redis, a Sentinel-managed master or a Cluster.

redis-py parses ``redis://``, ``rediss://`` and ``unix://`` itself; the two topologies it has no
URL for are spelled here, with a comma-separated node list in place of one host:

* ``redis+sentinel://[user[:password]@]host:port[,host:port...]/<master name>[/<db>]``
  (sentinels, default port 26379; the user and password are the master's, as with ``redis://``)
* ``redis+cluster://[user[:password]@]host:port[,host:port...][/0]``
  (seed nodes, default port 6379; the client discovers the rest)

A ``rediss+`` scheme speaks TLS to every node. Parsing is pure so that ``bff check-config``
reports a bad URL without touching the network; messages never echo the URL (it may hold a
password).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

__all__ = ["StoreUrl", "StoreUrlError", "parse_store_url"]

Kind = Literal["memory", "redis", "sentinel", "cluster"]

_SINGLE = {"redis": False, "rediss": True, "unix": False}
_MULTI: dict[str, tuple[Kind, bool, int]] = {
    "redis+sentinel": ("sentinel", False, 26379),
    "rediss+sentinel": ("sentinel", True, 26379),
    "redis+cluster": ("cluster", False, 6379),
    "rediss+cluster": ("cluster", True, 6379),
}
EXPECTED = (
    "expected memory://, redis://host:port/db, rediss://host:port/db, unix:///path, "
    "redis+sentinel://host:port,host:port/master or redis+cluster://host:port,host:port"
)


class StoreUrlError(ValueError):
    """The URL is not one bff can open; the message never contains the URL."""


@dataclass(frozen=True, slots=True)
class StoreUrl:
    kind: Kind
    tls: bool  # every connection (to data nodes and sentinels) uses TLS
    url: str = field(repr=False)  # as given: redis-py parses redis://, rediss://, unix:// itself
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels, or cluster seed nodes
    master: str = ""  # the Sentinel service (master) name
    db: int = 0
    username: str | None = None  # the data nodes' ACL user from the URL, if any
    password: str | None = field(default=None, repr=False)  # ...and its password


def parse_store_url(url: str) -> StoreUrl:
    if url == "memory://":
        return StoreUrl("memory", False, url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StoreUrlError(EXPECTED)
    scheme = scheme.lower()
    if scheme in _SINGLE:
        return _single(scheme, url)
    if scheme not in _MULTI:
        raise StoreUrlError(EXPECTED)
    kind, tls, default_port = _MULTI[scheme]
    netloc, _, path = rest.partition("/")
    if "?" in path or "#" in path or "?" in netloc or "#" in netloc:
        raise StoreUrlError(f"{scheme}:// takes no query or fragment")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_node(h, default_port) for h in hosts.split(","))
    segments = [s for s in path.split("/") if s]
    if kind == "sentinel":
        if not segments or len(segments) > 2:
            raise StoreUrlError("redis+sentinel:// needs the master name as its path: .../mymaster")
        master, db = unquote(segments[0]), _db(segments[1:])
    else:
        master, db = "", _db(segments)
        if db != 0:
            raise StoreUrlError("a Redis Cluster has only database 0")
    return StoreUrl(kind, tls, url, nodes, master, db, username, password)


def _single(scheme: str, url: str) -> StoreUrl:
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise StoreUrlError(EXPECTED) from None
    if scheme == "unix" and not parts.path:
        raise StoreUrlError(EXPECTED)
    if scheme != "unix" and not parts.hostname:
        raise StoreUrlError(EXPECTED)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return StoreUrl("redis", _SINGLE[scheme], url, username=username, password=password)


def _node(hostport: str, default_port: int) -> tuple[str, int]:
    try:
        parts = urlsplit(f"//{hostport}")
        port = parts.port
    except ValueError:
        raise StoreUrlError("a node is not host:port") from None
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise StoreUrlError("a node is not host:port")
    return parts.hostname, port if port is not None else default_port


def _db(segments: list[str]) -> int:
    if not segments:
        return 0
    if len(segments) > 1 or not segments[0].isdigit():
        raise StoreUrlError("the database must be a number: .../0")
    return int(segments[0])
