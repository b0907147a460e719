"""Who is calling central: HTTP Basic for every account kind, device session tokens, and the
throttling of failed logins.

A password check runs scrypt (slow on purpose), so a successful one is remembered for
``auth_cache_s`` (``passwords.VerifiedCache``); at most four run at once, bounding memory and CPU.
Failed logins are counted per account and per source address (``security/throttle.py``); past a few,
a login is refused with 429 before the hash runs, so a guessing client costs a refusal, not a KDF.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time

from shoal.central import passwords
from shoal.central.config import CentralConfig
from shoal.central.db import Store
from shoal.central.errors import HttpError
from shoal.central.keys import Keys
from shoal.protocol.central_messages import Session
from shoal.security.throttle import Throttle
from shoal.security.tokens import TokenError, sign_token, verify_token

log = logging.getLogger("shoal.central")

SESSION_AUDIENCE = "shoal-central"


def _challenge(kind: str) -> dict[str, str]:
    return {"www-authenticate": f'Basic realm="shoal central ({kind})", charset="UTF-8"'}


def _parse_basic(value: str) -> tuple[str, str]:
    try:
        raw = base64.b64decode(value[6:].strip().encode("latin-1"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError):
        raise HttpError(401, "malformed Basic credentials") from None
    name, sep, password = raw.partition(":")
    if not sep or not name:
        raise HttpError(401, "malformed Basic credentials (expected name:password)")
    return name, password


class Authenticator:
    def __init__(self, store: Store, keys: Keys, config: CentralConfig) -> None:
        self.store = store
        self.keys = keys
        self.cache_s = config.auth_cache_s
        self.session_ttl_s = config.session_ttl_s
        self.failures = 0  # password or session checks that failed
        self.throttled = 0  # logins refused at once (429)
        # An address may fail more often than an account (several devices behind one NAT).
        self.account_throttle = Throttle(free=3, base_s=2.0, cap_s=300.0)
        self.address_throttle = Throttle(free=10, base_s=1.0, cap_s=300.0)
        self.verified = passwords.VerifiedCache(config.auth_cache_s)
        self._kdf_slots = asyncio.Semaphore(4)  # bound memory (16 MiB each) and CPU spent on scrypt
        self._exists: dict[tuple[str, str], float] = {}
        # Session tokens already verified: token -> (device, expiry). A device sends the same token
        # for an hour; checking its signature once is enough.
        self._sessions: dict[str, tuple[str, float]] = {}

    async def hash(self, password: str) -> str:
        async with self._kdf_slots:
            return await asyncio.to_thread(passwords.hash_password, password)

    def session(self, device: str) -> Session:
        """A device session token, good on every replica until it expires."""
        ttl = self.session_ttl_s
        token = sign_token({"aud": SESSION_AUDIENCE, "sub": device, "kind": "device"}, self.keys.session, ttl)
        return Session(token=token, expires_in=int(ttl), kind="device")

    def forget(self) -> None:
        """An account was removed: its cached credentials and sessions stop working here at once."""
        self.verified.forget_all()
        self._exists.clear()
        self._sessions.clear()

    async def check(self, authorization: str | None, address: str, kind: str, session: bool = False) -> str:
        """The account name behind the ``Authorization`` header, or ``HttpError`` 401 / 429."""
        if authorization is None:
            hint = "Basic (name:password)" + (" or Bearer <session token>" if session else "")
            raise HttpError(401, f"missing credentials: send Authorization: {hint}", _challenge(kind))
        scheme = authorization[:7].lower()
        if session and scheme == "bearer ":
            return await self._session(authorization[7:].strip(), kind)
        if scheme[:6] != "basic ":
            raise HttpError(401, "unsupported credentials: send Authorization: Basic", _challenge(kind))
        name, password = _parse_basic(authorization)
        if self.verified.hit(kind, name, password):
            return name
        # Throttled before the slow hash runs.
        now = time.monotonic()
        account = (kind, name[:128])
        wait = max(self.account_throttle.retry_after(account, now), self.address_throttle.retry_after(address, now))
        if wait > 0:
            self.throttled += 1
            raise HttpError(
                429, f"too many failed logins; try again in {wait:.0f} s", {"retry-after": str(max(1, round(wait)))}
            )
        stored = await self.store.password_hash(kind, name) if len(name) <= 128 else None
        async with self._kdf_slots:
            if stored is None:
                # An unknown name costs as much as a wrong password: timing says nothing about names.
                await asyncio.to_thread(passwords.burn_time, password)
                ok = False
            else:
                ok = await asyncio.to_thread(passwords.verify_password, password, stored)
        if not ok:
            self._failed(kind, name[:128], account, address)
            raise HttpError(401, f"wrong name or password for a {kind} account", _challenge(kind))
        self.account_throttle.succeeded(account)
        self.verified.add(kind, name, password)
        return name

    def _failed(self, kind: str, name: str, account: tuple[str, str], address: str) -> None:
        self.failures += 1
        now = time.monotonic()
        by_account = self.account_throttle.failed(account, now)
        by_address = self.address_throttle.failed(address, now)
        # One line per throttled source, not one per guess.
        if by_account.failures == 1:
            log.warning("refused %s credentials for %r from %s", kind, name, address)
        for v, what in ((by_account, f"{kind} account {name!r}"), (by_address, f"address {address}")):
            if v.newly_blocked:
                log.warning("%d failed logins for %s; refusing its logins for %.0f s", v.failures, what, v.blocked_s)

    async def _session(self, token: str, kind: str) -> str:
        known = self._sessions.get(token)
        if known is not None and time.time() <= known[1]:
            sub = known[0]
        else:
            try:
                claims = verify_token(token, self.keys.session, audience=SESSION_AUDIENCE)
            except TokenError as e:
                self.failures += 1
                raise HttpError(401, f"invalid session token: {e}; log in again") from None
            sub = claims.get("sub")
            if claims.get("kind") != kind or not isinstance(sub, str):
                raise HttpError(401, "invalid session token: not a device session")
            if len(self._sessions) >= 100_000:
                self._sessions.clear()
            self._sessions[token] = (sub, float(claims["exp"]))
        await self._still_exists(kind, sub)
        return sub

    async def _still_exists(self, kind: str, name: str) -> None:
        # A session outlives nothing: once its account is removed it stops working within the cache time.
        key = (kind, name)
        now = time.monotonic()
        if self._exists.get(key, 0.0) > now:
            return
        if await self.store.password_hash(kind, name) is None:
            raise HttpError(401, f"invalid session token: no {kind} account named {name!r}")
        if len(self._exists) > 100_000:
            self._exists.clear()
        self._exists[key] = now + self.cache_s
