"""Short-lived signed tokens and the worker login proof. Pure functions over bytes and clocks.

A route token is ``base64url(claims JSON) "." base64url(HMAC-SHA256(key, claims part))``. Central
signs it for one cluster (``aud``) with a key that cluster shares; the cluster checks signature,
expiry and audience itself, without calling central. Signatures are compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from typing import Any

# Clock skew tolerated between central and a cluster when checking ``exp`` and ``nbf``.
LEEWAY_S = 5.0
MAX_TOKEN_LENGTH = 4096


class TokenError(ValueError):
    """The token is not acceptable; the message says why (never echoes the key)."""


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def sign_token(claims: dict[str, Any], key: bytes, ttl_s: float = 300.0, now: float | None = None) -> str:
    t = time.time() if now is None else now
    body = {"iat": int(t), "exp": int(t + ttl_s), **claims}
    part = _b64e(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
    sig = hmac.new(key, part.encode("ascii"), hashlib.sha256).digest()
    return f"{part}.{_b64e(sig)}"


def verify_token(
    token: str, key: bytes, audience: str | None = None, now: float | None = None
) -> dict[str, Any]:
    """Claims of a valid token; ``TokenError`` saying what is wrong otherwise."""
    if not token or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        raise TokenError("malformed token")
    part, sig = token.split(".")
    try:
        given = _b64d(sig)
        raw = _b64d(part)
    except (ValueError, TypeError):
        raise TokenError("malformed token") from None
    expected = hmac.new(key, part.encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(given, expected):
        raise TokenError("bad token signature")
    try:
        claims = json.loads(raw)
    except ValueError:
        raise TokenError("malformed token") from None
    if not isinstance(claims, dict):
        raise TokenError("malformed token")
    t = time.time() if now is None else now
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or t > exp + LEEWAY_S:
        raise TokenError("token expired")
    nbf = claims.get("nbf")
    if isinstance(nbf, (int, float)) and t + LEEWAY_S < nbf:
        raise TokenError("token not yet valid")
    if audience is not None and claims.get("aud") != audience:
        raise TokenError(f"token is for another cluster ({claims.get('aud')!r}), not {audience!r}")
    return claims


def new_nonce() -> bytes:
    return os.urandom(32)


def login_proof(secret: bytes, nonce: bytes, worker_id: str) -> bytes:
    """What a worker sends to prove it knows the cluster secret without sending the secret."""
    return hmac.new(
        secret, b"shoal-worker-login\x00" + nonce + b"\x00" + worker_id.encode(), hashlib.sha256
    ).digest()


def check_login_proof(secret: bytes, nonce: bytes, worker_id: str, proof: Any) -> bool:
    if not isinstance(proof, bytes):
        return False
    return hmac.compare_digest(proof, login_proof(secret, nonce, worker_id))


def constant_time_in(candidate: str, allowed: list[str]) -> bool:
    """True when ``candidate`` equals one of ``allowed``; every comparison runs, in constant time."""
    c = candidate.encode()
    ok = False
    for a in allowed:
        ok |= hmac.compare_digest(c, a.encode())
    return ok
