"""The gateway's reports to central: every second, to every central replica, its public address and
per model version the load (in flight, capacity, queue, recent latency, workers), as a ``Report``
(``protocol/central_messages.py``). Central answers with the key this cluster verifies route tokens
with; the gateway starts accepting tokens once it has it.

A cluster may be served by several gateways, all logging in with the cluster's account: each reports
its own id and the address its workers dial, and may ask for the cluster's decision lease (the one
gateway that runs the autoscaler). Central's answer lists the cluster's live gateways and the lease
holder; the reporter hands every answer to whoever wants it (``on_answer``).

A central that is down costs nothing but a logged line now and then: devices with a route keep
coming, and reports resume when it is back. One httpx client keeps a connection to each replica.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

import shoal
from shoal.aio import cancel_and_wait
from shoal.protocol.central_messages import ModelLoad, Operation, Report, ReportAnswer

if TYPE_CHECKING:
    from shoal.gateway.pool import ModelTable

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
    ok_since: float | None = None
    failures: int = 0
    last_error: str = ""


def report_body(
    table: ModelTable,
    public_url: str,
    gateway_id: str = "",
    workers_address: str = "",
    decide: bool = False,
    ops: list[Operation] | None = None,
) -> Report:
    models = []
    for pool in table.pools():
        served = pool.spec.version in table.served_versions(pool.spec.name)
        models.append(
            ModelLoad(
                name=pool.spec.name,
                version=pool.spec.version,
                ready=served,
                asleep=pool.asleep,
                in_flight=pool.in_flight,
                capacity=pool.capacity,
                queue=len(pool.queue),
                latency_ms=round(pool.latency_ms(), 3),
                workers=sum(1 for w in pool.workers if w.accepting),
            )
        )
    # A gateway without an id is a cluster of one: it decides alone and asks no lease.
    return Report(public_url, models, gateway_id, workers_address, decide and bool(gateway_id), ops or [])


class CentralReporter:
    """Reports ``table``'s load as ``public_url`` to every replica; hands each token key central
    sends to ``on_token_key(key, source)``.

    In a cluster of several gateways: ``gateway_id`` names this one, ``workers_address`` is the
    host:port its workers dial, ``decide()`` (asked before every report) says whether it wants the
    cluster's decision lease, and ``on_answer`` gets every answer (its peers, the lease holder)."""

    def __init__(
        self,
        table: ModelTable,
        cfg: CentralConfig,
        public_url: str,
        on_token_key: Callable[[bytes, str], None],
        gateway_id: str = "",
        workers_address: str = "",
        decide: Callable[[], bool] | None = None,
        on_answer: Callable[[ReportAnswer], None] | None = None,
        operations: Callable[[], list[Operation]] | None = None,
    ) -> None:
        self.table = table
        self.cfg = cfg
        self.public_url = public_url
        self.on_token_key = on_token_key
        self.gateway_id = gateway_id
        self.workers_address = workers_address
        self.decide = decide
        self.on_answer = on_answer
        self.operations = operations
        self.interval_s = cfg.interval_s  # central may ask for another in its answers
        auth = base64.b64encode(f"{cfg.user}:{cfg.password}".encode()).decode()
        self.headers = {
            "Authorization": f"Basic {auth}",
            "Content-Type": "application/json",
            "User-Agent": f"shoal-gateway/{shoal.__version__}",
        }
        self.replicas = [_Replica(u.rstrip("/")) for u in cfg.urls]
        self._answers = msgspec.json.Decoder(ReportAnswer)
        self._http = httpx.AsyncClient(
            timeout=cfg.timeout_s, verify=ssl.create_default_context(cafile=cfg.ca_file), trust_env=False
        )
        self._tasks: list[asyncio.Task] = []
        self._served: list[tuple[str, str]] | None = None  # what the last report said is served

    def start(self) -> None:
        # One loop per replica: a replica whose machine vanished (its reports time out) must not slow
        # the reports to the others, or they would find this gateway silent and drop it.
        self._tasks = [asyncio.create_task(self._loop(r), name=f"central-reports {r.url}") for r in self.replicas]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        await self._http.aclose()

    def _body(self) -> bytes:
        decide = self.decide() if self.decide is not None else False
        ops = self.operations() if self.operations is not None else []
        report = report_body(self.table, self.public_url, self.gateway_id, self.workers_address, decide, ops)
        self._say_models(report)
        return msgspec.json.encode(report)

    async def _loop(self, replica: _Replica) -> None:
        while True:
            t = time.monotonic()
            await self._report(replica, self._body())
            await asyncio.sleep(max(0.05, self.interval_s - (time.monotonic() - t)))

    def _say_models(self, report: Report) -> None:
        """One log line when the set of model versions this gateway reports as served changes."""
        served = sorted((m.name, m.version) for m in report.models if m.ready or m.asleep)
        if served != self._served:
            log.info(
                "reporting to central: %s", ", ".join(f"{n} v{v}" for n, v in served) or "no model served"
            )
            self._served = served

    async def _report(self, r: _Replica, body: bytes) -> None:
        try:
            resp = await self._http.post(r.url + "/v1/clusters/report", content=body, headers=self.headers)
            if resp.status_code != 200:
                raise OSError(f"HTTP {resp.status_code}: {resp.content[:200].decode('utf-8', 'replace')}")
            answer = self._answers.decode(resp.content)
            key = answer.token_key
            if key:
                raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
                self.on_token_key(raw, f"central {r.url}")
            if 0.1 <= answer.report_interval_s <= 60:
                self.interval_s = answer.report_interval_s
            if self.on_answer is not None:
                self.on_answer(answer)
            if r.ok_since is None:
                log.info("reporting to central %s as cluster %s", r.url, self.cfg.user)
                r.ok_since = time.monotonic()
            r.failures = 0
        except (OSError, httpx.TransportError, msgspec.DecodeError, ValueError) as e:
            r.failures += 1
            r.ok_since = None
            r.last_error = str(e) or type(e).__name__
            # One line when it starts failing, then one every 30 failed reports.
            if r.failures == 1 or r.failures % 30 == 0:
                log.warning("central %s unreachable (%d failed reports): %s", r.url, r.failures, r.last_error)

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
