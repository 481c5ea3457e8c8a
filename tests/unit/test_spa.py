"""The static SPA server: fallback routing, caching, compression, and what it must never serve."""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bff import spa  # noqa: E402
from bff.config import parse_settings  # noqa: E402
from bff.middlewares import error_middleware, security_headers  # noqa: E402

Client = TestClient  # type: ignore[type-arg]
MakeClient = Callable[[web.Application], Awaitable[Client]]

APP_JS = "export const greet = (name) => `hello ${name}`;\n" * 40  # compressible, > 256 bytes


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "static"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text(
        "<!doctype html><title>app</title><script type=module src=/app.js></script>"
    )
    (root / "app.js").write_text(APP_JS)
    (root / "assets" / "main.3f9a1c2b.js").write_text("console.log(1);\n")
    (root / "assets" / "style.css").write_text("body{margin:0}\n")
    (root / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / ".env").write_text("SECRET=1\n")
    (tmp_path / "outside.txt").write_text("not yours\n")
    (root / "escape.txt").symlink_to(tmp_path / "outside.txt")
    return root


def make_app(root: Path) -> web.Application:
    app = web.Application(middlewares=[error_middleware(api_prefixes=("/bff", "/api"))])
    spa.add_routes(app, root, reserved=("/bff", "/api"))
    app.on_response_prepare.append(
        security_headers(csp="default-src 'self'", hsts=False, no_store_prefixes=("/bff",))
    )
    return app


@pytest.fixture
async def client(site: Path, aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(make_app(site))


async def test_root_serves_index_html_with_no_cache(client: Client) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert "<title>app</title>" in await resp.text()


async def test_unknown_client_route_falls_back_to_index_html(client: Client) -> None:
    resp = await client.get("/orders/42/edit")
    assert resp.status == 200
    assert "<title>app</title>" in await resp.text()
    assert resp.headers["Cache-Control"] == "no-cache"


async def test_navigation_to_a_dotted_route_falls_back_when_html_is_accepted(
    client: Client,
) -> None:
    resp = await client.get("/users/jane.doe", headers={"Accept": "text/html,*/*;q=0.8"})
    assert resp.status == 200
    assert "<title>app</title>" in await resp.text()


async def test_missing_script_is_404_not_html(client: Client) -> None:
    resp = await client.get("/missing.js", headers={"Accept": "*/*"})
    assert resp.status == 404


async def test_api_and_bff_paths_are_never_answered_with_the_spa(client: Client) -> None:
    for path in ("/api/nothing", "/bff/nothing", "/api"):
        resp = await client.get(path, headers={"Accept": "text/html"})
        assert resp.status == 404, path
        assert resp.content_type == "application/json", path
        assert "<title>" not in await resp.text()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/assets/style.css", "text/css; charset=utf-8"),
        ("/logo.svg", "image/svg+xml; charset=utf-8"),
        ("/index.html", "text/html; charset=utf-8"),
    ],
)
async def test_files_have_their_content_type(client: Client, path: str, expected: str) -> None:
    resp = await client.get(path, headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == expected
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_fingerprinted_asset_is_immutable_and_plain_one_is_revalidated(
    client: Client,
) -> None:
    hashed = await client.get("/assets/main.3f9a1c2b.js")
    assert hashed.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    plain = await client.get("/assets/style.css")
    assert plain.headers["Cache-Control"] == "no-cache"


@pytest.mark.parametrize(
    ("name", "hashed"),
    [
        ("main.3f9a1c2b.js", True),
        ("index-B1x9Qz0a.css", True),
        ("chunk.5e8d9c1a7b3f2e4d.mjs", True),
        ("bootstrap-datepicker.js", False),
        ("app.js", False),
        ("index.html", False),
    ],
)
def test_fingerprint_detection(name: str, hashed: bool) -> None:
    assert spa.is_fingerprinted(name) is hashed


async def test_etag_revalidation_answers_304_without_a_body(client: Client) -> None:
    first = await client.get("/app.js", headers={"Accept-Encoding": "identity"})
    etag = first.headers["ETag"]
    assert etag.startswith('"') and first.headers["Last-Modified"]
    again = await client.get(
        "/app.js", headers={"If-None-Match": etag, "Accept-Encoding": "identity"}
    )
    assert again.status == 304
    assert await again.read() == b""
    assert again.headers["ETag"] == etag
    assert again.headers["Cache-Control"] == "no-cache"


async def test_stale_etag_gets_the_new_content(client: Client, site: Path) -> None:
    first = await client.get("/app.js")
    (site / "app.js").write_text("export const v = 2;\n")
    os.utime(site / "app.js", ns=(1, 2_000_000_000))  # a different mtime, whatever the clock
    again = await client.get("/app.js", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 200
    assert await again.text() == "export const v = 2;\n"


async def test_if_modified_since_answers_304(client: Client) -> None:
    first = await client.get("/assets/style.css")
    again = await client.get(
        "/assets/style.css", headers={"If-Modified-Since": first.headers["Last-Modified"]}
    )
    assert again.status == 304


async def test_gzip_is_served_when_accepted_and_cached_once(client: Client, site: Path) -> None:
    resp = await client.get("/app.js", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Vary"] == "Accept-Encoding"
    body = await resp.read()
    assert gzip.decompress(body).decode() == APP_JS
    # Same bytes on the next request: compressed once (mtime=0, deterministic) and reused.
    again = await client.get("/app.js", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert await again.read() == body


async def test_identity_is_served_when_compression_is_refused(client: Client) -> None:
    resp = await client.get("/app.js", headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "Content-Encoding" not in resp.headers
    assert await resp.text() == APP_JS


async def test_precompressed_brotli_sibling_is_preferred(
    site: Path, aiohttp_client: MakeClient
) -> None:
    (site / "app.js.br").write_bytes(b"pretend-brotli")
    client = await aiohttp_client(make_app(site))
    resp = await client.get(
        "/app.js", headers={"Accept-Encoding": "gzip, br"}, auto_decompress=False
    )
    assert resp.headers["Content-Encoding"] == "br"
    assert await resp.read() == b"pretend-brotli"
    assert resp.headers["ETag"].endswith('-br"')


async def test_head_has_headers_and_no_body(client: Client) -> None:
    resp = await client.head("/app.js", headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(APP_JS))
    assert await resp.read() == b""


@pytest.mark.parametrize(
    "path",
    [
        "/.env",
        "/assets/../.env",
        "/%2e%2e/outside.txt",
        "/..%2foutside.txt",
        "/escape.txt",
        "/assets/..%5c..%5coutside.txt",
    ],
)
async def test_no_path_escape_dotfile_or_symlink_out(client: Client, path: str) -> None:
    resp = await client.get(path, headers={"Accept": "*/*"})
    assert resp.status == 404, path
    body = await resp.text()
    assert "SECRET" not in body and "not yours" not in body


async def test_directory_is_never_listed(client: Client) -> None:
    resp = await client.get("/assets/", headers={"Accept": "text/html"})
    body = await resp.text()
    assert "main.3f9a1c2b.js" not in body
    assert "<title>app</title>" in body  # a client route, not a listing


async def test_other_methods_are_not_allowed(client: Client) -> None:
    resp = await client.post("/app.js")
    assert resp.status == 405


async def test_large_file_streams_from_disk_with_the_same_cache_policy(
    site: Path, aiohttp_client: MakeClient
) -> None:
    (site / "big.5e8d9c1a.wasm").write_bytes(b"\0asm" + b"x" * (2 * 1024 * 1024))
    client = await aiohttp_client(make_app(site))
    resp = await client.get("/big.5e8d9c1a.wasm", headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/wasm"
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    etag = resp.headers["ETag"]
    assert len(await resp.read()) == 4 + 2 * 1024 * 1024
    again = await client.get("/big.5e8d9c1a.wasm", headers={"If-None-Match": etag})
    assert again.status == 304


async def test_create_app_serves_the_spa_with_security_headers(
    site: Path, aiohttp_client: MakeClient
) -> None:
    from bff.app import create_app
    from bff.store.memory import MemoryStore

    settings = parse_settings(
        f"""
public_url: http://localhost:8080
static: {site}
oidc: {{issuer: "http://127.0.0.1:1", client_id: c, client_secret: s}}
keys: ["{"k" * 43}"]
upstreams: [{{path: /api/demo, url: "http://127.0.0.1:1"}}]
session: {{cookie: {{name: bff, secure: false}}}}
"""
    )
    client = await aiohttp_client(create_app(settings, store=MemoryStore()))
    resp = await client.get("/some/route")
    assert resp.status == 200
    csp = resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert "Strict-Transport-Security" not in resp.headers  # plain http: never HSTS
    api = await client.get("/api/demo/x", headers={"Accept": "text/html"})
    assert "<title>app</title>" not in await api.text()
