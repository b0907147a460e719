"""The keys central derives from the master secret in its database, so every replica has the same:
one route-token key per cluster (the cluster verifies its tokens with it), the device-session key and
the device-cookie key (a client's proof that it logged in before; ``auth.py``)."""

from __future__ import annotations

import hashlib
import hmac


class Keys:
    def __init__(self) -> None:
        self._master = b""
        self._route: dict[str, bytes] = {}
        self.session = b""
        self.cookie = b""

    def load(self, master: bytes) -> None:
        self._master = master
        self._route.clear()
        self.session = hmac.new(master, b"device-session", hashlib.sha256).digest()
        self.cookie = hmac.new(master, b"device-cookie", hashlib.sha256).digest()

    def route(self, cluster: str) -> bytes:
        """The key ``cluster`` verifies its route tokens with: HMAC-SHA256(master, "route-token:" + name)."""
        key = self._route.get(cluster)
        if key is None:
            if not self._master:
                raise RuntimeError("central's keys are not loaded yet")
            key = hmac.new(self._master, b"route-token:" + cluster.encode("utf-8"), hashlib.sha256).digest()
            if len(self._route) >= 100_000:
                self._route.clear()
            self._route[cluster] = key
        return key
