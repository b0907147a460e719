"""Who may try to log in on the worker port, and how often.

Before a peer proves the cluster secret it is a stranger: it may hold one of ``max_handshakes``
login slots (so strangers cannot pile up connections). When every slot is taken, a newcomer takes the
slot of the stranger that has waited longest, which is closed: a worker logs in within one round trip
of connecting, so an idle flood of connections cannot keep one out (it once took a worker 7 s to join
past 300 idle connections). A stranger that says nothing within the handshake time is closed too;
neither counts as a failed login, since no proof was tried. Its address is throttled after failed
logins (``security.throttle``: a few free failures, then exponential back-off, refused at once without
checking the proof). Failures are logged once per run of failures and once when the address is
blocked, never once per attempt: two thousand bad logins make two log lines, not two thousand.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from shoal.security.throttle import Throttle

log = logging.getLogger("shoal.gateway")

MAX_HANDSHAKES = 256  # connections still logging in at once
FULL_LOG_EVERY_S = 10.0


class Peer(Protocol):
    peer: str
    peer_host: str

    def evict(self) -> None:
        """Close this stranger's connection to make room for a newcomer."""


class LoginGuard:
    def __init__(self, metrics: Any, max_handshakes: int = MAX_HANDSHAKES) -> None:
        self.metrics = metrics
        self.max_handshakes = max_handshakes
        self.handshaking: dict[Peer, None] = {}  # oldest first
        self.throttle = Throttle(free=5, base_s=1.0, cap_s=60.0, forget_s=600.0)
        self._full_logged = 0.0
        self._silent_logged = 0.0

    def admit(self, conn: Peer) -> None:
        """A new connection takes a login slot; when all are taken, the oldest stranger's."""
        while len(self.handshaking) >= self.max_handshakes:
            oldest = next(iter(self.handshaking))
            del self.handshaking[oldest]
            self.metrics.worker_logins.labels("evicted").inc()
            now = time.monotonic()
            if now - self._full_logged > FULL_LOG_EVERY_S:
                self._full_logged = now
                log.warning(
                    "worker port: %d connections are logging in at once; closing the longest waiting "
                    "(from %s) to make room",
                    self.max_handshakes,
                    oldest.peer,
                )
            oldest.evict()
        self.handshaking[conn] = None

    def silent(self, conn: Peer) -> None:
        """A stranger said nothing within the handshake time: closed, not a failed login."""
        self.handshaking.pop(conn, None)
        self.metrics.worker_logins.labels("timeout").inc()
        now = time.monotonic()
        if now - self._silent_logged > FULL_LOG_EVERY_S:
            self._silent_logged = now
            log.warning("worker port: closing connections that did not log in in time (from %s)", conn.peer)

    def retry_after(self, host: str) -> float:
        wait = self.throttle.retry_after(host, time.monotonic())
        if wait > 0:
            self.metrics.worker_logins.labels("throttled").inc()
        return wait

    def failed(self, conn: Peer, reason: str) -> None:
        self.handshaking.pop(conn, None)
        self.metrics.worker_logins.labels("failed").inc()
        if self.throttle.retry_after(conn.peer_host, time.monotonic()) > 0:
            return  # already blocked: this attempt was refused unchecked, and counted
        v = self.throttle.failed(conn.peer_host, time.monotonic())
        if v.failures == 1:
            log.warning("refused worker connection from %s: %s", conn.peer, reason)
        elif v.newly_blocked:
            log.warning(
                "%d failed worker logins from %s (last: %s); refusing its logins for %.0f s",
                v.failures,
                conn.peer_host,
                reason,
                v.blocked_s,
            )

    def logged_in(self, conn: Peer) -> None:
        self.handshaking.pop(conn, None)
        # A success does not forgive the address: another peer on the same host may be the one guessing.
        self.metrics.worker_logins.labels("ok").inc()

    def left(self, conn: Peer) -> None:
        self.handshaking.pop(conn, None)
