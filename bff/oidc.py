"""OpenID Connect relying-party client: discovery, JWKS, token endpoint, token validation.

It speaks to the OP with an ``aiohttp.ClientSession`` it is given and knows nothing of the server
side: it returns values (:class:`TokenSet`, claims dicts) and raises

* :class:`InvalidToken` for an ID or logout token that fails validation,
* :class:`InvalidGrant` when the OP answers ``invalid_grant`` (code or refresh token dead),
* :class:`TokenRequestRefused` for any other OAuth error from the token endpoint,
* :class:`bff.errors.ProviderUnavailable` when the OP cannot be reached, is slow, or answers 5xx.

Specs: OpenID Connect Core 1.0 (3.1.3.7 ID token validation, 12 refresh), Discovery 1.0,
Back-Channel Logout 1.0 (2.6), RFC 6749, RFC 7636 (PKCE), RFC 7009 (revocation), RFC 7523
(``private_key_jwt``), RFC 9207 (``iss`` authorization response parameter).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeGuard
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import aiohttp
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

from bff import dpop, features, metrics, tracing
from bff.errors import ProviderUnavailable

if TYPE_CHECKING:
    from bff.config import OidcSettings

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "BACKCHANNEL_EVENT",
    "TOKEN_EXCHANGE_GRANT",
    "InvalidGrant",
    "InvalidToken",
    "OidcClient",
    "OidcError",
    "ProviderMetadata",
    "ProviderRefused",
    "TokenRequestRefused",
    "TokenSet",
    "authorization_server_metadata_url",
    "new_pkce_pair",
    "unverified_issuer",
    "user_claims",
]

log = logging.getLogger(__name__)

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 RFC 8693
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_MAX_JWT = 16_384


class OidcError(Exception):
    pass


class InvalidToken(OidcError):
    """An ID token or logout token failed validation; the message says which check."""


class InvalidGrant(OidcError):
    """The OP refused the grant (``invalid_grant``): the code or refresh token is dead."""


class ProviderRefused(ProviderUnavailable):
    """The OP's discovery document does not allow this provider's settings (``features``)."""

    description = "the OpenID Provider does not offer what this provider's settings require"


class TokenRequestRefused(OidcError):
    """The token endpoint answered another OAuth error (``invalid_client``, ...)."""

    def __init__(self, error: str, description: str = "") -> None:
        self.error = error
        super().__init__(f"{error}: {description}" if description else error)


def new_pkce_pair() -> tuple[str, str]:
    """A fresh (verifier, S256 challenge): 256 bits of entropy, RFC 7636 4.1 alphabet."""
    verifier = secrets.token_urlsafe(48)
    return verifier, create_s256_code_challenge(verifier)


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    revocation_endpoint: str | None
    end_session_endpoint: str | None
    iss_parameter_supported: bool
    id_token_algs: tuple[str, ...]
    dpop_algs: tuple[str, ...] = ()  # dpop_signing_alg_values_supported (RFC 9449 5.1)
    # grant_types_supported as advertised; None when the document names none (issue 12)
    grant_types: tuple[str, ...] | None = None
    # RFC 9126: where to push authorization requests, when bff does (``features.uses_par``).
    par_endpoint: str | None = None

    @classmethod
    def parse(cls, doc: Mapping[str, Any], expected_issuer: str) -> ProviderMetadata:
        # Discovery 4.3: the issuer in the document MUST be exactly the one we asked for.
        if doc.get("issuer") != expected_issuer:
            raise ValueError(f"discovery issuer {doc.get('issuer')!r} != {expected_issuer!r}")
        for required in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(doc.get(required), str):
                raise ValueError(f"discovery document lacks {required}")
        methods = doc.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise ValueError("the OP does not support PKCE S256")
        return cls(
            issuer=doc["issuer"],
            authorization_endpoint=doc["authorization_endpoint"],
            token_endpoint=doc["token_endpoint"],
            jwks_uri=doc["jwks_uri"],
            userinfo_endpoint=doc.get("userinfo_endpoint"),
            revocation_endpoint=doc.get("revocation_endpoint"),
            end_session_endpoint=doc.get("end_session_endpoint"),
            iss_parameter_supported=bool(doc.get("authorization_response_iss_parameter_supported")),
            # A list of strings, whatever else the OP wrote (a TypeError would end discovery).
            id_token_algs=_str_tuple(doc.get("id_token_signing_alg_values_supported")) or (),
            dpop_algs=_str_tuple(doc.get("dpop_signing_alg_values_supported")) or (),
            grant_types=_str_tuple(doc.get("grant_types_supported")),
        )


def _str_tuple(value: Any) -> tuple[str, ...] | None:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else None


def authorization_server_metadata_url(issuer: str) -> str:
    """RFC 8414 3.1: the well-known URI goes *between* the host and the issuer's path
    (``https://op/tenant`` -> ``https://op/.well-known/oauth-authorization-server/tenant``)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return urlunsplit(
        (parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")
    )


@dataclass(frozen=True, slots=True)
class TokenSet:
    access_token: str
    token_type: str
    expires_at: float | None
    refresh_token: str | None
    id_token: str | None
    scope: tuple[str, ...] | None
    lifetime: float | None = None  # expires_in as sent: what the refresh skew is capped by

    def __repr__(self) -> str:  # tokens never reach a log line or a traceback
        return f"TokenSet(expires_at={self.expires_at}, scope={self.scope}, tokens='**********')"

    @classmethod
    def parse(cls, body: Mapping[str, Any], now: float, *, dpop: bool = False) -> TokenSet:
        """``dpop``: a DPoP-bound token was asked for, and nothing else is taken (RFC 9449 5)."""
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise ValueError("no access_token in the token response")
        token_type = str(body.get("token_type", ""))
        expected = "DPoP" if dpop else "Bearer"
        if token_type.lower() != expected.lower():
            if dpop:
                raise ValueError(
                    f"a DPoP-bound token was asked for but the OP answered token_type "
                    f"{token_type!r}: it does not bind tokens to bff's key (oidc.dpop)"
                )
            raise ValueError(f"unsupported token_type {token_type!r}")
        expires_in = body.get("expires_in")
        expires_at = lifetime = None
        if _is_number(expires_in):
            expires_at = now + float(expires_in)
            lifetime = max(0.0, float(expires_in))
        scope = body.get("scope")
        return cls(
            access_token=token,
            token_type=expected,
            expires_at=expires_at,
            refresh_token=body.get("refresh_token") or None,
            id_token=body.get("id_token") or None,
            scope=tuple(scope.split()) if isinstance(scope, str) else None,
            lifetime=lifetime,
        )


class OidcClient:
    def __init__(
        self,
        settings: OidcSettings,
        http: aiohttp.ClientSession,
        redirect_uri: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.name: str = settings.name  # the provider's name in the config (``idp``)
        self.issuer: str = settings.issuer
        self.client_id: str = settings.client_id
        self.redirect_uri = redirect_uri
        self._http = http
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=settings.http_timeout)
        self._metadata: ProviderMetadata | None = None
        self._discovery_lock = asyncio.Lock()
        self._last_discovery_try = 0.0
        self.refused: str | None = None  # why the last discovery document was refused
        self.document: Mapping[str, Any] | None = None  # the raw discovery document, once loaded
        self._jwks: KeySet | None = None
        # JWKS fetches are numbered as they start; ``_jwks_number`` is the fetch whose keys we
        # hold. ``_jwks_fetch`` is the newest fetch in flight, which callers join.
        self._jwks_started = 0
        self._jwks_number = 0
        self._jwks_fetch: tuple[int, asyncio.Future[None]] | None = None
        self._jwks_fetched_at = float("-inf")  # start of the newest fetch: the unsolicited limit
        self._dpop_nonces = dpop.Nonces()  # the OP's latest DPoP-Nonce (RFC 9449 8)
        # The config guarantees what each method needs: a secret, or a readable key file.
        self._secret = settings.client_secret.get() if settings.client_secret else ""
        # Issue 12: RFC 8707 resources asked for at login (app.py sets them from the routes),
        # and grant types discovery must advertise (grant -> why bff needs it).
        self.login_resources: tuple[str, ...] = ()
        self.required_grants: dict[str, str] = {}
        self._signing_key: RSAKey | ECKey | OKPKey | None = None
        if settings.private_key_file and settings.token_endpoint_auth_method == "private_key_jwt":  # noqa: S105
            self._signing_key = _load_private_key(
                Path(settings.private_key_file), settings.private_key_kid
            )

    # -- discovery --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._metadata is not None

    async def metadata(self) -> ProviderMetadata:
        """The OP's metadata; fetched on first use, then cached for the process lifetime."""
        if self._metadata is not None:
            return self._metadata
        async with self._discovery_lock:
            if self._metadata is None:
                # Requests arriving while the OP is down must not each hammer it.
                if self._clock() - self._last_discovery_try < 1.0:
                    if self.refused:
                        raise ProviderRefused(f"provider {self.name}: {self.refused}")
                    raise ProviderUnavailable("the OpenID Provider's metadata is not loaded yet")
                self._last_discovery_try = self._clock()
                self._metadata = await self._discover()
                if not self._metadata.revocation_endpoint:
                    log.warning(
                        "oidc.no_revocation_endpoint",
                        extra={
                            "event": "oidc.no_revocation_endpoint",
                            "idp": self.name,
                            "hint": "logout cannot revoke tokens at the OP; set "
                            "oidc.revocation_endpoint if it has one",
                        },
                    )
        return self._metadata

    async def discover_forever(self, initial_delay: float = 0.5, max_delay: float = 30.0) -> None:
        """Background task: retry discovery with exponential backoff until it succeeds."""
        delay = initial_delay
        while self._metadata is None:
            try:
                await self.metadata()
                log.info(
                    "oidc.discovered",
                    extra={"event": "oidc.discovered", "idp": self.name, "issuer": self.issuer},
                )
                return
            except ProviderRefused as exc:
                # Not a moment's trouble: this config cannot work with this OP as it is now.
                log.error(
                    "oidc.feature_refused",
                    extra={"event": "oidc.feature_refused", "idp": self.name, "err": str(exc),
                           "retry_in": delay},
                )  # fmt: skip
            except ProviderUnavailable as exc:
                log.warning(
                    "oidc.discovery_failed",
                    extra={"event": "oidc.discovery_failed", "idp": self.name, "err": str(exc),
                           "retry_in": delay},
                )  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(max_delay, delay * 2)

    async def _discover(self) -> ProviderMetadata:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self._get_json(url)
        try:
            meta = ProviderMetadata.parse(doc, self.issuer)
        except ValueError as exc:
            raise ProviderUnavailable(f"bad discovery document: {exc}") from exc
        problems = features.refusals(self.settings, doc)
        for grant, why in self.required_grants.items():
            if meta.grant_types is not None and grant not in meta.grant_types:
                # Refused, not ignored: every call on that route would fail. Discovery keeps
                # retrying (readiness stays 503) and the log names the fix.
                log.error(
                    "oidc.grant_type_unsupported",
                    extra={"event": "oidc.grant_type_unsupported", "grant": grant, "why": why},
                )
                problems.append(f"the OP's grant_types_supported lacks {grant}, which {why} needs")
        if self.settings.dpop and dpop.choose_alg(meta.dpop_algs) is None:
            problems.append(
                "oidc.dpop is on but the OP's discovery document "
                + (
                    f"lists no DPoP algorithm bff can sign with ({meta.dpop_algs}; bff: "
                    f"{', '.join(dpop.PREFERRED_ALGS)})"
                    if meta.dpop_algs
                    else "does not advertise dpop_signing_alg_values_supported (RFC 9449 5.1)"
                )
            )
        self.refused = "; ".join(problems) or None
        if self.refused:
            raise ProviderRefused(f"provider {self.name}: {self.refused}")
        revocation = self.settings.revocation_endpoint or meta.revocation_endpoint
        if revocation is None:
            revocation = await self._rfc8414_revocation_endpoint()
        self.document = doc
        par = features.par_endpoint(doc) if features.uses_par(self.settings, doc) else None
        return dataclasses.replace(meta, revocation_endpoint=revocation, par_endpoint=par)

    async def dpop_alg(self) -> str:
        """The algorithm of new sessions' DPoP keys (discovery made sure there is one)."""
        alg = dpop.choose_alg((await self.metadata()).dpop_algs)
        if alg is None:
            raise ProviderUnavailable("the OP does not support DPoP")
        return alg

    async def _rfc8414_revocation_endpoint(self) -> str | None:
        """Some OPs name ``revocation_endpoint`` only in their RFC 8414 metadata.

        Any HTTP answer but 200 means there is no such document (most OPs; some answer 5xx for
        paths they do not know, and must not keep bff from ever becoming ready). No answer at
        all, right after the discovery document came from the same host, is a moment's trouble:
        it fails discovery so that it is tried again, rather than concluding for the life of
        the process that logout cannot revoke anything.
        """
        url = authorization_server_metadata_url(self.issuer)
        try:
            async with self._http.get(url, timeout=self._timeout) as resp:
                if resp.status != 200:
                    return None
                doc = _loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(f"{url} is unreachable") from exc
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        endpoint = doc.get("revocation_endpoint")
        # RFC 8414 3.3: a document about another issuer must not be used.
        if doc.get("issuer") != self.issuer or not isinstance(endpoint, str) or not endpoint:
            return None
        return endpoint

    # -- authorization request --------------------------------------------------------------

    async def authorization_url(self, *, state: str, nonce: str, code_challenge: str) -> str:
        """Where to send the browser. With PAR (RFC 9126) the parameters go to the OP from
        server to server, authenticated like a token request, and the browser's URL carries only
        ``client_id`` and the ``request_uri`` the OP answered: nothing to tamper with or leak."""
        meta = await self.metadata()
        params: dict[str, str] = {
            **self.settings.extra_auth_params,
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.settings.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        # RFC 8707 2.1: one `resource` parameter per resource, pushed with the rest under PAR.
        resources = tuple(("resource", r) for r in self.login_resources)
        if meta.par_endpoint is not None:
            request_uri = await self._push(meta, params, resources)
            params, resources = {"client_id": self.client_id, "request_uri": request_uri}, ()
        sep = "&" if "?" in meta.authorization_endpoint else "?"
        query = urlencode([*params.items(), *resources], quote_via=quote)
        return f"{meta.authorization_endpoint}{sep}{query}"

    @metrics.op_call("par")
    @tracing.traced("bff.oidc.par", kind="client")
    async def _push(
        self,
        meta: ProviderMetadata,
        params: dict[str, str],
        extra: tuple[tuple[str, str], ...] = (),
    ) -> str:
        """RFC 9126 section 2: POST the authorization request; the ``request_uri`` answered.
        ``extra``: repeatable parameters (RFC 8707 ``resource``), after the others."""
        assert meta.par_endpoint is not None
        body, headers = self._client_auth(params, meta)
        headers["Accept"] = "application/json"
        data: dict[str, str] | list[tuple[str, str]] = [*body.items(), *extra] if extra else body
        try:
            async with self._http.post(
                meta.par_endpoint, data=data, headers=headers, timeout=self._timeout
            ) as resp:
                status = resp.status
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                "the OP's pushed authorization endpoint is unreachable"
            ) from exc
        try:
            payload = _loads(raw)
        except ValueError:
            payload = None
        if status == 201 and isinstance(payload, dict):
            request_uri = payload.get("request_uri")
            if isinstance(request_uri, str) and request_uri:
                return request_uri
        error = str(payload.get("error", status)) if isinstance(payload, dict) else str(status)
        # Only an OAuth error code reaches the answer, never the OP's free text.
        error = error if _ERROR_CODE.fullmatch(error) else str(status)
        # A refusal is bff's configuration or the OP's, never the user's: 503, logged.
        log.error(
            "oidc.par_refused",
            extra={"event": "oidc.par_refused", "idp": self.name, "status": status, "error": error},
        )
        raise ProviderUnavailable(f"the OP refused the pushed authorization request ({error})")

    async def check_response_issuer(self, iss: str | None) -> None:
        """RFC 9207: a present ``iss`` must be ours; a supporting OP must send one."""
        meta = await self.metadata()
        if iss is None:
            if meta.iss_parameter_supported:
                raise InvalidToken("the authorization response lacks the iss parameter")
            return
        if iss != meta.issuer:
            raise InvalidToken("the authorization response came from another issuer")

    # -- token endpoint ---------------------------------------------------------------------

    @tracing.traced("bff.oidc.code_exchange")
    async def exchange_code(
        self, code: str, code_verifier: str, *, dpop_key: dpop.DpopKey | None = None
    ) -> TokenSet:
        """``dpop_key``: ask for tokens bound to it (RFC 9449 5); only ``DPoP`` ones are taken."""
        return await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": code_verifier,
            },
            dpop_key=dpop_key,
        )

    async def refresh(
        self,
        refresh_token: str,
        *,
        answer_timeout: float | None = None,
        dpop_key: dpop.DpopKey | None = None,
        resources: tuple[str, ...] = (),
    ) -> TokenSet:
        """``answer_timeout``: how long to wait for the answer once the request is sent (the
        connection still has ``http_timeout``). A rotating OP may carry out a refresh it
        answers late; giving up on its answer would lose the new refresh token (refresh.py).
        ``dpop_key``: the session's, so that the new tokens are bound to it as well."""
        limits = None
        if answer_timeout is not None:
            limits = aiohttp.ClientTimeout(
                total=max(answer_timeout, self.settings.http_timeout),
                connect=self.settings.http_timeout,
            )
        name = self.settings.resource_parameter  # RFC 8707 `resource`, or `audience`
        return await self._token_request(
            {"grant_type": "refresh_token", "refresh_token": refresh_token},
            limits,
            dpop_key=dpop_key,
            extra=tuple((name, r) for r in resources),
        )

    async def token_exchange(
        self,
        subject_token: str,
        *,
        audience: tuple[str, ...] = (),
        resources: tuple[str, ...] = (),
        scopes: tuple[str, ...] = (),
    ) -> TokenSet:
        """RFC 8693: the user's access token for one scoped to another audience."""
        form = {
            "grant_type": TOKEN_EXCHANGE_GRANT,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "requested_token_type": ACCESS_TOKEN_TYPE,
        }
        if scopes:
            form["scope"] = " ".join(scopes)
        extra = tuple(("audience", a) for a in audience) + tuple(("resource", r) for r in resources)
        return await self._token_request(form, extra=extra)

    async def client_credentials(self, scopes: tuple[str, ...] = ()) -> TokenSet:
        form = {"grant_type": "client_credentials"}
        if scopes:
            form["scope"] = " ".join(scopes)
        return await self._token_request(form)

    @metrics.op_call("revocation")
    async def revoke(self, token: str, hint: str) -> bool:
        """RFC 7009; best effort: False when the OP has no endpoint or did not confirm."""
        meta = await self.metadata()
        if not meta.revocation_endpoint:
            return False
        form, headers = self._client_auth({"token": token, "token_type_hint": hint}, meta)
        try:
            async with self._http.post(
                meta.revocation_endpoint, data=form, headers=headers, timeout=self._timeout
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning(
                "oidc.revoke_failed", extra={"event": "oidc.revoke_failed", "err": str(exc)}
            )
            return False

    async def userinfo(
        self, access_token: str, *, dpop_key: dpop.DpopKey | None = None
    ) -> dict[str, Any]:
        meta = await self.metadata()
        if not meta.userinfo_endpoint:
            return {}
        if dpop_key is None:
            return await self._get_json(
                meta.userinfo_endpoint, headers={"Authorization": f"Bearer {access_token}"}
            )
        url = meta.userinfo_endpoint
        for attempt in (1, 2):  # a second time only for the OP's use_dpop_nonce (RFC 9449 9)
            headers = {
                "Authorization": f"DPoP {access_token}",
                "DPoP": self._dpop_proof(dpop_key, "GET", url, access_token),
            }
            try:
                async with self._http.get(url, headers=headers, timeout=self._timeout) as resp:
                    renewed = self._dpop_nonces.note(_origin(url), resp.headers)
                    if (
                        attempt == 1
                        and renewed
                        and dpop.is_nonce_challenge(resp.status, resp.headers)
                    ):
                        continue
                    if resp.status != 200:
                        raise ProviderUnavailable(f"{url} answered {resp.status}")
                    data = _loads(await resp.read())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise ProviderUnavailable(f"{url} is unreachable or not JSON") from exc
            if not isinstance(data, dict):
                raise ProviderUnavailable(f"{url} did not answer a JSON object")
            return data
        raise ProviderUnavailable(f"{url} kept asking for another DPoP nonce")

    def _dpop_proof(
        self, key: dpop.DpopKey, method: str, url: str, access_token: str | None = None
    ) -> str:
        nonce = self._dpop_nonces.get(_origin(url))
        return dpop.proof(
            key, method, url, access_token=access_token, nonce=nonce, clock=self._clock
        )

    @metrics.op_call("token")
    @tracing.traced("bff.oidc.token", kind="client")
    async def _token_request(
        self,
        form: dict[str, str],
        limits: aiohttp.ClientTimeout | None = None,
        *,
        dpop_key: dpop.DpopKey | None = None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> TokenSet:
        """``extra``: repeatable parameters (``resource``, ``audience``), after the form."""
        tracing.annotate("oauth.grant_type", form["grant_type"])
        meta = await self.metadata()
        status, raw = await self._post_token(meta, form, limits, dpop_key, extra)
        if dpop_key is not None and status == 400 and _oauth_error(raw) == "use_dpop_nonce":
            # RFC 9449 8: the OP wants its nonce in the proof; it sent one, which is now ours.
            # The OP refused the request before acting on the grant: sending it again is safe.
            status, raw = await self._post_token(meta, form, limits, dpop_key, extra)
        if status >= 500:
            raise ProviderUnavailable(f"the OpenID Provider's token endpoint answered {status}")
        try:
            payload = _loads(raw)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise ProviderUnavailable(
                "the token endpoint answered something other than JSON"
            ) from exc
        if status != 200:
            error = str(payload.get("error", "invalid_request"))
            description = str(payload.get("error_description", ""))[:200]
            log.warning(
                "oidc.token_refused",
                extra={"event": "oidc.token_refused", "grant": form["grant_type"], "error": error},
            )
            if error == "invalid_grant":
                raise InvalidGrant(description or error)
            raise TokenRequestRefused(error, description)
        try:
            return TokenSet.parse(payload, self._clock(), dpop=dpop_key is not None)
        except ValueError as exc:
            log.warning(
                "oidc.token_response_refused",
                extra={"event": "oidc.token_response_refused", "grant": form["grant_type"],
                       "reason": str(exc)},
            )  # fmt: skip
            raise TokenRequestRefused("invalid_response", str(exc)) from exc

    async def _post_token(
        self,
        meta: ProviderMetadata,
        form: dict[str, str],
        limits: aiohttp.ClientTimeout | None,
        dpop_key: dpop.DpopKey | None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> tuple[int, bytes]:
        """One POST to the token endpoint (a new client assertion and DPoP proof each time)."""
        body, headers = self._client_auth(form, meta)
        headers["Accept"] = "application/json"
        data: dict[str, str] | list[tuple[str, str]] = [*body.items(), *extra] if extra else body
        if dpop_key is not None:
            headers["DPoP"] = self._dpop_proof(dpop_key, "POST", meta.token_endpoint)
        try:
            async with self._http.post(
                meta.token_endpoint, data=data, headers=headers, timeout=limits or self._timeout
            ) as resp:
                status = resp.status
                tracing.annotate("http.response.status_code", status)
                if dpop_key is not None:
                    self._dpop_nonces.note(_origin(meta.token_endpoint), resp.headers)
                return status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                "the OpenID Provider's token endpoint is unreachable"
            ) from exc

    def _client_auth(
        self, form: dict[str, str], meta: ProviderMetadata
    ) -> tuple[dict[str, str], dict[str, str]]:
        method = self.settings.token_endpoint_auth_method
        if method == "client_secret_basic":
            # RFC 6749 2.3.1: both parts are form-urlencoded before base64.
            secret = self._secret
            pair = f"{quote(self.client_id, safe='')}:{quote(secret, safe='')}"
            basic = base64.b64encode(pair.encode()).decode()
            return form, {"Authorization": f"Basic {basic}"}
        if method == "client_secret_post":
            return {
                **form,
                "client_id": self.client_id,
                "client_secret": self._secret,
            }, {}
        assert self._signing_key is not None
        now = int(self._clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": meta.token_endpoint,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + 60,
        }
        header: dict[str, Any] = {"alg": _signing_alg(self._signing_key)}
        if self._signing_key.kid:
            header["kid"] = self._signing_key.kid
        assertion = jwt.encode(header, claims, self._signing_key)
        return {
            **form,
            "client_id": self.client_id,
            "client_assertion_type": _ASSERTION_TYPE,
            "client_assertion": assertion,
        }, {}

    @metrics.op_call(metrics.get_endpoint)
    async def _get_json(self, url: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        try:
            async with self._http.get(url, headers=headers, timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise ProviderUnavailable(f"{url} answered {resp.status}")
                data = _loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ProviderUnavailable(f"{url} is unreachable or not JSON") from exc
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{url} did not answer a JSON object")
        return data

    # -- JWT validation ---------------------------------------------------------------------

    @tracing.traced("bff.oidc.id_token_validation")
    async def validate_id_token(
        self, id_token: str, *, nonce: str | None, expected_sub: str | None = None
    ) -> dict[str, Any]:
        """OpenID Connect Core 3.1.3.7 (and 12.2 for a refreshed ID token: ``nonce=None``)."""
        claims = await self._verify_jwt(id_token, solicited=True)
        self._check_common(claims)
        now = self._clock()
        exp = claims.get("exp")
        if not _is_number(exp):
            raise InvalidToken("the ID token has no exp")
        if exp + self.settings.clock_skew < now:
            raise InvalidToken("the ID token has expired")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise InvalidToken("the ID token has no sub")
        if expected_sub is not None and claims["sub"] != expected_sub:
            raise InvalidToken("the refreshed ID token is for another subject")
        if nonce is not None and claims.get("nonce") != nonce:
            raise InvalidToken("the ID token's nonce does not match this login")
        return claims

    async def validate_logout_token(self, token: str) -> dict[str, Any]:
        """Back-Channel Logout 1.0, 2.6. The caller checks ``jti`` replay in the store."""
        claims = await self._verify_jwt(token, solicited=False)
        self._check_common(claims)
        exp = claims.get("exp")  # REQUIRED since Back-Channel Logout 1.0 final (2.4)
        if not _is_number(exp):
            raise InvalidToken("the logout token has no exp")
        if exp + self.settings.clock_skew < self._clock():
            raise InvalidToken("the logout token has expired")
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
            raise InvalidToken("the logout token lacks the back-channel logout event")
        if "nonce" in claims:
            raise InvalidToken("a logout token must not contain a nonce")
        if not isinstance(claims.get("jti"), str) or not claims["jti"]:
            raise InvalidToken("the logout token has no jti")
        sid, sub = claims.get("sid"), claims.get("sub")
        if not (isinstance(sid, str) and sid) and not (isinstance(sub, str) and sub):
            raise InvalidToken("the logout token names neither sid nor sub")
        return claims

    def _check_common(self, claims: Mapping[str, Any]) -> None:
        if claims.get("iss") != self.issuer:
            raise InvalidToken("the token was issued by another issuer")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self.client_id not in audiences:
            raise InvalidToken("the token is not meant for this client (aud)")
        # Core 3.1.3.7 (3): reject audiences we do not trust; (4)-(5): azp must be us.
        if any(a != self.client_id for a in audiences):
            raise InvalidToken("the token lists audiences this client does not trust")
        if "azp" in claims and claims["azp"] != self.client_id:
            raise InvalidToken("the token's azp is another client")
        iat = claims.get("iat")
        if not _is_number(iat):
            raise InvalidToken("the token has no iat")
        if iat > self._clock() + self.settings.clock_skew:
            raise InvalidToken("the token was issued in the future (iat)")

    async def _verify_jwt(self, token: str, *, solicited: bool) -> dict[str, Any]:
        """Check the signature against the OP's published keys; the claims, unchecked.

        A token that the cached key set does not verify (unknown ``kid``, no ``kid``, or a known
        ``kid`` whose key material changed: the OP rotated) is judged again against a key set
        fetched *after* it failed. ``solicited`` tokens come from the OP's token endpoint, in
        answer to us: each gets that refetch, shared with any concurrent caller, and never
        waits for a rate limit, so a rotation never fails a login or a refresh. Unsolicited
        tokens (back-channel logout tokens, which anyone can POST) only join a fetch in flight
        or start one at most once per ``jwks_refetch_interval``: forged ``kid`` values cannot
        make us a JWKS request amplifier, and cannot use up anything a login needs.
        """
        if not isinstance(token, str) or len(token) > _MAX_JWT or token.count(".") != 2:
            raise InvalidToken("not a signed JWT (encrypted or malformed)")
        try:
            header = jws.extract_compact(token.encode()).headers()
        except (JoseError, ValueError, TypeError) as exc:
            raise InvalidToken("the token is not a well-formed JWS") from exc
        alg = header.get("alg")
        meta = await self.metadata()
        allowed = [
            a
            for a in self.settings.id_token_algs
            if not meta.id_token_algs or a in meta.id_token_algs
        ]
        # Asymmetric only, whatever the settings say: never "none", never an HMAC whose
        # "secret" would be the OP's public key.
        if not isinstance(alg, str) or alg not in allowed or _kty_for(alg) is None:
            raise InvalidToken(f"the token's algorithm {alg!r} is not allowed")
        raw_kid = header.get("kid")
        kid = raw_kid if isinstance(raw_kid, str) else None
        failed_at = self._jwks_started  # a fetch numbered above this one started after now
        claims, known = self._verify_cached(token, kid, alg)
        if claims is None and solicited and self._jwks_fetch is not None:
            # A fetch under way often brings the very key (a rotation fails many tokens at once).
            await asyncio.shield(self._jwks_fetch[1])
            claims, known = self._verify_cached(token, kid, alg)
        if claims is None:
            if solicited:
                await self._jwks_fetched_after(failed_at)
            elif not await self._jwks_refetch_unsolicited():
                self._refuse(known)
            claims, known = self._verify_cached(token, kid, alg)
        if claims is None:
            self._refuse(known)
        return claims

    @staticmethod
    def _refuse(known: bool) -> NoReturn:
        if known:
            raise InvalidToken("the token's signature is invalid")
        raise InvalidToken("the token is signed with a key the OP does not publish")

    def _verify_cached(
        self, token: str, kid: str | None, alg: str
    ) -> tuple[dict[str, Any] | None, bool]:
        """(claims or None, whether any cached key could have signed it)."""
        candidates = self._keys_for(kid, alg)
        for key in candidates:
            try:
                return dict(jwt.decode(token, key, algorithms=[alg]).claims), True
            except (JoseError, ValueError, TypeError):
                continue
        return None, bool(candidates)

    def _keys_for(self, kid: str | None, alg: str) -> list[RSAKey | ECKey | OKPKey]:
        """The published signing keys that may have signed a token (all of its type, no kid)."""
        if self._jwks is None:
            return []
        kty = _kty_for(alg)
        return [
            key
            for key in self._jwks.keys
            if isinstance(key, RSAKey | ECKey | OKPKey)
            and key.key_type == kty
            and key.get("use") in (None, "sig")
            and (kid is None or key.kid == kid)
        ]

    async def _jwks_fetched_after(self, number: int) -> None:
        """Wait for a JWKS fetch that started after fetch ``number``: the newest one in flight,
        or a new one. Concurrent callers share it; no rate limit applies."""
        if self._jwks_number > number:
            return  # one finished meanwhile
        fetch = self._jwks_fetch
        if fetch is None or fetch[0] <= number:
            fetch = self._start_jwks_fetch()
        await asyncio.shield(fetch[1])

    async def _jwks_refetch_unsolicited(self) -> bool:
        """Join the fetch in flight, or start one if the rate limit allows; False: neither."""
        fetch = self._jwks_fetch
        if fetch is None:
            if self._clock() - self._jwks_fetched_at < self.settings.jwks_refetch_interval:
                return False
            fetch = self._start_jwks_fetch()
        await asyncio.shield(fetch[1])
        return True

    def _start_jwks_fetch(self) -> tuple[int, asyncio.Future[None]]:
        self._jwks_started += 1
        self._jwks_fetched_at = self._clock()
        number = self._jwks_started
        fetch = (number, asyncio.ensure_future(self._fetch_jwks(number)))
        self._jwks_fetch = fetch

        def done(task: asyncio.Future[None]) -> None:
            if self._jwks_fetch is fetch:
                self._jwks_fetch = None
            if not task.cancelled():
                task.exception()  # retrieved: every waiter got it already

        fetch[1].add_done_callback(done)
        return fetch

    async def _fetch_jwks(self, number: int) -> None:
        meta = await self.metadata()
        doc = await self._get_json(meta.jwks_uri)
        try:
            # Only public asymmetric keys: an "oct" key in a JWKS would be an HMAC trap.
            keys = [
                k
                for k in doc.get("keys", [])
                if isinstance(k, dict) and k.get("kty") in ("RSA", "EC", "OKP")
            ]
            jwks = KeySet.import_key_set({"keys": keys})
        except (JoseError, ValueError, TypeError) as exc:
            raise ProviderUnavailable("the OP's JWKS could not be read") from exc
        if number > self._jwks_number:  # fetches may overlap: the newest answer wins
            self._jwks, self._jwks_number = jwks, number


_PROTOCOL_CLAIMS = frozenset(
    {"nonce", "at_hash", "c_hash", "s_hash", "aud", "azp", "exp", "iat", "nbf", "jti", "sid"}
)


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a compact JWS claims, *unverified*: only to choose which provider's keys and
    rules judge it (the chosen provider checks ``iss`` again, signed). None when unreadable."""
    if not isinstance(token, str) or len(token) > _MAX_JWT or token.count(".") != 2:
        return None
    try:
        claims = json.loads(jws.extract_compact(token.encode()).payload)
    except (JoseError, ValueError, TypeError, RecursionError):  # anyone may post one: never 500
        return None
    iss = claims.get("iss") if isinstance(claims, dict) else None
    return iss if isinstance(iss, str) else None


def user_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The claims worth showing the SPA: about the user, not about the token that carried them."""
    return {k: v for k, v in claims.items() if k not in _PROTOCOL_CLAIMS}


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


_ERROR_CODE: Final = re.compile(r"[a-z0-9_]{1,64}")


def _loads(raw: bytes | str) -> Any:
    """``json.loads`` for an OP's answers: a document nested too deeply for the parser
    (``RecursionError``) is refused like any other bad JSON, never a 500."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _oauth_error(raw: bytes) -> str | None:
    """The ``error`` of an OAuth error answer, or None."""
    try:
        payload = _loads(raw)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, str) else None


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kty_for(alg: str) -> str | None:
    """The JWK key type an asymmetric JWS algorithm needs; None for anything else (HS*, none)."""
    if alg.startswith(("RS", "PS")):
        return "RSA"
    if alg.startswith("ES"):
        return "EC"
    if alg in ("EdDSA", "Ed25519", "Ed448"):
        return "OKP"
    return None


def _signing_alg(key: RSAKey | ECKey | OKPKey) -> str:
    if isinstance(key, RSAKey):
        return "RS256"
    if isinstance(key, ECKey):
        return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}[key.curve_name]
    return "EdDSA"


def _load_private_key(path: Path, kid: str | None) -> RSAKey | ECKey | OKPKey:
    data = path.read_bytes()
    params: Any = {"kid": kid} if kid else None
    if data.lstrip().startswith(b"{"):
        jwk = json.loads(data)
        for cls in (RSAKey, ECKey, OKPKey):
            if jwk.get("kty") == cls.key_type:
                return cls.import_key(jwk, params)
        raise ValueError("unsupported private key type")
    for cls in (RSAKey, ECKey, OKPKey):
        try:
            return cls.import_key(data, params)
        except (JoseError, ValueError, TypeError):
            continue
    raise ValueError(f"{path} holds no RSA, EC or OKP private key")
