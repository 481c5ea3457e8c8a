"""What DPoP costs per upstream call: ``python -m bench.dpop``.

Times, in this process, what ``oidc.dpop: true`` adds to a proxied request: one proof
(``bff.dpop.proof``: a new ``jti``, ``ath``, one signature through joserfc) and the headers built
around it (``bff.dpop.upstream_auth``), next to the bare signature with ``cryptography``, and what
the per-session key cache saves (importing the sealed JWK again). Prints microseconds of CPU per
call, the best of a few rounds of a fixed count; asserts nothing.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bff import dpop

N = 2_000
ROUNDS = 5
TOKEN = "a" * 43  # the length of a typical opaque access token
URL = "http://orders.internal:8080/v1/orders/42?page=2"


def best(call: Callable[[], object], n: int = N) -> float:
    """Microseconds of CPU per call, the best of ``ROUNDS`` rounds of ``n`` calls."""
    fastest = float("inf")
    for _ in range(ROUNDS):
        start = time.process_time()
        for _ in range(n):
            call()
        fastest = min(fastest, (time.process_time() - start) / n)
    return fastest * 1e6


def show(label: str, micros: float) -> None:
    print(f"{label:<44} {micros:8.1f} us")


def measure(alg: str) -> None:
    key = dpop.generate(alg)
    record = key.record()
    origin = "http://orders.internal:8080"
    show(
        f"{alg} proof (bff.dpop.proof)",
        best(lambda: dpop.proof(key, "GET", URL, access_token=TOKEN)),
    )
    show(
        f"{alg} upstream headers (upstream_auth)",
        best(lambda: dpop.upstream_auth(key, "GET", URL, origin, TOKEN)),
    )
    show(
        f"{alg} key import (saved by the cache)",
        best(lambda: dpop.DpopKey.from_record(record), 500),
    )
    show(f"{alg} key generation (once per login)", best(lambda: dpop.generate(alg), 200))


def main() -> None:
    warnings.simplefilter("ignore")  # joserfc flags EdDSA as deprecated (RFC 9864) on each use
    raw = ec.generate_private_key(ec.SECP256R1())
    payload = b"x" * 200
    show(
        "bare P-256 signature (cryptography)",
        best(lambda: raw.sign(payload, ec.ECDSA(hashes.SHA256()))),
    )
    for alg in ("ES256", "EdDSA"):
        measure(alg)


if __name__ == "__main__":
    main()
