"""The demo's OpenID Provider: PyPI's ``oidc-provider-mock``, run in a thread on 127.0.0.1.

It is a real OP that we do not write (authlib underneath): discovery, JWKS, an authorization
endpoint with a login form a person can use (type any user name, no password; the predefined
users are one-click buttons), ID tokens, refresh tokens, userinfo and RP-initiated logout. It has
no revocation endpoint, and it accepts but does not check PKCE; bff sends S256 anyway.

It runs in a thread of the demo's one process, not as a child process, so it is not a
``tests.support.procs.ChildProcess`` (and ``demo/`` imports nothing from ``tests/``): binding is
synchronous, so it serves when the constructor returns (no readiness wait, no log files), and
Ctrl-C on ``make run`` stops everything at once; a child could outlive a killed demo and hold
its port.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta
from types import TracebackType
from typing import Self

__all__ = ["MockProvider"]


class MockProvider:
    """``with MockProvider(port, users=..., access_ttl=...) as op: op.issuer``."""

    def __init__(
        self,
        port: int,
        *,
        users: dict[str, dict[str, object]],
        access_ttl: float,
        host: str = "127.0.0.1",
    ) -> None:
        # The mock refuses plain http unless told this is a development setup.
        os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")
        import oidc_provider_mock  # type: ignore[import-untyped]
        import werkzeug.serving

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log per request
        app = oidc_provider_mock.app(
            require_nonce=True,
            issue_refresh_token=True,
            access_token_max_age=timedelta(seconds=access_ttl),
            user_claims=[oidc_provider_mock.User(sub=s, claims=c) for s, c in users.items()],
        )
        try:
            self._server = werkzeug.serving.make_server(host, port, app, threaded=True)
        except SystemExit:  # werkzeug prints "Port ... is in use" and exits; we report instead
            raise OSError(f"cannot listen on {host}:{port} for the OpenID Provider") from None
        self.issuer = f"http://{host}:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
