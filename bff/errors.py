"""The one error hierarchy of bff; the error middleware turns it into OAuth-shaped JSON.

::

    BffError                    status  error
      BadRequest                400     invalid_request
        InvalidReturnTo         400     invalid_return_to
        LoginFailed             400     login_failed (state, code, iss, ID token problems)
        PathRejected            400     invalid_path
        MethodOverrideRefused   400     method_override
        UnsupportedCharset      400     unsupported_charset
      NoSession                 401     login_required
        SessionExpired          401     session_expired
      Forbidden                 403     csrf_failed
        InsufficientScope       403     insufficient_scope
        UntrustedEdge           403     untrusted_edge
      NotFound                  404     not_found
      MethodNotAllowed          405     method_not_allowed
      RateLimited               429     rate_limited (+ Retry-After)
      UpstreamFailed            502     upstream_error
      Unavailable               503     temporarily_unavailable (+ Retry-After)
        StoreUnavailable        503     store_unavailable
        ProviderUnavailable     503     provider_unavailable
      UpstreamTimeout           504     upstream_timeout

Errors raised below the HTTP layer (store, OIDC client) are translated into these at their seam, so
handlers never see ``redis`` or ``aiohttp.ClientError`` exceptions.
"""

from __future__ import annotations

import math
from typing import ClassVar


class BffError(Exception):
    status: ClassVar[int] = 500
    error: ClassVar[str] = "server_error"
    description: ClassVar[str] = "internal error"

    def __init__(self, description: str | None = None) -> None:
        self.error_description = description or self.description
        super().__init__(self.error_description)

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.error_description}


class BadRequest(BffError):
    status = 400
    error = "invalid_request"
    description = "the request is malformed"


class InvalidReturnTo(BadRequest):
    error = "invalid_return_to"
    description = "returnTo must be a relative path on this origin"


class LoginFailed(BadRequest):
    error = "login_failed"
    description = "the login could not be completed"


class PathRejected(BadRequest):
    error = "invalid_path"
    description = "the path is not allowed"


class MethodOverrideRefused(BadRequest):
    error = "method_override"
    description = "a method override parameter is not accepted on this route"


class UnsupportedCharset(BadRequest):
    error = "unsupported_charset"
    description = "a body checked on this route must be UTF-8 (or ASCII) and say so only once"


class NoSession(BffError):
    status = 401
    error = "login_required"
    description = "no live session"


class SessionExpired(NoSession):
    error = "session_expired"
    description = "the session has ended; log in again"


class Forbidden(BffError):
    status = 403
    error = "csrf_failed"
    description = "anti-forgery check failed"


class InsufficientScope(Forbidden):
    error = "insufficient_scope"
    description = "the session lacks a scope this route needs"


class UntrustedEdge(Forbidden):
    error = "untrusted_edge"
    description = "only a proxy in trusted_proxies may ask this"


class NotFound(BffError):
    status = 404
    error = "not_found"
    description = "no such endpoint"


class MethodNotAllowed(BffError):
    status = 405
    error = "method_not_allowed"
    description = "this method is not allowed on this route"


class RateLimited(BffError):
    status = 429
    error = "rate_limited"
    description = "too many requests from this address; retry later"

    def __init__(self, retry_after: float) -> None:
        super().__init__()
        self.retry_after = max(1, math.ceil(retry_after))  # whole seconds (RFC 9110, 10.2.3)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class UpstreamFailed(BffError):
    status = 502
    error = "upstream_error"
    description = "the upstream service failed"


class Unavailable(BffError):
    status = 503
    error = "temporarily_unavailable"
    description = "temporarily unavailable; retry later"
    retry_after: ClassVar[int] = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class StoreUnavailable(Unavailable):
    error = "store_unavailable"
    description = "the session store is unavailable"
    retry_after = 2


class ProviderUnavailable(Unavailable):
    error = "provider_unavailable"
    description = "the OpenID Provider is unavailable"


class UpstreamTimeout(BffError):
    status = 504
    error = "upstream_timeout"
    description = "the upstream service did not answer in time"
