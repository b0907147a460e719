"""The live directory of one central replica: clusters as their reports describe them, the routes
handed out since each cluster's last report, and the devices seen recently.

Each replica keeps its own (clusters report to every replica); nothing here touches the database.
The choice of cluster is ``policy.choose_cluster``, a pure function; this keeps its inputs and the
counters the status and metrics show.
"""

from __future__ import annotations

import asyncio
import time

from shoal.central.config import CentralConfig
from shoal.central.policy import Choice, ClusterInfo, choose_cluster, is_live, load_of
from shoal.modelrepo.versions import version_key
from shoal.protocol.central_messages import ClusterView, DeviceSeen, ModelView, Report

DEVICE_LIVE_S = 60.0  # a device counts as live this long after its last request
FORGET_CLUSTER_S = 600.0  # a silent cluster stays on the status page (as not live) this long
SWEEP_S = 5.0


def _finite(x: float) -> float | None:
    return None if x == float("inf") else round(x, 4)


class Directory:
    def __init__(self, config: CentralConfig) -> None:
        self.max_age_s = config.max_age_s
        self.grace_s = config.grace_s
        self.clusters: dict[str, ClusterInfo] = {}
        self.first_seen: dict[str, float] = {}  # unix time of a cluster's first report here
        self.assigned: dict[str, float] = {}  # routes handed out per cluster since its last report
        self.devices: dict[str, float] = {}  # device name -> unix time last seen
        self.listening_since = time.monotonic()
        self.routes_answered = 0
        self.routes_unserved = 0
        self.reports = 0

    # -------------------------------------------------------------------------------- changes

    def report(self, name: str, report: Report, now: float) -> bool:
        """Take a cluster's report; True when the cluster was not live before it."""
        old = self.clusters.get(name)
        self.clusters[name] = ClusterInfo(name, report.address, tuple(report.models), now)
        self.first_seen.setdefault(name, time.time())
        self.assigned[name] = 0.0  # the report's load now includes the devices sent there
        self.reports += 1
        return old is None or not is_live(old, now, self.max_age_s)

    def choose(self, model: str, version: str | None, exclude: list[str], now: float) -> Choice | None:
        """The cluster to route a device to (counted as assigned to it), or None."""
        choice = choose_cluster(
            self.clusters.values(),
            model,
            version,
            exclude,
            now=now,
            max_age_s=self.max_age_s,
            assigned=self.assigned,
        )
        if choice is None:
            self.routes_unserved += 1
            return None
        name = choice.cluster.name
        self.assigned[name] = self.assigned.get(name, 0.0) + 1.0
        self.routes_answered += 1
        return choice

    def starting(self, now: float) -> bool:
        """Just started: clusters may still be sending their first reports ("not yet", not "no")."""
        return now - self.listening_since < self.grace_s

    def forget(self, cluster: str) -> None:
        self.clusters.pop(cluster, None)
        self.assigned.pop(cluster, None)

    def seen(self, device: str) -> None:
        self.devices[device] = time.time()

    def sweep(self, now: float, wall: float) -> None:
        """Forget devices not seen for a minute and clusters silent for long: memory stays bounded."""
        cutoff = wall - DEVICE_LIVE_S
        for d in [d for d, t in self.devices.items() if t < cutoff]:
            del self.devices[d]
        for name in [n for n, c in self.clusters.items() if now - c.last_report > FORGET_CLUSTER_S]:
            self.forget(name)

    async def run_sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            self.sweep(time.monotonic(), time.time())

    # ---------------------------------------------------------------------------------- views

    def live(self, now: float) -> list[ClusterInfo]:
        return [c for c in self.clusters.values() if is_live(c, now, self.max_age_s)]

    def view(self, c: ClusterInfo, now: float) -> ClusterView:
        models = [
            ModelView(
                m.name,
                m.version,
                m.ready,
                m.in_flight,
                m.capacity,
                m.queue,
                m.latency_ms,
                m.workers,
                m.asleep,
                load=_finite(load_of(m)),
            )
            for m in sorted(c.models, key=lambda m: (m.name, version_key(m.version)))
        ]
        in_flight = sum(m.in_flight + m.queue for m in c.models)
        capacity = sum(m.capacity for m in c.models)
        return ClusterView(
            name=c.name,
            address=c.address,
            live=is_live(c, now, self.max_age_s),
            last_report_s=round(now - c.last_report, 3),
            load=round(in_flight / capacity, 4) if capacity > 0 else None,
            models=models,
        )

    def live_views(self) -> list[ClusterView]:
        now = time.monotonic()
        return [self.view(c, now) for c in sorted(self.live(now), key=lambda c: c.name)]

    def all_views(self) -> list[ClusterView]:
        now = time.monotonic()
        return [self.view(c, now) for c in sorted(self.clusters.values(), key=lambda c: c.name)]

    def devices_seen(self) -> list[DeviceSeen]:
        wall = time.time()
        seen = [DeviceSeen(d, round(wall - t, 1)) for d, t in self.devices.items()]
        return sorted(seen, key=lambda d: d.last_seen_s)
