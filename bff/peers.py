"""Who is on the other end of a request: the client address, after ``trusted_proxies``.

Rate limits and logs key on :func:`client_address`; nothing else may read ``X-Forwarded-For`` or
``Forwarded`` from a request, and the proxy sends upstream only what :meth:`Peers.forwarding`
builds.

The rules:

* The TCP peer is the client unless its address is in ``trusted_proxies`` (default: empty, so by
  default no header from the browser can say who it is).
* From a trusted peer, its chain of addresses is read from ``X-Forwarded-For`` (all lines, in
  order) or, only when no ``X-Forwarded-For`` came, from ``Forwarded`` (RFC 7239 ``for=``).
  ``X-Forwarded-For`` wins because it is what nearly every proxy and load balancer writes
  (nginx, HAProxy, Envoy, Traefik, AWS, GCP, Azure, Cloudflare, Fastly), and those pass a
  browser's own ``Forwarded`` through untouched; a proxy that writes only ``Forwarded`` must drop
  the browser's ``X-Forwarded-For``.
* Rightmost-untrusted: walking the chain from the peer leftwards, the first address that is not
  a trusted proxy is the client; everything left of it was written by the client and is ignored.
  When every address is trusted, the leftmost is the client.
* Anything but an IP address where the walk needs one (garbage, ``for=unknown``, an obfuscated
  ``_identifier``, a Forwarded element without ``for``, an IPv6 zone id such as ``fe80::1%eth0``,
  more than :data:`MAX_HOPS` trusted hops) makes the peer the client: a trusted proxy that says
  "I don't know" is believed, not guessed around, and never costs a 500. A zone id names an
  interface of the host that wrote it, means nothing here, and Python's ``ipaddress`` keeps any
  text after the ``%``: so an element with one is malformed, not trimmed.
* Upstream, bff sends ``X-Forwarded-For`` and ``Forwarded`` with the chain from the client to the
  peer (what a client wrote left of itself is not passed on), and ``X-Forwarded-Proto`` /
  ``X-Forwarded-Host`` (also ``proto``/``host`` in ``Forwarded``) from ``public_url`` always, even
  behind a trusted proxy: bff knows its public origin for certain, and many proxies pass a
  browser's ``X-Forwarded-Host`` through, which upstream frameworks use to build links. Every
  address in them is the canonical text of a parsed ``ipaddress`` object without a zone id (or
  ``unknown``): no text a client wrote reaches them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final, TypeAlias, TypeVar
from urllib.parse import urlsplit

from aiohttp import web

__all__ = ["MAX_HOPS", "PEERS", "Peers", "client_address", "parse_node"]

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_K = TypeVar("_K")
_V = TypeVar("_V")

#: A chain with more trusted hops than this is not believed (the peer is the client).
MAX_HOPS: Final = 32
_MEMO_MAX: Final = 4096  # chains whose forwarding headers are kept ready (and peers, walks)
#: Hops longer than this in all (characters) are walked anew each time, never kept.
_WALK_KEY_MAX: Final = 512
#: The request's chain when its hops are too long to keep, worked out at most once per request.
_CHAIN: Final = web.RequestKey("bff_peer_chain", tuple[str, ...])
_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def parse_node(text: str) -> Address | None:
    """An address from one ``X-Forwarded-For`` entry or ``for=`` value; None if it is none.

    Takes ``192.0.2.1``, ``192.0.2.1:8080``, ``2001:db8::1``, ``[2001:db8::1]`` and
    ``[2001:db8::1]:443``; an IPv4-mapped IPv6 address is its IPv4 address. ``unknown``,
    ``_obfuscated`` names, IPv6 zone ids (``fe80::1%eth0``) and anything else give None.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        if ":" not in host:
            return None  # brackets are for IPv6 only
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
    else:
        host = text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def _canonical(text: str) -> str | None:
    """The canonical text of an address from the chain, without a zone id; None if none.

    The chain holds parsed addresses, except the TCP peer's own text when no proxy is trusted
    or it does not parse (a Unix socket); a link-local peer's zone id comes from the socket."""
    address = parse_node(text.partition("%")[0])
    return None if address is None else str(address)


def _forwarded_value(value: str) -> str:
    """A Forwarded parameter value: a token as it is, anything else quoted (RFC 7239 4)."""
    if value and all(c in _TOKEN_CHARS for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _for_value(address: str | None) -> str:
    if address is None:
        return "unknown"
    return f'"[{address}]"' if ":" in address else address


class Peers:
    """The trusted networks and the public origin, built once at start-up (see ``app.py``)."""

    __slots__ = (
        "_host",
        "_memo",
        "_networks",
        "_peer_memo",
        "_peers",
        "_proto",
        "_suffix",
        "_walks",
    )

    def __init__(self, trusted_proxies: Iterable[str], public_url: str) -> None:
        self._networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n) for n in trusted_proxies
        )
        parts = urlsplit(public_url)
        self._proto = parts.scheme
        self._host = parts.netloc
        self._suffix = f";host={_forwarded_value(self._host)};proto={self._proto}"
        self._memo: dict[tuple[str, ...], tuple[tuple[str, str], ...]] = {}
        self._peer_memo: dict[str, bool] = {}
        # The TCP peer's text -> (its chain when it is the client, whether it is trusted).
        self._peers: dict[str, tuple[tuple[str, ...], bool]] = {}
        # (trusted peer, *hops it sent) -> the chain: a proxy's few clients send the same ones.
        self._walks: dict[tuple[str, ...], tuple[str, ...]] = {}

    def trusted(self, address: Address) -> bool:
        return any(address in network for network in self._networks)

    def peer_trusted(self, request: web.Request) -> bool:
        """Whether the TCP peer itself is a trusted proxy (what an edge's auth call needs).

        An edge asks on every API call from a handful of addresses: the answer is kept per
        address (bounded), since parsing one costs more than the rest of the check.
        """
        if not self._networks:
            return False
        peer = request.remote or ""
        known = self._peer_memo.get(peer)
        if known is None:
            address = parse_node(peer)
            known = address is not None and self.trusted(address)
            if len(self._peer_memo) >= _MEMO_MAX:
                self._peer_memo.pop(next(iter(self._peer_memo)))
            self._peer_memo[peer] = known
        return known

    def chain(self, request: web.Request) -> tuple[str, ...]:
        """The addresses from the client (first) to the TCP peer (last).

        Worked out from parsed addresses, and asked on every proxied call: so what a peer's
        text parses to is kept per peer, and the walk per (peer, hops) when the hops are short
        (both bounded, first in first out). Neither depends on anything but its key."""
        peer = request.remote or ""
        if not self._networks:
            return (peer,)
        known = self._peers.get(peer)
        if known is None:
            known = self._peer(peer)
        own, trusted = known
        if not trusted:
            return own
        hops = self._hops(request)
        if not hops:
            return own
        # Too long to keep (in characters, or in hops: empty ones cost nothing in characters but
        # a tuple slot each): walked once per request, never remembered.
        if len(hops) > MAX_HOPS + 1 or sum(map(len, hops)) > _WALK_KEY_MAX:
            cached = request.get(_CHAIN)
            if cached is None:
                cached = request[_CHAIN] = self._walk(own[0], hops)
            return cached
        key = (own[0], *hops)
        found = self._walks.get(key)
        if found is None:
            found = self._walk(own[0], hops)
            _remember(self._walks, key, found)
        return found

    def _peer(self, peer: str) -> tuple[tuple[str, ...], bool]:
        """The TCP peer's own chain (itself, canonical) and whether it is a trusted proxy."""
        # The socket's zone id (a link-local peer) is not client text, and is not ours to judge.
        address = parse_node(peer.partition("%")[0])
        known = ((peer,), False) if address is None else ((str(address),), self.trusted(address))
        _remember(self._peers, peer, known)
        return known

    def _walk(self, peer: str, hops: list[str]) -> tuple[str, ...]:
        """Rightmost-untrusted, from the trusted ``peer`` (canonical text) leftwards."""
        found = [peer]
        for text in reversed(hops):
            address = parse_node(text)
            if address is None or len(found) > MAX_HOPS:
                return (peer,)
            found.append(str(address))
            if not self.trusted(address):
                break
        found.reverse()
        return tuple(found)

    @staticmethod
    def _hops(request: web.Request) -> list[str]:
        """The chain the trusted peer sent: X-Forwarded-For, else Forwarded's ``for=``."""
        lines = request.headers.getall("X-Forwarded-For", ())
        if lines:
            return [hop for line in lines for hop in line.split(",")]
        if "Forwarded" not in request.headers:
            return []
        # aiohttp's RFC 7239 parser; an element without `for` reads as garbage (None above).
        return [element.get("for", "") for element in request.forwarded]

    def client_address(self, request: web.Request) -> str:
        """The client's IP address as text (the TCP peer unless it is a trusted proxy)."""
        return self.chain(request)[0]

    def forwarding(self, request: web.Request) -> tuple[tuple[str, str], ...]:
        """``X-Forwarded-For``/``-Proto``/``-Host`` and ``Forwarded`` for the upstream."""
        chain = self.chain(request)
        known = self._memo.get(chain)
        if known is not None:
            return known
        addresses = [_canonical(a) for a in chain]
        elements = [f"for={_for_value(a)}" for a in addresses]
        elements[0] += self._suffix
        out: tuple[tuple[str, str], ...] = (
            ("X-Forwarded-Proto", self._proto),
            ("X-Forwarded-Host", self._host),
            ("Forwarded", ", ".join(elements)),
        )
        if None not in addresses:
            out += (("X-Forwarded-For", ", ".join(a for a in addresses if a is not None)),)
        # Few distinct chains are busy at once (a client's, or a handful of proxies'): bounded.
        if len(self._memo) >= _MEMO_MAX:
            self._memo.pop(next(iter(self._memo)))
        self._memo[chain] = out
        return out


def _remember(memo: dict[_K, _V], key: _K, value: _V) -> None:
    """``memo[key] = value``, dropping the oldest entry once it holds :data:`_MEMO_MAX`."""
    if len(memo) >= _MEMO_MAX:
        memo.pop(next(iter(memo)))
    memo[key] = value


#: The app's :class:`Peers`, set by ``create_app``.
PEERS: Final = web.AppKey("bff_peers", Peers)


def client_address(request: web.Request) -> str:
    """The client's IP address as text (the TCP peer until ``trusted_proxies`` says otherwise)."""
    peers = request.app.get(PEERS)
    if peers is None:
        return request.remote or ""
    return peers.client_address(request)
