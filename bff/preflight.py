"""What ``bff check-config`` checks beyond the file: the store, the OP and the SPA folder.

The file itself (schema, cross-field rules) is checked by ``bff.config`` when it is loaded, the
same way for ``bff run``. Here are the checks that need this machine or the network, each giving
lines of three levels:

* **error**: bff would start but fail at run time (the store does not answer or is older than
  Redis 7; the OP is unreachable, its discovery document is refused, it does not offer PKCE
  S256 or the configured ``token_endpoint_auth_method``). ``check-config`` exits 1.
* **warning**: bff works, with less than one may expect (the store's ACL user may not run INFO,
  so its version is unknown; no ``end_session_endpoint``: logout
  leaves the OP session alive; no back-channel logout; no revocation endpoint; PKCE not
  advertised; access tokens shorter than ``refresh_skew``; no ``static`` folder or no
  ``index.html`` in it). Exit 0.
* **info**: what was found, including what each OP's discovery document offers (PAR, DPoP,
  token exchange, revocation, logout: ``bff.features.offered``) and each provider's redirect URI.

Every configured provider is checked the same way (issue 12, points 5 and 6); a provider whose
settings its OP's discovery document refuses (``bff.features.refusals``: ``par: required``
without a PAR endpoint, ``par: off`` when the OP requires PAR, and what other features add) is an
error, as it is at run time.

``check-config --offline`` runs none of these: it is meant for CI and image builds, where neither
the network nor the deployed files (``static``) are there.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from bff import dpop, features
from bff.config import OidcSettings, Settings, dump_redacted
from bff.errors import ProviderUnavailable, StoreUnavailable
from bff.oidc import OidcClient, OidcError, TokenRequestRefused
from bff.route_tokens import login_resources, required_grants

if TYPE_CHECKING:
    from bff.store.redis import RedisStore

__all__ = ["MIN_REDIS", "Report", "redis_version_problem", "run_checks", "static_problem"]

MIN_REDIS: Final = (7, 0)
"""The oldest Redis bff supports."""

_STORE_CHECK_TIMEOUT: Final = 10.0  # seconds for the whole store check (connect, PING, INFO)


@dataclass
class Report:
    """What the checks found, line by line, each line naming its subject."""

    infos: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def run_checks(settings: Settings) -> Report:
    """The store, the OP and the static folder, concurrently (all are independent)."""
    report = Report()
    logging.disable(logging.WARNING)  # the store's and the client's own log lines repeat ours
    try:
        await asyncio.gather(
            _check_store(settings, report),
            *(_check_issuer(settings, provider, report) for provider in settings.providers),
        )
    finally:
        logging.disable(logging.NOTSET)
    _check_static(settings.static, report)
    return report


# -- store ---------------------------------------------------------------------------------------


def redis_version_problem(version: str) -> str | None:
    """Why this ``redis_version`` (INFO server) is not enough, or None when it is."""
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return f"answers an unrecognised version {version!r}; bff needs Redis 7 or newer"
    if found < MIN_REDIS:
        return f"is Redis {version}; bff needs Redis {MIN_REDIS[0]} or newer"
    return None


async def _check_store(settings: Settings, report: Report) -> None:
    url = settings.session.store
    shown = f"session.store {dump_redacted(settings)['session']['store']}"
    if url.startswith("memory://"):
        report.infos.append(f"{shown}: sessions live in the one bff process (workers: 1)")
        return
    from bff.store.redis import RedisStore  # only when there is a Redis to ask

    with warnings.catch_warnings():  # redis' own "Retry was converted" UserWarning
        warnings.simplefilter("ignore")
        store = RedisStore.from_url(url, redis=settings.session.redis)  # its ACL user, TLS files
        try:
            version = await asyncio.wait_for(_redis_version(store), _STORE_CHECK_TIMEOUT)
        except (StoreUnavailable, TimeoutError) as exc:
            cause = exc.__cause__ or exc
            report.errors.append(f"{shown} does not answer: {cause or type(cause).__name__}")
            return
        finally:
            await store.close()
    if isinstance(version, Exception):  # PING works, INFO is refused (an ACL user without it)
        report.warnings.append(
            f"{shown} answers but refuses INFO ({version}): bff needs Redis 7 or newer, and "
            "cannot tell whether this one is"
        )
        return
    problem = redis_version_problem(version)
    if problem:
        report.errors.append(f"{shown} {problem}")
    else:
        report.infos.append(f"{shown}: Redis {version} answers")


async def _redis_version(store: RedisStore) -> str | Exception:
    """``redis_version`` from INFO server, or why INFO was refused; StoreUnavailable when the
    store does not answer at all."""
    from redis.exceptions import RedisError, ResponseError

    await store.ping()  # raises StoreUnavailable
    try:
        info: dict[str, Any] = await store.client.info("server")
    except ResponseError as exc:  # NOPERM and the like: the server is there
        return exc
    except (RedisError, OSError) as exc:
        raise StoreUnavailable() from exc
    return str(info.get("redis_version", "?"))


# -- static --------------------------------------------------------------------------------------


def static_problem(static: Path) -> str | None:
    """Why the SPA folder cannot serve the app, or None when it has an ``index.html``."""
    if not static.is_dir():
        return "is not a directory: every page would answer 404 (the API still works)"
    if not (static / "index.html").is_file():
        return "has no index.html: the app's pages would answer 404"
    return None


def _check_static(static: Path, report: Report) -> None:
    problem = static_problem(static)
    if problem:
        report.warnings.append(f"static {static} {problem}")
    else:
        report.infos.append(f"static {static}: index.html found")


# -- OP ------------------------------------------------------------------------------------------


async def _check_issuer(settings: Settings, provider: OidcSettings, report: Report) -> None:
    """Discovery, then what the OP offers against what this config relies on."""
    issuer = provider.issuer
    single = len(settings.providers) == 1
    subject = f"oidc.issuer {issuer}" if single else f"oidc {provider.name} ({issuer})"
    async with aiohttp.ClientSession() as http:
        redirect_uri = settings.redirect_uri_for(provider)
        client = OidcClient(provider, http, redirect_uri=redirect_uri)
        try:
            doc = await _discovery_document(http, issuer, provider.http_timeout)
        except ProviderUnavailable as exc:
            report.errors.append(f"{subject} is unreachable: {exc}")
            return
        if not single:
            report.infos.append(f"{subject}: redirect_uri {redirect_uri}")
        report.infos.extend(f"{subject} offers {line}" for line in features.offered(doc))
        refused = features.refusals(provider, doc)
        if refused:
            report.errors.extend(f"{subject}: {problem}" for problem in refused)
            return
        try:
            meta = await client.metadata()
        except ProviderUnavailable as exc:
            report.errors.append(f"{subject}: its discovery document is refused: {exc}")
            return
        report.infos.append(f"{subject}: discovery OK")
        _check_offers(doc, provider, subject, report)
        _check_route_grants(doc, settings, provider, subject, report)
        report.infos.append(f"{subject}: {dpop.feature_line(meta.dpop_algs, provider.dpop)}")
        if meta.revocation_endpoint:
            report.infos.append(f"{subject}: revocation endpoint {meta.revocation_endpoint}")
        else:
            report.warnings.append(
                f"{subject}: no revocation_endpoint in its discovery document nor in its "
                "RFC 8414 metadata, and oidc.revocation_endpoint is not set: logout cannot "
                "revoke the user's tokens at the OP"
            )
        await _check_token_lifetime(client, provider, subject, report)


async def _discovery_document(
    http: aiohttp.ClientSession, issuer: str, seconds: float
) -> dict[str, Any]:
    """The raw document: the parsed metadata keeps only what bff uses at run time."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=seconds)) as resp:
            if resp.status != 200:
                raise ProviderUnavailable(f"{url} answered {resp.status}")
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ProviderUnavailable(f"{url} is unreachable or not JSON") from exc
    if not isinstance(doc, dict):
        raise ProviderUnavailable(f"{url} did not answer a JSON object")
    return doc


def _check_offers(
    doc: dict[str, Any], provider: OidcSettings, subject: str, report: Report
) -> None:
    """PKCE, client authentication, end_session and back-channel logout, from discovery."""
    pkce = doc.get("code_challenge_methods_supported")
    if not isinstance(pkce, list):
        # A list without S256 is refused with the document itself (ProviderMetadata.parse).
        report.warnings.append(
            f"{subject}: code_challenge_methods_supported is not advertised; bff always sends "
            "PKCE S256 and an OP that ignores it is not protected against code injection"
        )
    method = provider.token_endpoint_auth_method
    methods = doc.get("token_endpoint_auth_methods_supported")
    if isinstance(methods, list):
        if method not in methods:
            offered = ", ".join(str(m) for m in methods)
            report.errors.append(
                f"{subject}: oidc.token_endpoint_auth_method {method} is not among its "
                f"token_endpoint_auth_methods_supported ({offered}): every login would fail "
                "at the token endpoint"
            )
    elif method != "client_secret_basic":  # Discovery 1.0 section 3: the default when absent
        report.warnings.append(
            f"{subject}: advertises no token_endpoint_auth_methods_supported (so only "
            f"client_secret_basic), but oidc.token_endpoint_auth_method is {method}"
        )
    if not doc.get("end_session_endpoint"):
        report.warnings.append(
            f"{subject}: no end_session_endpoint: logout ends the bff session only; the OP "
            "session lives on, so the next login may not ask for a password"
        )
    if doc.get("backchannel_logout_supported") is True:
        report.infos.append(f"{subject}: back-channel logout supported")
    else:
        report.warnings.append(
            f"{subject}: back-channel logout not supported (backchannel_logout_supported): a "
            "logout at the OP or in another app leaves bff sessions alive until they expire"
        )


async def _check_token_lifetime(
    client: OidcClient, provider: OidcSettings, subject: str, report: Report
) -> None:
    """Only a token tells its lifetime: we ask for a client_credentials token (and revoke it).
    An OP may give user tokens another lifetime; bff also logs it at the first login."""
    skew = provider.refresh_skew
    try:
        tokens = await client.client_credentials()
    except (OidcError, ProviderUnavailable) as exc:
        reason = exc.error if isinstance(exc, TokenRequestRefused) else type(exc).__name__
        report.infos.append(
            f"{subject}: access token lifetime unknown: the OP gave this client no "
            f"client_credentials token ({reason}); bff logs oidc.short_lived_access_tokens at "
            f"the first login if user tokens live shorter than oidc.refresh_skew ({skew:g} s)"
        )
        return
    await client.revoke(tokens.access_token, "access_token")
    if tokens.lifetime is None:
        report.infos.append(f"{subject}: access tokens: the OP sends no expires_in")
    elif tokens.lifetime < skew:
        report.warnings.append(
            f"{subject}: access tokens live {tokens.lifetime:g} s (a client_credentials token), "
            f"shorter than oidc.refresh_skew ({skew:g} s): bff refreshes them when half of "
            f"their lifetime is left ({tokens.lifetime / 2:g} s)"
        )
    else:
        report.infos.append(
            f"{subject}: access tokens live {tokens.lifetime:g} s (a client_credentials token)"
        )


def _check_route_grants(
    doc: dict[str, Any], settings: Settings, provider: OidcSettings, subject: str, report: Report
) -> None:
    """Issue 12: ``token: exchange`` needs the RFC 8693 grant; RFC 8707 has no discovery key."""
    for grant, why in required_grants(settings).items():
        grants = doc.get("grant_types_supported")
        if isinstance(grants, list) and grant not in grants:
            report.errors.append(
                f"{subject}: grant_types_supported lacks {grant}, which {why} needs: bff "
                "refuses this OP (never ready) until it offers the grant or the routes change"
            )
        elif not isinstance(grants, list):
            report.warnings.append(
                f"{subject}: advertises no grant_types_supported; {why} needs {grant}"
            )
    asked = login_resources(settings, provider)
    if asked:
        report.infos.append(
            f"{subject}: login asks for resources {', '.join(asked)} "
            "(RFC 8707 has no discovery key; set oidc.login_resources: false for an OP that "
            "refuses the parameter)"
        )
