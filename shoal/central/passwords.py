"""Password hashing (scrypt, stdlib), a short-lived cache of successful checks, and what stands in for
a check when there is none to run.

A hash is stored as ``scrypt$n$r$p$salt$digest`` (salt and digest in base64url), so the cost can be
raised later without invalidating existing accounts. Checks compare in constant time. scrypt is slow on
purpose (about 30-50 ms), so a successful check is remembered for a few seconds under a keyed hash of
name and password (HMAC with a key drawn when the process starts): a device that routes many times a
second pays the KDF once, and the cache never holds anything that reveals the password. The cache keeps
a check for a longer *stale* time too, used only while the database does not answer (``Outage``).

A name that does not exist runs no hash: its answer waits as long as a recent check took
(``HashTimes``), so timing does not say which names exist and guessing fresh names costs no CPU.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
import time
from collections import deque

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
DIGEST_BYTES = 32
MAX_PASSWORD_BYTES = 1024
MIN_PASSWORD_CHARS = 8


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=DIGEST_BYTES, maxmem=256 * 1024 * 1024
    )


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = os.urandom(SALT_BYTES)
    return f"scrypt${n}${r}${p}${_b64e(salt)}${_b64e(_scrypt(password, salt, n, r, p))}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; False for any mismatch or unreadable hash."""
    try:
        algo, n, r, p, salt, digest = stored.split("$")
        if algo != "scrypt":
            return False
        got = _scrypt(password, _b64d(salt), int(n), int(r), int(p))
        return hmac.compare_digest(got, _b64d(digest))
    except (ValueError, TypeError):
        return False


def _time_one_hash() -> float:
    t = time.perf_counter()
    hash_password("shoal-no-such-account")
    return time.perf_counter() - t


class HashTimes:
    """How long recent password checks took (from asking for a hashing slot to the answer): a login for
    a name that does not exist waits a time drawn from these instead of running a hash, so its answer
    comes as late, and spreads as widely, as a wrong password's."""

    def __init__(self, keep: int = 64, first: float | None = None) -> None:
        self._times: deque[float] = deque(maxlen=keep)
        self._times.append(_time_one_hash() if first is None else first)
        self._rng = random.Random()

    def record(self, seconds: float) -> None:
        self._times.append(seconds)

    def sample(self) -> float:
        return self._rng.choice(self._times)


def check_new_password(password: object) -> str | None:
    """Why ``password`` cannot be set, or None when it can."""
    if not isinstance(password, str):
        return "password must be a string"
    if len(password) < MIN_PASSWORD_CHARS:
        return f"password must have at least {MIN_PASSWORD_CHARS} characters"
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        return f"password must be at most {MAX_PASSWORD_BYTES} bytes"
    return None


class VerifiedCache:
    """Remembers (kind, name, password) triples that checked out: *fresh* for ``ttl_s`` seconds, then
    *stale* until ``stale_s`` after the check.

    A fresh entry stands for a check. A stale one is for when the database does not answer: the password
    was right within ``stale_s``, which is better than refusing every device while the database is down.
    Keys are HMAC-SHA256 under a per-process random key; values are only the time of the check. The
    short TTL bounds how long a removed account or changed password keeps working on a replica while the
    database answers; ``stale_s`` how long while it does not.
    """

    def __init__(self, ttl_s: float = 10.0, stale_s: float | None = None, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.stale_s = max(ttl_s, ttl_s if stale_s is None else stale_s)
        self.max_entries = max_entries
        self._key = os.urandom(32)
        self._entries: dict[bytes, float] = {}  # oldest check first

    def _k(self, kind: str, name: str, password: str) -> bytes:
        msg = b"\x00".join((kind.encode(), name.encode("utf-8"), password.encode("utf-8", "surrogatepass")))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def _age(self, kind: str, name: str, password: str, now: float | None) -> float | None:
        k = self._k(kind, name, password)
        at = self._entries.get(k)
        if at is None:
            return None
        age = (time.monotonic() if now is None else now) - at
        if age >= self.stale_s:
            del self._entries[k]
            return None
        return age

    def hit(self, kind: str, name: str, password: str, now: float | None = None) -> bool:
        """Checked within ``ttl_s``. (Every request with Basic credentials asks: kept short.)"""
        at = self._entries.get(self._k(kind, name, password))
        return at is not None and (time.monotonic() if now is None else now) - at < self.ttl_s

    def hit_stale(self, kind: str, name: str, password: str, now: float | None = None) -> bool:
        """Checked within ``stale_s``: for when the database does not answer."""
        return self._age(kind, name, password, now) is not None

    def add(self, kind: str, name: str, password: str, now: float | None = None) -> None:
        k = self._k(kind, name, password)
        self._entries.pop(k, None)  # to the end: the dict stays ordered by the time of the check
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[k] = time.monotonic() if now is None else now

    def forget_all(self) -> None:
        self._entries.clear()


class Outage:
    """Whether the database answered central's last query about credentials. While it did not, the
    credentials checked within the stale time are honoured without asking it again (each asking would
    wait the whole query timeout), and one query at a time finds out when it is back."""

    def __init__(self) -> None:
        self.down = False
        self.since: float | None = None

    def failed(self, now: float) -> bool:
        """A query got no answer; True when this starts an outage (log that one)."""
        started = not self.down
        if started:
            self.down, self.since = True, now
        return started

    def answered(self) -> bool:
        """A query was answered; True when this ends an outage."""
        ended = self.down
        self.down, self.since = False, None
        return ended
