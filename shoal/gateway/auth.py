"""Who is calling the gateway, and what they may do: credentials to principals, principals to
permissions. No sockets; the HTTP app calls ``Authenticator.principal`` and ``permit`` per request.

Three roles (docs/security.md has the whole matrix):

* ``device``: a route token signed by central for one model (and version, if the device asked for
  one), or a static key declared ``device:MODEL[+MODEL...]:KEY``. It may run, read the metadata of and
  ask the readiness of those models only, ask whether the server is ready, and fetch its own stored
  results by the id it was given.
* ``scrape``: a static key declared ``scrape:KEY``; reads ``/metrics`` and nothing else.
* ``operator``: a static key declared ``operator:KEY``; everything (status, results, model
  management, metrics, every model).

A key declared without a role (``KEY``) is an operator's, as before roles existed; the gateway warns
about each at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass

from shoal.security.tokens import TokenError, verify_token

ROLES = ("operator", "scrape", "device")
_TOKEN_CACHE_MAX = 10_000

# What each action needs. Actions name what the endpoint does, for 403 messages.
ACTIONS: dict[str, tuple[str, frozenset[str]]] = {
    "server": ("read the server's metadata and readiness", frozenset({"operator", "device"})),
    "model": ("read a model's metadata and readiness", frozenset({"operator", "device"})),
    "infer": ("run inference", frozenset({"operator", "device"})),
    "metrics": ("read /metrics", frozenset({"operator", "scrape"})),
    "all_stats": ("read every model's statistics", frozenset({"operator", "scrape"})),
    "status": ("read /v2/status", frozenset({"operator"})),
    "results": ("list or read stored results", frozenset({"operator"})),
    "result": ("read a stored result", frozenset({"operator", "device"})),
    "repository": ("manage models (/v2/repository)", frozenset({"operator"})),
}


class AuthError(Exception):
    """401: no credentials, or credentials that are not valid."""


@dataclass(frozen=True, slots=True)
class Principal:
    role: str
    who: str  # "device:<name>" for a route token, "key:<8 hex of its SHA-256>" for a static key
    models: frozenset[str] | None = None  # a device's models; None: every model
    version: str | None = None  # a route token issued for one version
    expires: float = math.inf


OPEN = Principal("operator", "anonymous")  # --no-auth: local development only


def key_fingerprint(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_api_key(spec: str) -> tuple[str, Principal, bool]:
    """``operator:KEY``, ``scrape:KEY``, ``device:MODEL[+MODEL...]:KEY`` or a bare ``KEY`` (operator).
    Returns the key, its principal and whether the role was declared."""
    role, sep, rest = spec.partition(":")
    if not sep or role not in ROLES:
        if not spec:
            raise ValueError("empty API key")
        return spec, Principal("operator", key_fingerprint(spec)), False
    if role == "device":
        models, sep2, key = rest.partition(":")
        names = frozenset(m for m in models.split("+") if m)
        if not sep2 or not names or not key:
            raise ValueError("a device key is declared device:MODEL[+MODEL...]:KEY")
        return key, Principal("device", key_fingerprint(key), names), True
    if not rest:
        raise ValueError(f"empty key after '{role}:'")
    return rest, Principal(role, key_fingerprint(rest)), True


def permit(p: Principal, action: str, model: str | None = None, version: str | None = None) -> str | None:
    """None when ``p`` may do ``action`` (on ``model``/``version``), else why not (for a 403)."""
    what, roles = ACTIONS[action]
    if p.role not in roles:
        needs = " or ".join(sorted(roles))
        return f"forbidden: a {p.role} credential may not {what} (needs the {needs} role)"
    if model is not None and p.models is not None and model not in p.models:
        allowed = ", ".join(sorted(p.models))
        return f"forbidden: this credential is for model {allowed}, not '{model}'"
    if version is not None and p.version is not None and version != p.version:
        return f"forbidden: this credential is for version '{p.version}' of '{model}', not '{version}'"
    return None


class Authenticator:
    """Credentials to principals: static keys (compared in constant time) and route tokens signed by
    central (checked once, then cached until they expire)."""

    def __init__(self, keys: list[str], token_key: bytes | None, audience: str, no_auth: bool = False) -> None:
        self.no_auth = no_auth
        self.audience = audience
        self.token_key = token_key
        self.keys: list[tuple[bytes, Principal]] = []
        self.undeclared = 0  # keys given without a role
        for spec in keys:
            key, principal, declared = parse_api_key(spec)
            self.keys.append((key.encode(), principal))
            self.undeclared += not declared
        self._tokens: dict[str, Principal] = {}

    def set_token_key(self, key: bytes) -> None:
        """A new key from central: tokens verified with the old one are checked again."""
        self.token_key = key
        self._tokens.clear()

    def principal(self, authorization: bytes | None) -> Principal:
        if self.no_auth:
            return OPEN
        if not authorization or authorization[:7].lower() != b"bearer ":
            raise AuthError("missing credentials: send 'Authorization: Bearer <token>'")
        token = authorization[7:].decode("latin-1").strip()
        p = self._tokens.get(token)
        if p is not None:
            if time.time() <= p.expires:
                return p
            del self._tokens[token]
        found = self._static(token.encode("latin-1"))
        if found is not None:
            return found
        if self.token_key:
            try:
                claims = verify_token(token, self.token_key, audience=self.audience)
            except TokenError as e:
                raise AuthError(f"invalid token: {e}") from None
            model, sub, version = claims.get("model"), claims.get("sub"), claims.get("version")
            if not isinstance(model, str) or not isinstance(sub, str):
                raise AuthError("invalid token: it names no device and model")
            p = Principal(
                "device",
                "device:" + sub[:200],
                frozenset({model}),
                version if isinstance(version, str) else None,
                float(claims["exp"]),
            )
            if len(self._tokens) >= _TOKEN_CACHE_MAX:
                self._tokens.clear()
            self._tokens[token] = p
            return p
        raise AuthError("invalid credentials")

    def _static(self, candidate: bytes) -> Principal | None:
        found = None
        for key, principal in self.keys:  # every comparison runs, in constant time
            if hmac.compare_digest(candidate, key):
                found = principal
        return found
