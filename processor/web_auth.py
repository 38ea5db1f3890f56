"""Bearer-token access control for the worker's data endpoints (``GET /usage``).

When ``CHUNKSTITCH_API_TOKEN`` is set, a request must carry ``Authorization: Bearer
<token>``; the token is compared in constant time (:func:`hmac.compare_digest`) and never
logged, neither the expected one nor what a client sent. ``/healthz``, ``/readyz`` and
``/metrics`` stay open (probes and Prometheus scrape them; keep the port inside the
cluster, see the NetworkPolicy in deploy/k8s/overlays/production).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from pydantic import SecretStr

from processor.logs import get_logger

__all__ = ["Denied", "check_bearer"]

log = get_logger("chunkstitch.web_auth")


@dataclass(frozen=True)
class Denied:
    """What to answer instead: status, JSON body and headers (RFC 6750)."""

    status: int
    body: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)


def check_bearer(
    authorization: str | None, token: SecretStr | None, *, path: str = "/usage"
) -> Denied | None:
    """``None`` when the request may go on (no token configured, or the right one sent),
    else the 401 to return."""
    if token is None or not token.get_secret_value():
        return None
    scheme, _, sent = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not sent.strip():
        log.warning("request refused: no bearer token", path=path)
        return Denied(
            401,
            {"error": f"{path} needs 'Authorization: Bearer <token>' (CHUNKSTITCH_API_TOKEN)"},
            {"WWW-Authenticate": 'Bearer realm="chunkstitch"'},
        )
    if not hmac.compare_digest(
        sent.strip().encode(), token.get_secret_value().encode()
    ):  # constant time
        log.warning("request refused: wrong bearer token", path=path)
        return Denied(
            401,
            {"error": f"{path}: the bearer token is not valid"},
            {"WWW-Authenticate": 'Bearer realm="chunkstitch", error="invalid_token"'},
        )
    return None
