"""bff.peers: the client address after ``trusted_proxies``, and what the upstream is told."""

from __future__ import annotations

import ipaddress
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from bff.peers import MAX_HOPS, PEERS, Peers, client_address, parse_node

PUBLIC = "https://app.example.com"


def request(peer: str | None, headers: list[tuple[str, str]] | None = None, app: Any = None) -> Any:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 50000) if name == "peername" and peer is not None else default
    )
    return make_mocked_request(
        "GET", "/api/x", headers=CIMultiDict(headers or []), transport=transport, app=app
    )


# -- one address -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("192.0.2.1:8080", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),  # what a dual-stack socket reports for IPv4
        ("[::ffff:192.0.2.1]:1", "192.0.2.1"),
    ],
)
def test_an_address_is_read_in_every_spelling_proxies_use(text: str, address: str) -> None:
    assert str(parse_node(text)) == address


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unknown",  # RFC 7239 6.2
        "_hidden",  # RFC 7239 6.3 obfuscated identifier
        "_SEVKISEK",
        "garbage",
        "192.0.2",
        "192.0.2.1.5",
        "256.0.0.1",
        "192.0.2.1:",
        "192.0.2.1:port",
        "[192.0.2.1]",  # brackets are for IPv6 only
        "[2001:db8::1",
        "[2001:db8::1]x",
        "[2001:db8::1]:",
        "2001:db8::1]",
        "1.2.3.4, 5.6.7.8",
        "\x00",
        "é",
        "fe80::1%eth0",  # an IPv6 zone id names the writer's interface
        "[fe80::1%eth0]:443",
        'fe80::1%x"];for=1.1.1.1;proto=https;host=evil.example;x="',
    ],
)
def test_anything_but_an_address_is_none(text: str) -> None:
    assert parse_node(text) is None


# -- the chain -------------------------------------------------------------------------------------

TRUSTED = Peers(["10.0.0.0/8", "2001:db8:ffff::/48"], PUBLIC)


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_headers_say() -> None:
    peers = Peers((), PUBLIC)
    req = request("203.0.113.9", [("X-Forwarded-For", "1.1.1.1"), ("Forwarded", "for=2.2.2.2")])
    assert peers.client_address(req) == "203.0.113.9"
    assert peers.chain(req) == ("203.0.113.9",)


def test_an_untrusted_peer_is_the_client_even_when_others_are_trusted() -> None:
    req = request("203.0.113.9", [("X-Forwarded-For", "10.0.0.1"), ("X-Real-IP", "10.0.0.2")])
    assert TRUSTED.client_address(req) == "203.0.113.9"


def test_the_rightmost_untrusted_address_is_the_client() -> None:
    # The client wrote "6.6.6.6, 10.9.9.9" itself; the trusted proxies appended the rest.
    req = request("10.0.0.1", [("X-Forwarded-For", "6.6.6.6, 10.9.9.9, 198.51.100.7, 10.0.0.2")])
    assert TRUSTED.client_address(req) == "198.51.100.7"
    assert TRUSTED.chain(req) == ("198.51.100.7", "10.0.0.2", "10.0.0.1")


def test_several_x_forwarded_for_lines_are_one_list_in_order() -> None:
    headers = [("X-Forwarded-For", "6.6.6.6, 198.51.100.7"), ("X-Forwarded-For", "10.0.0.2")]
    req = request("10.0.0.1", headers)
    assert TRUSTED.chain(req) == ("198.51.100.7", "10.0.0.2", "10.0.0.1")


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    req = request("10.0.0.1", [("X-Forwarded-For", "10.1.1.1, 10.2.2.2")])
    assert TRUSTED.client_address(req) == "10.1.1.1"


def test_a_trusted_peer_without_forwarding_headers_is_the_client() -> None:
    assert TRUSTED.client_address(request("10.0.0.1")) == "10.0.0.1"


def test_ipv6_hops_with_brackets_and_ports() -> None:
    req = request(
        "2001:db8:ffff::1",
        [("X-Forwarded-For", "[2001:db8:1::7]:51000, [2001:db8:ffff::2]:443")],
    )
    assert TRUSTED.chain(req) == ("2001:db8:1::7", "2001:db8:ffff::2", "2001:db8:ffff::1")


def test_an_ipv4_peer_seen_through_a_dual_stack_socket_is_still_trusted() -> None:
    req = request("::ffff:10.0.0.1", [("X-Forwarded-For", "198.51.100.7")])
    assert TRUSTED.chain(req) == ("198.51.100.7", "10.0.0.1")


@pytest.mark.parametrize(
    "value",
    [
        "unknown",
        "_hidden",
        "garbage",
        "198.51.100.7, , 10.0.0.2",
        "198.51.100.7, unknown",
        "198.51.100.7,10.0.0.2:x",
        "",
        ",",
        "\t",
    ],
)
def test_a_trusted_proxy_that_sends_no_address_where_one_is_needed_leaves_the_peer(
    value: str,
) -> None:
    req = request("10.0.0.1", [("X-Forwarded-For", value)])
    assert TRUSTED.chain(req) == ("10.0.0.1",)


def test_garbage_left_of_the_client_is_the_clients_own_and_ignored() -> None:
    req = request("10.0.0.1", [("X-Forwarded-For", "unknown, _x, <script>, 198.51.100.7")])
    assert TRUSTED.client_address(req) == "198.51.100.7"


def test_too_many_trusted_hops_leave_the_peer() -> None:
    hops = ", ".join(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(MAX_HOPS + 5))
    req = request("10.0.0.1", [("X-Forwarded-For", "198.51.100.7, " + hops)])
    assert TRUSTED.chain(req) == ("10.0.0.1",)
    ok = ", ".join(f"10.0.0.{i + 1}" for i in range(MAX_HOPS - 1))
    assert TRUSTED.client_address(request("10.0.0.1", [("X-Forwarded-For", ok)])) == "10.0.0.1"
    req = request("10.0.0.1", [("X-Forwarded-For", "198.51.100.7, " + ok)])
    assert TRUSTED.client_address(req) == "198.51.100.7"


def test_forwarded_is_read_when_no_x_forwarded_for_came() -> None:
    value = 'for=6.6.6.6, for=198.51.100.7;proto=https, for="[2001:db8:ffff::2]:80";by=_lb'
    req = request("10.0.0.1", [("Forwarded", value)])
    assert TRUSTED.chain(req) == ("198.51.100.7", "2001:db8:ffff::2", "10.0.0.1")


def test_x_forwarded_for_wins_over_forwarded() -> None:
    headers = [("Forwarded", "for=6.6.6.6"), ("X-Forwarded-For", "198.51.100.7")]
    assert TRUSTED.client_address(request("10.0.0.1", headers)) == "198.51.100.7"


@pytest.mark.parametrize(
    "value",
    [
        "for=unknown",
        "for=_hidden",
        "proto=https",  # an element without `for`
        "for=198.51.100.7, by=10.0.0.2",
        "for=",
        'for="198.51.100.7',
        ";;;,,,",
        "for=[2001:db8::1]",  # unquoted brackets are not RFC 7239 syntax
    ],
)
def test_a_forwarded_header_without_a_usable_for_leaves_the_peer(value: str) -> None:
    assert TRUSTED.chain(request("10.0.0.1", [("Forwarded", value)])) == ("10.0.0.1",)


def test_the_chain_is_worked_out_once_per_request() -> None:
    req = request("10.0.0.1", [("X-Forwarded-For", "198.51.100.7")])
    first = TRUSTED.chain(req)
    with mock.patch("bff.peers.parse_node", side_effect=AssertionError("parsed again")):
        assert TRUSTED.chain(req) is first


def test_a_request_without_a_peer_address_has_an_empty_client() -> None:
    assert TRUSTED.client_address(request(None, [("X-Forwarded-For", "1.2.3.4")])) == ""
    assert Peers((), PUBLIC).client_address(request(None)) == ""


def test_client_address_uses_the_apps_peers() -> None:
    app = web.Application()
    app[PEERS] = Peers(["127.0.0.1/32"], PUBLIC)
    req = request("127.0.0.1", [("X-Forwarded-For", "198.51.100.7")], app=app)
    assert client_address(req) == "198.51.100.7"


# -- what the upstream is told ---------------------------------------------------------------------


def test_from_an_untrusted_peer_the_upstream_hears_bffs_own_view() -> None:
    peers = Peers((), "https://app.example.com:8443")
    req = request("203.0.113.9", [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-Host", "evil")])
    assert dict(peers.forwarding(req)) == {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "app.example.com:8443",
        "Forwarded": 'for=203.0.113.9;host="app.example.com:8443";proto=https',
    }


def test_from_a_trusted_peer_the_upstream_hears_the_chain_from_the_client() -> None:
    headers = [
        ("X-Forwarded-For", "6.6.6.6, 2001:db8:1::7, 10.0.0.2"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "evil.example"),
    ]
    sent = dict(TRUSTED.forwarding(request("10.0.0.1", headers)))
    assert sent == {
        "X-Forwarded-For": "2001:db8:1::7, 10.0.0.2, 10.0.0.1",
        # From public_url, whatever a proxy passed on: bff knows its own origin.
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "app.example.com",
        "Forwarded": (
            'for="[2001:db8:1::7]";host=app.example.com;proto=https, for=10.0.0.2, for=10.0.0.1'
        ),
    }


@pytest.mark.parametrize("name", ["X-Forwarded-For", "Forwarded"])
def test_a_zone_id_from_a_trusted_proxy_is_malformed_and_injects_nothing(name: str) -> None:
    """The review's payload (issue 9 finding 9a): ``ipaddress`` keeps any text after ``%``, which
    went into the upstream's ``Forwarded`` unescaped and added elements of the client's choice."""
    payload = 'fe80::1%x"];for=1.1.1.1;proto=https;host=evil.example;x="'
    # In Forwarded the zone id runs to the "]" (quoted-pair escapes for the quotes).
    quoted = payload.replace("]", "").replace('"', '\\"')
    value = payload if name == "X-Forwarded-For" else f'for="[{quoted}]"'
    req = request("10.0.0.1", [(name, value)])
    assert TRUSTED.client_address(req) == "10.0.0.1"  # malformed: the peer is the client
    sent = dict(TRUSTED.forwarding(req))
    assert sent["Forwarded"] == "for=10.0.0.1;host=app.example.com;proto=https"
    assert sent["X-Forwarded-For"] == "10.0.0.1"


def test_forwarding_headers_hold_only_canonical_addresses() -> None:
    """Whatever the chain holds (the raw peer text of a link-local socket, a dual-stack one),
    what goes upstream is a parsed address's canonical text, zone id dropped."""
    sent = dict(Peers((), PUBLIC).forwarding(request('fe80::1%eth0"];for=x')))
    assert sent["Forwarded"] == 'for="[fe80::1]";host=app.example.com;proto=https'
    assert sent["X-Forwarded-For"] == "fe80::1"
    sent = dict(Peers((), PUBLIC).forwarding(request("::ffff:203.0.113.9")))
    assert sent["X-Forwarded-For"] == "203.0.113.9"
    sent = dict(TRUSTED.forwarding(request("fe80::2%eth1")))  # a link-local peer, untrusted
    assert sent["X-Forwarded-For"] == "fe80::2"


def test_without_a_peer_address_forwarded_says_unknown() -> None:
    sent = dict(Peers((), PUBLIC).forwarding(request(None)))
    assert "X-Forwarded-For" not in sent
    assert sent["Forwarded"] == "for=unknown;host=app.example.com;proto=https"


def test_trusted_networks_hold_their_whole_range() -> None:
    peers = Peers(["192.0.2.0/24"], PUBLIC)
    assert peers.trusted(ipaddress.ip_address("192.0.2.255"))
    assert not peers.trusted(ipaddress.ip_address("192.0.3.0"))


def test_an_untrusted_dual_stack_peer_is_named_by_its_ipv4_address() -> None:
    assert TRUSTED.client_address(request("::ffff:203.0.113.9")) == "203.0.113.9"


# -- whether the peer itself is trusted (edge mode's /bff/authz) ----------------------------------


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.0.0.1", True),
        ("::ffff:10.0.0.1", True),
        ("2001:db8:ffff::1", True),
        ("198.51.100.7", False),
        ("garbage", False),
        (None, False),
    ],
)
def test_peer_trusted_asks_only_about_the_tcp_peer(peer: str | None, trusted: bool) -> None:
    peers = Peers(["10.0.0.0/8", "2001:db8:ffff::/48"], PUBLIC)
    # A client's own forwarding headers make no peer trusted.
    assert peers.peer_trusted(request(peer, [("X-Forwarded-For", "10.0.0.2")])) is trusted


def test_without_trusted_proxies_no_peer_is_trusted() -> None:
    assert Peers((), PUBLIC).peer_trusted(request("127.0.0.1")) is False


def test_peer_trusted_parses_an_address_once() -> None:
    peers = Peers(["10.0.0.0/8"], PUBLIC)
    assert peers.peer_trusted(request("10.0.0.1")) is True
    with mock.patch("bff.peers.parse_node", side_effect=AssertionError("parsed again")):
        assert peers.peer_trusted(request("10.0.0.1")) is True
    assert peers.peer_trusted(request("10.0.0.9")) is True


# -- what is kept between requests (bounded, never another key's answer) ---------------------------


def test_the_chain_kept_for_one_peer_is_never_another_peers() -> None:
    peers = Peers(["10.0.0.0/8"], PUBLIC)
    for _ in range(2):  # the second round answers from what the first kept
        assert peers.chain(request("10.0.0.1")) == ("10.0.0.1",)
        assert peers.chain(request("198.51.100.7")) == ("198.51.100.7",)
        assert peers.chain(request("::ffff:198.51.100.8")) == ("198.51.100.8",)
        # An untrusted peer's headers are never read, kept answer or not.
        assert peers.chain(request("198.51.100.7", [("X-Forwarded-For", "1.1.1.1")])) == (
            "198.51.100.7",
        )
        assert peers.chain(request("10.0.0.1", [("X-Forwarded-For", "1.1.1.1")])) == (
            "1.1.1.1",
            "10.0.0.1",
        )
        assert peers.chain(request("10.0.0.2", [("X-Forwarded-For", "1.1.1.1")])) == (
            "1.1.1.1",
            "10.0.0.2",
        )
        assert peers.chain(request("10.0.0.1", [("X-Forwarded-For", "2.2.2.2")])) == (
            "2.2.2.2",
            "10.0.0.1",
        )
        assert peers.chain(request("10.0.0.1", [("X-Forwarded-For", "2.2.2.2, 10.0.0.3")])) == (
            "2.2.2.2",
            "10.0.0.3",
            "10.0.0.1",
        )
        assert peers.chain(request("10.0.0.1", [("Forwarded", "for=3.3.3.3")])) == (
            "3.3.3.3",
            "10.0.0.1",
        )


def test_what_is_kept_between_requests_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bff.peers._MEMO_MAX", 16)
    peers = Peers(["10.0.0.0/8"], PUBLIC)
    for i in range(300):
        peer, client = f"10.0.{i // 256}.{i % 256}", f"198.51.{i // 256}.{i % 256}"
        assert peers.chain(request(peer, [("X-Forwarded-For", client)])) == (client, peer)
    assert len(peers._peers) == len(peers._walks) == 16
    assert peers.chain(request("10.0.0.0", [("X-Forwarded-For", "198.51.0.0")])) == (
        "198.51.0.0",
        "10.0.0.0",
    )


def test_a_long_chain_is_not_kept_but_still_worked_out_once_per_request() -> None:
    peers = Peers(["10.0.0.0/8"], PUBLIC)
    # What a client wrote left of itself is ignored, but it is part of the hops all the same.
    hops = ", ".join(["203.0.113.1"] * 60 + [f"10.1.0.{i}" for i in range(MAX_HOPS - 1)])
    req = request("10.0.0.1", [("X-Forwarded-For", hops)])
    first = peers.chain(req)
    assert first[0] == "203.0.113.1" and len(first) == MAX_HOPS + 1
    assert not peers._walks
    with mock.patch("bff.peers.parse_node", side_effect=AssertionError("parsed again")):
        assert peers.chain(req) is first
    other = request("10.0.0.1", [("X-Forwarded-For", f"{hops}, 198.51.100.8, 10.2.0.1")])
    assert peers.chain(other) == ("198.51.100.8", "10.2.0.1", "10.0.0.1")
    assert not peers._walks


def test_a_chain_of_many_empty_hops_is_not_kept() -> None:
    """Empty hops cost nothing in characters but a tuple slot each: a trusted proxy passing a
    browser's ``X-Forwarded-For`` of commas must not make the memo hold thousands of slots per
    entry (found by review: ~1 GiB per worker with 4096 such entries)."""
    peers = Peers(["10.0.0.0/8"], PUBLIC)
    for n in (MAX_HOPS + 1, 500, 5000):
        req = request("10.0.0.1", [("X-Forwarded-For", "," * n + "198.51.100.7")])
        # The walk stops at the rightmost untrusted hop; what a client wrote left of it is ignored.
        assert peers.chain(req) == ("198.51.100.7", "10.0.0.1")
    assert not peers._walks
    short = request("10.0.0.1", [("X-Forwarded-For", "198.51.100.7")])
    assert peers.chain(short) == ("198.51.100.7", "10.0.0.1")
    assert len(peers._walks) == 1  # a short chain is still kept
