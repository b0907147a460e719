"""Who is calling central: HTTP Basic for every account kind, device session tokens, device cookies,
and which password checks run at all.

A password check runs scrypt (slow on purpose), so a successful one is remembered for
``auth_cache_s`` (``passwords.VerifiedCache``); at most four run at once, bounding memory and CPU.
Which logins get a check is ``security/logins.py``'s policy: failed logins are counted per account
(whatever the address), a client that presents the device cookie it got at an earlier login is judged
by its own failures only, a name that does not exist costs no hash, and failed checks of untrusted
logins draw on a budget per process. A refused login is answered 429 before the hash runs.

While the database does not answer, credentials checked within ``STALE_S`` keep working (a device
routing every second is not refused for a database hang); anything else is 503 as before.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Hashable, Mapping
from typing import NoReturn

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from shoal.central import passwords
from shoal.central.config import CentralConfig
from shoal.central.db import Store
from shoal.central.errors import HttpError
from shoal.central.keys import Keys
from shoal.protocol.central_messages import Session, a_kind
from shoal.security.logins import Decision, LoginPolicy
from shoal.security.tokens import TokenError, sign_token, verify_token

log = logging.getLogger("shoal.central")

SESSION_AUDIENCE = "shoal-central"
COOKIE_AUDIENCE = "shoal-device-cookie"
COOKIE_HEADER = "shoal-device-cookie"  # request and response header (HTTP names are case-insensitive)
COOKIE_TTL_S = 30 * 86400.0
STALE_S = 300.0  # credentials checked this recently work while the database does not answer
# Failed password checks of untrusted logins, per central process: 1 a second, 10 at once.
GUESS_BUDGET_PER_S = 1.0
GUESS_BUDGET_BURST = 10.0
SUMMARY_EVERY_S = 60.0  # at most one log line this often for unknown names and the spent budget
# The database does not answer: down, unreachable, or over the query timeout (DatabaseTimeout).
DATABASE_DOWN = (DBAPIError, OSError, asyncio.TimeoutError, PoolTimeout)


# The account name, and a device cookie for the client after a full password check (a plain tuple:
# one is made per request).
Login = tuple[str, str | None]


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


class _OneAtATime:
    """An asyncio lock per key, kept only while someone holds or waits for it: the checks of one account
    run one after another, so a burst of guesses cannot all pass the throttle before the first fails."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Authenticator:
    def __init__(self, store: Store, keys: Keys, config: CentralConfig) -> None:
        self.store = store
        self.keys = keys
        self.cache_s = config.auth_cache_s
        self.stale_s = max(STALE_S, config.auth_cache_s)
        self.session_ttl_s = config.session_ttl_s
        self.failures = 0  # password checks (the hash ran) or session checks that failed
        self.unknown = 0  # logins refused for a name that does not exist (no hash ran)
        self.throttled = 0  # logins refused at once (429)
        self.stale = 0  # logins honoured from a stale check while the database did not answer
        self.policy = LoginPolicy(GUESS_BUDGET_PER_S, GUESS_BUDGET_BURST)
        self.verified = passwords.VerifiedCache(config.auth_cache_s, self.stale_s)
        self.outage = passwords.Outage()
        self.hash_times = passwords.HashTimes()
        self._kdf_slots = asyncio.Semaphore(4)  # bound memory (16 MiB each) and CPU spent on scrypt
        self._one_at_a_time = _OneAtATime()
        self._exists: dict[tuple[str, str], float] = {}  # account -> when the database last had it
        # Session tokens already verified: token -> (device, expiry). A device sends the same token
        # for an hour; checking its signature once is enough.
        self._sessions: dict[str, tuple[str, float]] = {}
        self._probe: asyncio.Task[None] | None = None
        self._logged: dict[str, float] = {}  # summary line -> when last logged
        self._unlogged_unknown = 0

    async def hash(self, password: str) -> str:
        async with self._kdf_slots:
            return await asyncio.to_thread(passwords.hash_password, password)

    def session(self, device: str) -> Session:
        """A device session token, good on every replica until it expires."""
        ttl = self.session_ttl_s
        token = sign_token({"aud": SESSION_AUDIENCE, "sub": device, "kind": "device"}, self.keys.session, ttl)
        return Session(token=token, expires_in=int(ttl), kind="device")

    def forget(self) -> None:
        """An account was removed: its cached credentials and sessions stop working here at once, even
        stale ones while the database does not answer."""
        self.verified.forget_all()
        self._exists.clear()
        self._sessions.clear()

    async def check(
        self,
        authorization: str | None,
        address: str,
        kind: str,
        session: bool = False,
        headers: Mapping[str, str] = {},
    ) -> Login:
        """The account behind the ``Authorization`` header (and a new device cookie after a full password
        check), or ``HttpError`` 401 / 429. ``headers``: the request's, read for the device cookie only
        when the password is to be checked (looking a header up costs as much as the rest of a cached
        login)."""
        if authorization is None:
            hint = "Basic (name:password)" + (" or Bearer <session token>" if session else "")
            raise HttpError(401, f"missing credentials: send Authorization: {hint}", _challenge(kind))
        scheme = authorization[:7].lower()
        if session and scheme == "bearer ":
            return await self._session(authorization[7:].strip(), kind), None
        if scheme[:6] != "basic ":
            raise HttpError(401, "unsupported credentials: send Authorization: Basic", _challenge(kind))
        name, password = _parse_basic(authorization)
        now = time.monotonic()
        if self.verified.hit(kind, name, password, now):
            return name, None
        if self.outage.down and self.verified.hit_stale(kind, name, password, now):
            return self._from_stale(kind, name), None
        account = (kind, name[:128])
        cookie = headers.get(COOKIE_HEADER)
        known = self._cookie_id(cookie, kind, name) if cookie else None
        # One check at a time per account (per cookie for a known client, so guesses do not delay it).
        async with self._one_at_a_time.hold(account if known is None else ("cookie", known)):
            if self.verified.hit(kind, name, password):  # the check this one waited for found it
                return name, None
            if self.outage.down and self.verified.hit_stale(kind, name, password):  # or found the outage
                return self._from_stale(kind, name), None
            return await self._check_password(kind, name, password, account, known, address)

    async def _check_password(
        self, kind: str, name: str, password: str, account: tuple[str, str], known: str | None, address: str
    ) -> Login:
        decision = self.policy.decide(account, known, time.monotonic())
        if decision.wait_s > 0:
            self._refuse(decision, kind, name, address)
        try:
            stored = await self.store.password_hash(kind, name) if len(name) <= 128 else None
        except DATABASE_DOWN as e:
            self.policy.cancelled(decision, time.monotonic())
            self._database_failed(e)
            if self.verified.hit_stale(kind, name, password):
                return self._from_stale(kind, name), None
            raise
        self._database_answered()
        if stored is None:
            # No hash for a name that does not exist: the answer waits as long as a check would take.
            await asyncio.sleep(self.hash_times.sample())
            self._failed(kind, name, account, address, decision, exists=False)
        t = time.perf_counter()
        async with self._kdf_slots:
            ok = await asyncio.to_thread(passwords.verify_password, password, stored)
        self.hash_times.record(time.perf_counter() - t)
        if not ok:
            self._failed(kind, name, account, address, decision, exists=True)
        self.policy.succeeded(account, decision, time.monotonic())
        self.verified.add(kind, name, password)
        return name, self._new_cookie(kind, name)

    # -------------------------------------------------------------------------------- cookies

    def _new_cookie(self, kind: str, name: str) -> str:
        nonce = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")
        claims = {"aud": COOKIE_AUDIENCE, "kind": kind, "sub": name, "jti": nonce}
        return sign_token(claims, self.keys.cookie, COOKIE_TTL_S)

    def _cookie_id(self, cookie: str, kind: str, name: str) -> str | None:
        """The nonce of a valid device cookie for this very account; None for any other (ignored: the
        login is then an untrusted one, not an error)."""
        try:
            claims = verify_token(cookie.strip(), self.keys.cookie, audience=COOKIE_AUDIENCE)
        except TokenError:
            return None
        jti = claims.get("jti")
        if claims.get("kind") != kind or claims.get("sub") != name or not isinstance(jti, str):
            return None
        return jti

    # ------------------------------------------------------------------------------- refusals

    def _refuse(self, decision: Decision, kind: str, name: str, address: str) -> NoReturn:
        self.throttled += 1
        if decision.why == "budget":
            self._summary(
                "budget",
                "failed password checks are over their budget (%g/s): refusing untrusted logins to accounts "
                "with recent failures for now (%s %r from %s, and others)",
                GUESS_BUDGET_PER_S,
                kind,
                name,
                address,
            )
            what = "too many failed logins at this central"
        else:
            what = "too many failed logins"
        wait = decision.wait_s
        raise HttpError(
            429,
            f"{what}; try again in {wait:.0f} s (a client that logged in before is let in when it sends "
            "the Shoal-Device-Cookie header it was given)",
            {"retry-after": str(max(1, round(wait)))},
        )

    def _failed(
        self, kind: str, name: str, account: tuple[str, str], address: str, decision: Decision, exists: bool
    ) -> NoReturn:
        verdict = self.policy.failed(account, decision, exists, time.monotonic())
        if exists or decision.cookie is not None:
            self.failures += 1
            what = f"{kind} account {name[:128]!r}" + (" with a device cookie" if decision.cookie else "")
            # One line per run of failures of an account, not one per guess.
            if verdict.failures == 1:
                log.warning("refused credentials for %s from %s", what, address)
            if verdict.newly_blocked:
                log.warning(
                    "%d failed logins for %s; refusing its %s for %.0f s",
                    verdict.failures,
                    what,
                    "logins with that cookie" if decision.cookie else "untrusted logins",
                    verdict.blocked_s,
                )
        else:
            self.unknown += 1
            self._unlogged_unknown += 1
            if self._summary(
                "unknown",
                "refused %d logins for %s names that do not exist in the last minute (the latest %r from %s)",
                self._unlogged_unknown,
                kind,
                name[:128],
                address,
            ):
                self._unlogged_unknown = 0
        raise HttpError(401, f"wrong name or password for {a_kind(kind)} account", _challenge(kind))

    def _summary(self, key: str, message: str, *args: object) -> bool:
        """Log ``message`` unless ``key`` was logged in the last ``SUMMARY_EVERY_S``: a flood of guesses
        makes a line a minute, not one per guess."""
        now = time.monotonic()
        if now - self._logged.get(key, -SUMMARY_EVERY_S) < SUMMARY_EVERY_S:
            return False
        self._logged[key] = now
        log.warning(message, *args)
        return True

    # ------------------------------------------------------------------------ database outages

    def _database_failed(self, e: BaseException) -> None:
        if self.outage.failed(time.monotonic()):
            log.warning(
                "the database does not answer (%s); honouring credentials checked in the last %.0f s meanwhile",
                str(e).splitlines()[0][:200] if str(e) else type(e).__name__,
                self.stale_s,
            )

    def _database_answered(self) -> None:
        if self.outage.answered():
            log.warning("the database answers again")

    def _from_stale(self, kind: str, name: str) -> str:
        """Honour a check made within the stale time, and find out (one query at a time, in the
        background) when the database is back."""
        self.stale += 1
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_database(kind, name), name="database-probe")
        return name

    async def _probe_database(self, kind: str, name: str) -> None:
        try:
            await self.store.password_hash(kind, name)
        except DATABASE_DOWN as e:
            self._database_failed(e)
        else:
            self._database_answered()

    # ------------------------------------------------------------------------------- sessions

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
        # A session outlives nothing: once its account is removed it stops working within the cache time
        # (within the stale time on other replicas while the database does not answer).
        key = (kind, name)
        now = time.monotonic()
        seen = self._exists.get(key)
        age = now - seen if seen is not None else None
        if age is not None and age < self.cache_s:
            return
        if age is not None and age < self.stale_s and self.outage.down:
            self._from_stale(kind, name)
            return
        try:
            stored = await self.store.password_hash(kind, name)
        except DATABASE_DOWN as e:
            self._database_failed(e)
            if age is not None and time.monotonic() - now + age < self.stale_s:
                self._from_stale(kind, name)
                return
            raise
        self._database_answered()
        if stored is None:
            raise HttpError(401, f"invalid session token: no {kind} account named {name!r}")
        if len(self._exists) > 100_000:
            self._exists.clear()
        self._exists[key] = now
