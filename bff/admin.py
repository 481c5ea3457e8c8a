"""``bff sessions list|revoke``: operators end a user's sessions, e.g. when an account is stolen.

``list`` prints each session's store id in full; ``revoke --session ID`` takes those ids (a store
id is a one-way hash of the cookie's secret: it lets nobody into the session, and whoever can run
this command can read the store anyway). Both commands load the config (``--config`` or
``BFF_CONFIG``), open the configured store and work on the ``sub``/``sid`` indexes, which hold
session ids only. A session's tokens are encrypted under a key that lives only in the user's
cookie (design invariant 3), so from here we can end a session, but neither read its tokens nor
revoke them at the OP: for a compromised account, also revoke the user's grants at the OP.

Subjects and OP session ids are per provider (a ``sub`` at one OP is not the same user at
another): ``--idp NAME`` says which provider's (default: the first configured).

A revoked session is gone from the shared store at once; instances that cached it stop serving
it within ``session.cache_ttl``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
from collections.abc import Coroutine
from typing import Any, Final

from bff.config import ConfigError, Settings, load_settings
from bff.errors import StoreUnavailable
from bff.keys import StoreKey
from bff.sessions import SessionManager, session_key
from bff.store import open_store

__all__ = ["add_commands"]

# A store id: 20 bytes of SHA-256, base64url without padding (bff.keys.store_id).
_STORE_ID: Final = re.compile(r"[A-Za-z0-9_-]{27}")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sessions = subparsers.add_parser("sessions", help="list or end users' sessions")
    actions = sessions.add_subparsers(dest="action", required=True)

    listing = actions.add_parser("list", help="print the live sessions of a subject")
    listing.add_argument("--config", help="YAML config file (default: $BFF_CONFIG)")
    listing.add_argument("--sub", required=True, help="the user's subject (sub claim)")
    listing.add_argument("--idp", help="the provider (its oidc name) of --sub; default: the first")
    listing.set_defaults(func=cmd_list)

    revoke = actions.add_parser(
        "revoke", help="end every session of a subject or OP session, or the sessions named"
    )
    revoke.add_argument("--config", help="YAML config file (default: $BFF_CONFIG)")
    revoke.add_argument("--idp", help="the provider of --sub/--sid; default: the first")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--sub", help="end all sessions of this subject")
    target.add_argument("--sid", help="end all sessions of this OP session id")
    target.add_argument(
        "--session",
        nargs="+",
        metavar="ID",
        help="end these sessions (the ids `bff sessions list` prints)",
    )
    revoke.set_defaults(func=cmd_revoke)


def cmd_list(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    return _run(_list(settings, args.sub, _idp(settings, args.idp)))


def cmd_revoke(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    if args.session is not None:
        bad = [i for i in args.session if not _STORE_ID.fullmatch(i)]
        if bad:
            raise ConfigError(
                [f"--session: not a session id as `bff sessions list` prints them: {bad[0][:40]!r}"]
            )
        return _run(_revoke_ids(settings, [StoreKey(i) for i in args.session]))
    return _run(_revoke(settings, sub=args.sub, sid=args.sid, idp=_idp(settings, args.idp)))


def _idp(settings: Settings, name: str | None) -> str | None:
    names = [p.name for p in settings.providers]
    if name is not None and name not in names:
        raise ConfigError([f"--idp: no provider named {name!r} (configured: {', '.join(names)})"])
    return name


def _settings(path: str | None) -> Settings:
    path = path or os.environ.get("BFF_CONFIG")
    if not path:
        raise ConfigError(["no config file: pass --config FILE or set BFF_CONFIG"])
    return load_settings(path)


def _run(work: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(work)
    except StoreUnavailable as exc:
        print(f"bff: the session store is unavailable: {exc}", file=sys.stderr)
        return 1


def _manager(settings: Settings) -> SessionManager:
    cfg = settings.session
    if cfg.store.startswith("memory://"):
        # A memory store lives inside one serving process; a new process sees an empty one.
        print("bff: session.store is memory://; nothing outside the server can see its sessions")
    return SessionManager(
        open_store(cfg.store, timeout=cfg.store_timeout, redis=cfg.redis),
        idle_timeout=cfg.idle_timeout,
        absolute_timeout=cfg.absolute_timeout,
        cache_ttl=0,
        issuers={p.name: p.issuer for p in settings.providers},
    )


async def _list(settings: Settings, sub: str, idp: str | None) -> int:
    manager = _manager(settings)
    try:
        ids = await manager.ids_for(sub=sub, idp=idp)
        print(f"{len(ids)} live session(s) of sub {sub!r}")
        for sid in ids:
            left = await manager.store.ttl(session_key(sid))
            print(f"  session {sid}  ends in {_seconds(left)} unless used again")
    finally:
        await manager.store.close()
    return 0


async def _revoke(settings: Settings, *, sub: str | None, sid: str | None, idp: str | None) -> int:
    manager = _manager(settings)
    what = f"sub {sub!r}" if sub is not None else f"OP sid {sid!r}"
    try:
        ids = await manager.ids_for(sub=sub, sid=sid, idp=idp)
        for found in ids:
            print(f"  ending session {found}")
        ended = await manager.end_matching(sub=sub, sid=sid, idp=idp)
    finally:
        await manager.store.close()
    print(f"ended {ended} session(s) of {what}")
    if ended:
        print("note: their tokens are still valid at the OP until it revokes or expires them")
    return 0


async def _revoke_ids(settings: Settings, ids: list[StoreKey]) -> int:
    manager = _manager(settings)
    try:
        for found in ids:
            print(f"  ending session {found}")
        ended = await manager.end_ids(*ids)
    finally:
        await manager.store.close()
    print(f"ended {ended} of {len(ids)} session(s) named")
    if ended:
        print("note: their tokens are still valid at the OP until it revokes or expires them")
    return 0


def _seconds(left: float | None) -> str:
    if left is None:
        return "0 s"
    if math.isinf(left):
        return "never"
    return f"{math.ceil(left)} s"
