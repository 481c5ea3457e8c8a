"""Serve the SPA: files from the static folder, ``index.html`` for client-side routes.

What a browser needs from a static server, and nothing more:

* Caching that is safe across deploys: a fingerprinted asset (``app.3f9a1c2b.js``) never
  changes under its name, so it is ``immutable`` for a year; everything else, ``index.html``
  first, is ``no-cache`` (always revalidated), with a strong ``ETag`` (a hash of the content,
  equal on every instance) and ``Last-Modified`` so revalidation is a cheap 304.
* Compression where the client accepts it: a precompressed ``.br``/``.gz`` sibling is used as is;
  otherwise a compressible file is gzipped once and the result kept in memory (bounded), never
  compressed again per request.
* Client-side routing: a path that names no file gets ``index.html`` when it is a page
  navigation (no file extension, or ``Accept: text/html``); a missing ``/x.js`` is a 404, not HTML.
* No directory listing, no dotfiles (``/.env``, ``/.git/``), no path escapes (``..``, symlinks
  out of the folder), and never a route reserved for bff or an API upstream.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import mimetypes
import os
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Final

from aiohttp import hdrs, web

__all__ = ["IMMUTABLE", "REVALIDATE", "add_routes", "content_type", "is_fingerprinted"]

IMMUTABLE: Final = "public, max-age=31536000, immutable"
REVALIDATE: Final = "no-cache"

# name.<hash>.ext or name-<hash>.ext, the hash 8-64 word characters with at least one digit
# (hex from webpack/esbuild, base64url from Vite/Rollup); "bootstrap-datepicker.js" is not one.
_FINGERPRINT: Final = re.compile(r"[.-](?=[A-Za-z0-9_]*\d)[A-Za-z0-9_]{8,64}\.[A-Za-z0-9]+$")

_MEMORY_FILE_LIMIT: Final = 1024 * 1024  # larger files stream from disk (FileResponse)
_MEMORY_BUDGET: Final = 32 * 1024 * 1024  # all cached bodies together, least recently used out
_MIN_COMPRESS: Final = 256  # bytes; below this gzip saves nothing worth a header

_TYPES: Final = {
    ".html": "text/html",
    ".htm": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain",
    ".xml": "application/xml",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".pdf": "application/pdf",
}
_TEXTUAL: Final = ("application/json", "application/manifest+json", "application/xml")
_COMPRESSIBLE: Final = (*_TEXTUAL, "image/svg+xml", "image/x-icon", "application/wasm")
_CODINGS: Final = (("br", ".br"), ("gzip", ".gz"))  # preference order


def content_type(path: Path) -> str:
    """The Content-Type for ``path``; text types carry ``charset=utf-8``."""
    kind = _TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
    kind = kind or "application/octet-stream"
    if kind.startswith("text/") or kind in (*_TEXTUAL, "image/svg+xml"):
        return f"{kind}; charset=utf-8"
    return kind


def is_fingerprinted(name: str) -> bool:
    """True for a content-addressed name such as ``app.3f9a1c2b.js`` or ``index-B1x9Qz0a.css``."""
    return _FINGERPRINT.search(name) is not None


def _compressible(kind: str) -> bool:
    base = kind.split(";", 1)[0]
    return base.startswith("text/") or base in _COMPRESSIBLE or base in ("font/ttf", "font/otf")


def _accepted_codings(header: str) -> set[str]:
    """Content codings the client accepts (q > 0), from ``Accept-Encoding``."""
    accepted: set[str] = set()
    for item in header.lower().split(","):
        name, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name and q > 0:
            accepted.add(name)
    if "*" in accepted:
        accepted.update(c for c, _ in _CODINGS)
    return accepted


@dataclass(slots=True)
class _Asset:
    """One file held in memory, with its encoded variants; valid while its stat is unchanged."""

    signature: tuple[int, int, int]  # (st_ino, st_mtime_ns, st_size)
    content_type: str
    etag: str  # hex content hash, without quotes or coding suffix
    mtime: float  # seconds since the epoch
    last_modified: str  # the same as an HTTP date
    bodies: dict[str, bytes] = field(default_factory=dict)  # "identity" | "br" | "gzip"

    def size(self) -> int:
        return sum(len(b) for b in self.bodies.values())


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _load_asset(path: Path, st: os.stat_result) -> _Asset:
    """Read a file, its precompressed siblings, or gzip it once. Runs in a worker thread."""
    data = path.read_bytes()
    kind = content_type(path)
    asset = _Asset(
        signature=_signature(st),
        content_type=kind,
        etag=hashlib.sha256(data).hexdigest()[:32],
        mtime=st.st_mtime,
        last_modified=formatdate(st.st_mtime, usegmt=True),
        bodies={"identity": data},
    )
    for coding, suffix in _CODINGS:
        sibling = path.with_name(path.name + suffix)
        try:
            sst = sibling.lstat()  # a symlinked sibling could point anywhere: not followed
        except OSError:
            continue
        if stat.S_ISREG(sst.st_mode) and sst.st_size <= _MEMORY_FILE_LIMIT:
            asset.bodies[coding] = sibling.read_bytes()
    if "gzip" not in asset.bodies and _compressible(kind) and len(data) >= _MIN_COMPRESS:
        packed = gzip.compress(data, compresslevel=9, mtime=0)
        if len(packed) < len(data):
            asset.bodies["gzip"] = packed
    return asset


class _AssetCache:
    """Files under the memory limit, least recently used evicted past the byte budget."""

    def __init__(self, budget: int = _MEMORY_BUDGET) -> None:
        self._budget = budget
        self._used = 0
        self._items: OrderedDict[Path, _Asset] = OrderedDict()

    async def get(self, path: Path, st: os.stat_result) -> _Asset:
        asset = self._items.get(path)
        if asset is not None and asset.signature == _signature(st):
            self._items.move_to_end(path)
            return asset
        loaded = await asyncio.get_running_loop().run_in_executor(None, _load_asset, path, st)
        self._drop(path)
        self._items[path] = loaded
        self._used += loaded.size()
        while self._used > self._budget and len(self._items) > 1:
            self._drop(next(iter(self._items)))
        return loaded

    def _drop(self, path: Path) -> None:
        old = self._items.pop(path, None)
        if old is not None:
            self._used -= old.size()


def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match uses weak comparison; any coding variant of the same content matches."""
    for raw in header.split(","):
        tag = raw.strip()
        if tag == "*":
            return True
        tag = tag.removeprefix("W/").strip('"')
        if tag.split("-", 1)[0] == etag:
            return True
    return False


def _asset_response(request: web.Request, asset: _Asset, cache_control: str) -> web.Response:
    accepted = _accepted_codings(request.headers.get(hdrs.ACCEPT_ENCODING, ""))
    coding = next((c for c, _ in _CODINGS if c in accepted and c in asset.bodies), "identity")
    suffix = {"identity": "", "br": "-br", "gzip": "-gz"}[coding]
    headers = {
        hdrs.CACHE_CONTROL: cache_control,
        hdrs.ETAG: f'"{asset.etag}{suffix}"',
        hdrs.LAST_MODIFIED: asset.last_modified,
    }
    if len(asset.bodies) > 1:
        headers[hdrs.VARY] = hdrs.ACCEPT_ENCODING
    inm = request.headers.get(hdrs.IF_NONE_MATCH)
    if inm is not None:
        not_modified = _etag_matches(inm, asset.etag)
    else:
        # HTTP dates have whole seconds: compare the file's mtime truncated the same way.
        since = request.if_modified_since
        not_modified = since is not None and int(asset.mtime) <= since.timestamp()
    if not_modified:
        return web.Response(status=304, headers=headers)
    if coding != "identity":
        headers[hdrs.CONTENT_ENCODING] = coding
    headers[hdrs.CONTENT_TYPE] = asset.content_type
    return web.Response(body=asset.bodies[coding], headers=headers)


def add_routes(app: web.Application, root: Path, reserved: tuple[str, ...]) -> None:
    """Serve ``root`` on every GET/HEAD path not under one of the ``reserved`` prefixes."""
    root = root.resolve()
    index = root / "index.html"
    cache = _AssetCache()

    def reserved_path(path: str) -> bool:
        return any(path == r or path.startswith(r + "/") for r in reserved)

    def lookup(tail: str) -> tuple[Path, os.stat_result] | None:
        """The regular file ``tail`` names inside ``root`` and its stat, or None (blocking)."""
        if "\\" in tail or "\x00" in tail:
            return None
        try:
            target = (root / tail).resolve() if tail else index
            # resolve() follows symlinks: anything that lands outside the root is not ours.
            if target == root or root not in target.parents:
                return None
            st = target.stat()
        except (OSError, RuntimeError):  # missing, unreadable, a symlink loop
            return None
        # Directories are never listed; sockets and fifos never opened.
        return (target, st) if stat.S_ISREG(st.st_mode) else None

    def is_navigation(request: web.Request, tail: str) -> bool:
        last = tail.rsplit("/", 1)[-1]
        return "." not in last or "text/html" in request.headers.get(hdrs.ACCEPT, "")

    async def send(request: web.Request, tail: str) -> web.StreamResponse | None:
        found = await asyncio.get_running_loop().run_in_executor(None, lookup, tail)
        if found is None:
            return None
        path, st = found
        cache_control = IMMUTABLE if is_fingerprinted(path.name) else REVALIDATE
        if st.st_size > _MEMORY_FILE_LIMIT:
            # Streams from disk; aiohttp handles Range, ETag, 304 and .br/.gz siblings itself.
            return web.FileResponse(
                path,
                headers={
                    hdrs.CACHE_CONTROL: cache_control,
                    hdrs.CONTENT_TYPE: content_type(path),
                },
            )
        try:
            asset = await cache.get(path, st)
        except OSError:
            return None
        return _asset_response(request, asset, cache_control)

    async def serve(request: web.Request) -> web.StreamResponse:
        if reserved_path(request.path):
            raise web.HTTPNotFound()
        tail = request.match_info["tail"]
        if any(seg.startswith(".") for seg in tail.split("/")):
            raise web.HTTPNotFound()  # dotfiles (/.env, /.git/) and ".." are never served
        response = await send(request, tail)
        if response is None and is_navigation(request, tail):
            response = await send(request, "")
        if response is None:
            raise web.HTTPNotFound()
        return response

    app.router.add_get("/{tail:.*}", serve)
