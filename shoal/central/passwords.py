"""Password hashing (scrypt, stdlib) and a short-lived cache of successful checks.

A hash is stored as ``scrypt$n$r$p$salt$digest`` (salt and digest in base64url), so the cost can be
raised later without invalidating existing accounts. Checks compare in constant time. scrypt is slow on
purpose (about 50 ms), so a successful check is remembered for a few seconds under a keyed hash of
name and password (HMAC with a key drawn when the process starts): a device that routes many times a
second pays the KDF once, and the cache never holds anything that reveals the password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

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


# Checked against when the account does not exist, so an unknown name costs as much as a wrong password
# and response time does not say which names exist.
_DUMMY_HASH = hash_password("shoal-no-such-account", n=SCRYPT_N)


def burn_time(password: str) -> None:
    verify_password(password, _DUMMY_HASH)


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
    """Remembers (kind, name, password) triples that checked out, for ``ttl_s`` seconds.

    Keys are HMAC-SHA256 under a per-process random key; values are only the expiry. A short TTL bounds
    how long a removed account or changed password keeps working on a replica.
    """

    def __init__(self, ttl_s: float = 10.0, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._key = os.urandom(32)
        self._entries: dict[bytes, float] = {}

    def _k(self, kind: str, name: str, password: str) -> bytes:
        msg = b"\x00".join((kind.encode(), name.encode("utf-8"), password.encode("utf-8", "surrogatepass")))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def hit(self, kind: str, name: str, password: str, now: float | None = None) -> bool:
        k = self._k(kind, name, password)
        exp = self._entries.get(k)
        if exp is None:
            return False
        if (time.monotonic() if now is None else now) < exp:
            return True
        del self._entries[k]
        return False

    def add(self, kind: str, name: str, password: str, now: float | None = None) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[self._k(kind, name, password)] = (time.monotonic() if now is None else now) + self.ttl_s

    def forget_all(self) -> None:
        self._entries.clear()
