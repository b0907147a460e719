"""Short-lived signed tokens and the worker login proof. Pure functions over bytes and clocks.

A route token is a JSON Web Token (RFC 7519) signed with HMAC-SHA256 (``HS256``), made and checked
by PyJWT: any JWT library can read one. Central signs it for one cluster (``aud``) with a key that
cluster shares; the cluster checks signature, expiry and audience itself, without calling central.
PyJWT checks the format and the signature (in constant time, ``HS256`` only); expiry, "not before" and
audience are checked here against the caller's clock, with messages that say what is wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
import warnings
from typing import Any

try:
    import jwt
except ImportError:  # a worker needs only the login proof below, not route tokens
    jwt = None  # type: ignore[assignment]

# Clock skew tolerated between central and a cluster when checking ``exp`` and ``nbf``.
LEEWAY_S = 5.0
MAX_TOKEN_LENGTH = 4096
ALGORITHM = "HS256"
# Only the signature is PyJWT's to check; the time rules are ours (they take the caller's clock).
_SIGNATURE_ONLY = {"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False}
if jwt is not None:
    # Central's keys are 32 bytes; a shorter key is one an operator chose (--token-key), for tests.
    warnings.filterwarnings("ignore", category=jwt.warnings.InsecureKeyLengthWarning)


def _need_jwt() -> None:
    if jwt is None:
        raise ModuleNotFoundError("route tokens need PyJWT: pip install 'shoal[gateway]'", name="jwt")


class TokenError(ValueError):
    """The token is not acceptable; the message says why (never echoes the key)."""


def sign_token(claims: dict[str, Any], key: bytes, ttl_s: float = 300.0, now: float | None = None) -> str:
    _need_jwt()
    t = time.time() if now is None else now
    return jwt.encode({"iat": int(t), "exp": int(t + ttl_s), **claims}, key, algorithm=ALGORITHM)


def verify_token(
    token: str, key: bytes, audience: str | None = None, now: float | None = None
) -> dict[str, Any]:
    """Claims of a valid token; ``TokenError`` saying what is wrong otherwise."""
    _need_jwt()
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("malformed token")
    try:
        claims = jwt.decode(token, key, algorithms=[ALGORITHM], options=_SIGNATURE_ONLY)
    except jwt.InvalidSignatureError:
        raise TokenError("bad token signature") from None
    except jwt.InvalidTokenError:
        raise TokenError("malformed token") from None
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
