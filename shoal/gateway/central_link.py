"""The gateway's reports to central: every second, to every central replica, its public address and
per model version the load (in flight, capacity, queue, recent latency, workers). Central answers with
the key this cluster verifies route tokens with; the gateway starts accepting tokens once it has it.

A central that is down costs nothing but a logged line now and then: devices with a route keep
coming, and reports resume when it is back.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from shoal.client.aio_http import AsyncHttpConnection, HttpError

if TYPE_CHECKING:
    from shoal.gateway.server import Gateway

log = logging.getLogger("shoal.gateway")


@dataclass
class CentralConfig:
    urls: list[str]
    user: str
    password: str
    public_url: str
    interval_s: float = 1.0
    ca_file: str | None = None
    timeout_s: float = 2.0


@dataclass
class _Replica:
    url: str
    conn: AsyncHttpConnection
    ok_since: float | None = None
    failures: int = 0
    last_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def report_body(gw: Gateway, public_url: str) -> dict[str, Any]:
    models = []
    for pool in gw.models.pools():
        served = pool.spec.version in gw.models.served_versions(pool.spec.name)
        models.append(
            {
                "name": pool.spec.name,
                "version": pool.spec.version,
                "ready": served,
                "asleep": pool.asleep,
                "in_flight": pool.in_flight,
                "capacity": pool.capacity,
                "queue": len(pool.queue),
                "latency_ms": round(pool.latency_ms(), 3),
                "workers": sum(1 for w in pool.workers if w.accepting),
            }
        )
    return {"address": public_url, "models": models}


class CentralReporter:
    def __init__(self, gw: Gateway, cfg: CentralConfig) -> None:
        self.gw = gw
        self.cfg = cfg
        auth = base64.b64encode(f"{cfg.user}:{cfg.password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {auth}", "Content-Type": "application/json"}
        self.replicas = [
            _Replica(u, AsyncHttpConnection(u, timeout=cfg.timeout_s, ca_file=cfg.ca_file, max_body=1 << 20))
            for u in cfg.urls
        ]
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="central-reports")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for r in self.replicas:
            await r.conn.close()

    async def _loop(self) -> None:
        while True:
            t = time.monotonic()
            body = orjson.dumps(report_body(self.gw, self.cfg.public_url))
            await asyncio.gather(*(self._report(r, body) for r in self.replicas))
            await asyncio.sleep(max(0.05, self.cfg.interval_s - (time.monotonic() - t)))

    async def _report(self, r: _Replica, body: bytes) -> None:
        try:
            status, _, data = await r.conn.request("POST", "/v1/clusters/report", body, self.headers)
            if status != 200:
                raise HttpError(f"HTTP {status}: {data[:200].decode('utf-8', 'replace')}")
            answer = orjson.loads(data)
            key = answer.get("token_key")
            if isinstance(key, str) and key:
                raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
                self.gw.set_token_key(raw, f"central {r.url}")
            iv = answer.get("report_interval_s")
            if isinstance(iv, (int, float)) and 0.1 <= iv <= 60:
                self.cfg.interval_s = float(iv)
            if r.ok_since is None:
                log.info("reporting to central %s as cluster %s", r.url, self.cfg.user)
                r.ok_since = time.monotonic()
            r.failures = 0
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            r.failures += 1
            r.ok_since = None
            r.last_error = str(e)
            # One line when it starts failing, then one every 30 failed reports.
            if r.failures == 1 or r.failures % 30 == 0:
                log.warning("central %s unreachable (%d failed reports): %s", r.url, r.failures, e)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "url": r.url,
                "reporting": r.ok_since is not None,
                "failures": r.failures,
                "last_error": r.last_error,
            }
            for r in self.replicas
        ]
