"""The live directory of one central replica: clusters and their gateways as their reports describe
them, the routes handed out since each gateway's last report, the decision lease holders it last
learnt, and the devices seen recently.

Each replica keeps its own (gateways report to every replica); nothing here touches the database.
The choice of cluster and gateway is ``policy.choose_cluster``, a pure function; this keeps its
inputs and the counters the status and metrics show.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from shoal.central.config import CentralConfig
from shoal.central.policy import (
    Choice,
    ClusterInfo,
    GatewayInfo,
    choose_cluster,
    cluster_of,
    is_live,
    load_of,
    total_load,
)
from shoal.modelrepo.versions import version_key
from shoal.protocol.central_messages import (
    MAX_GATEWAYS_PER_CLUSTER,
    ClusterView,
    DeviceSeen,
    GatewayPeer,
    GatewayView,
    ModelLoad,
    ModelView,
    Report,
)

DEVICE_LIVE_S = 60.0  # a device counts as live this long after its last request
FORGET_CLUSTER_S = 600.0  # a silent gateway (cluster) stays on the status page (as not live) this long
SWEEP_S = 5.0


def _finite(x: float | None) -> float | None:
    return None if x is None or x == math.inf else round(x, 4)


class TooManyGateways(Exception):
    pass


@dataclass
class _Cluster:
    """What a replica keeps of one cluster: its gateways' last reports, and its merged view."""

    gateways: dict[str, GatewayInfo] = field(default_factory=dict)
    assigned: dict[str, float] = field(default_factory=dict)  # routes per gateway since its last report
    decide: set[str] = field(default_factory=set)  # gateways whose last report asked for the lease
    decider: str = ""  # the lease holder this replica last learnt, ...
    decider_until: float = 0.0  # ... and until when (unix seconds) it holds it
    merged: ClusterInfo | None = None  # ``cluster_of`` the gateways; None: to be made again
    merged_until: float = 0.0  # monotonic time at which a merged gateway falls silent


def serving(models: tuple[ModelLoad, ...] | list[ModelLoad]) -> frozenset[tuple[str, str]]:
    """(name, version) of the models a report says are served (ready, or asleep until a request)."""
    return frozenset((m.name, m.version) for m in models if m.ready or m.asleep)


class Directory:
    def __init__(self, config: CentralConfig) -> None:
        self.max_age_s = config.max_age_s
        self.grace_s = config.grace_s
        self._clusters: dict[str, _Cluster] = {}
        self.first_seen: dict[str, float] = {}  # unix time of a cluster's first report here
        self.assigned: dict[str, float] = {}  # routes handed out per cluster since its gateways' last reports
        self.devices: dict[str, float] = {}  # device name -> unix time last seen
        self.listening_since = time.monotonic()
        self.routes_answered = 0
        self.routes_unserved = 0
        self.reports = 0

    # -------------------------------------------------------------------------------- changes

    def report(self, name: str, report: Report, now: float) -> bool:
        """Take a gateway's report; True when its cluster was not live before it. ``TooManyGateways``
        when the cluster already has ``MAX_GATEWAYS_PER_CLUSTER`` live ones and this is another."""
        c = self._clusters.get(name)
        was_live = c is not None and any(is_live(g, now, self.max_age_s) for g in c.gateways.values())
        if c is None:
            c = self._clusters[name] = _Cluster()
        gid = report.gateway
        if gid not in c.gateways and len(c.gateways) >= MAX_GATEWAYS_PER_CLUSTER:
            for g in [g.id for g in c.gateways.values() if not is_live(g, now, self.max_age_s)]:
                self._drop_gateway(name, c, g)
            if len(c.gateways) >= MAX_GATEWAYS_PER_CLUSTER:
                raise TooManyGateways(
                    f"cluster {name!r} already has {MAX_GATEWAYS_PER_CLUSTER} live gateways; "
                    f"gateway {gid!r} is refused until one stops"
                )
        c.gateways[gid] = GatewayInfo(gid, report.address, tuple(report.models), now, report.workers, tuple(report.ops))
        # The report's load now includes the devices sent to this gateway.
        self.assigned[name] = max(0.0, self.assigned.get(name, 0.0) - c.assigned.pop(gid, 0.0))
        if report.decide:
            c.decide.add(gid)
        else:
            c.decide.discard(gid)
        c.merged = None
        self.first_seen.setdefault(name, time.time())
        self.reports += 1
        return not was_live

    def serving(self, name: str, gateway: str) -> frozenset[tuple[str, str]] | None:
        """The model versions a gateway's last report said it serves (None: no report yet)."""
        c = self._clusters.get(name)
        g = c.gateways.get(gateway) if c is not None else None
        return None if g is None else serving(g.models)

    def asked_to_decide(self, name: str, gateway: str) -> bool:
        """Whether the gateway's last report asked for the lease (ask before ``report`` takes the next)."""
        c = self._clusters.get(name)
        return c is not None and gateway in c.decide

    def learn_decider(self, name: str, holder: str, until: float) -> None:
        """The lease holder the database answered (``""``: none), held until ``until`` (unix seconds)."""
        c = self._clusters.get(name)
        if c is not None:
            c.decider, c.decider_until = holder, until

    def decider(self, name: str, wall: float | None = None) -> str:
        """The lease holder this replica last learnt, while its lease lasts; ``wall=None``: whatever
        it last learnt (the database is unreachable: it may still hold it)."""
        c = self._clusters.get(name)
        if c is None or (wall is not None and wall >= c.decider_until):
            return ""
        return c.decider

    def cluster(self, name: str, now: float) -> ClusterInfo | None:
        """The cluster its gateways make now (made again after a report or when one falls silent)."""
        c = self._clusters.get(name)
        if c is None or not c.gateways:
            return None
        if c.merged is None or now >= c.merged_until:
            c.merged = cluster_of(name, c.gateways.values(), now, self.max_age_s)
            live = [
                g.last_report + self.max_age_s for g in c.gateways.values() if is_live(g, now, self.max_age_s)
            ]
            c.merged_until = min(live) if live else math.inf
        return c.merged

    def choose(
        self, model: str, version: str | None, exclude: list[str], now: float, avoid: list[str] | None = None
    ) -> Choice | None:
        """The cluster to route a device to and its gateways in turn (counted as assigned to the
        first), or None."""
        choice = choose_cluster(
            self.clusters(now),
            model,
            version,
            exclude,
            now=now,
            max_age_s=self.max_age_s,
            assigned=self.assigned,
            gateway_assigned={n: c.assigned for n, c in self._clusters.items()},
            avoid=avoid or (),
        )
        if choice is None:
            self.routes_unserved += 1
            return None
        name = choice.cluster.name
        self.assigned[name] = self.assigned.get(name, 0.0) + 1.0
        if choice.gateways:
            c = self._clusters[name]
            gid = choice.gateways[0].id
            c.assigned[gid] = c.assigned.get(gid, 0.0) + 1.0
        self.routes_answered += 1
        return choice

    def starting(self, now: float) -> bool:
        """Just started: clusters may still be sending their first reports ("not yet", not "no")."""
        return now - self.listening_since < self.grace_s

    def forget(self, cluster: str) -> None:
        self._clusters.pop(cluster, None)
        self.assigned.pop(cluster, None)

    def _drop_gateway(self, name: str, c: _Cluster, gid: str) -> None:
        c.gateways.pop(gid, None)
        self.assigned[name] = max(0.0, self.assigned.get(name, 0.0) - c.assigned.pop(gid, 0.0))
        c.decide.discard(gid)
        c.merged = None

    def seen(self, device: str) -> None:
        self.devices[device] = time.time()

    def sweep(self, now: float, wall: float) -> None:
        """Forget devices not seen for a minute and gateways (clusters) silent for long: memory stays bounded."""
        cutoff = wall - DEVICE_LIVE_S
        for d in [d for d, t in self.devices.items() if t < cutoff]:
            del self.devices[d]
        for name, c in list(self._clusters.items()):
            for gid in [g.id for g in c.gateways.values() if now - g.last_report > FORGET_CLUSTER_S]:
                self._drop_gateway(name, c, gid)
            if not c.gateways:
                self.forget(name)

    async def run_sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            self.sweep(time.monotonic(), time.time())

    # ---------------------------------------------------------------------------------- views

    def clusters(self, now: float) -> list[ClusterInfo]:
        """Every cluster known here, live or silent."""
        return [c for name in self._clusters if (c := self.cluster(name, now)) is not None]

    def live(self, now: float) -> list[ClusterInfo]:
        return [c for c in self.clusters(now) if is_live(c, now, self.max_age_s)]

    def peers(self, name: str, now: float, wall: float) -> list[GatewayPeer]:
        """The cluster's live gateways for a gateway's report answer, by id."""
        c = self._clusters.get(name)
        if c is None:
            return []
        decider = self.decider(name, wall)
        return [
            GatewayPeer(g.id, g.address, g.workers, list(g.models), g.id == decider, list(g.ops))
            for g in sorted(c.gateways.values(), key=lambda g: g.id)
            if is_live(g, now, self.max_age_s)
        ]

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
        state = self._clusters.get(c.name)
        decider = self.decider(c.name, time.time())
        gateways = [
            GatewayView(
                g.id,
                g.address,
                g.workers,
                is_live(g, now, self.max_age_s),
                round(now - g.last_report, 3),
                _finite(total_load(g.models)),
                g.id == decider,
            )
            for g in sorted(state.gateways.values() if state else (), key=lambda g: g.id)
        ]
        return ClusterView(
            name=c.name,
            address=c.address,
            live=is_live(c, now, self.max_age_s),
            last_report_s=round(now - c.last_report, 3),
            load=_finite(total_load(c.models)),
            models=models,
            gateways=gateways,
        )

    def live_views(self) -> list[ClusterView]:
        now = time.monotonic()
        return [self.view(c, now) for c in sorted(self.live(now), key=lambda c: c.name)]

    def all_views(self) -> list[ClusterView]:
        now = time.monotonic()
        return [self.view(c, now) for c in sorted(self.clusters(now), key=lambda c: c.name)]

    def devices_seen(self) -> list[DeviceSeen]:
        wall = time.time()
        seen = [DeviceSeen(d, round(wall - t, 1)) for d, t in self.devices.items()]
        return sorted(seen, key=lambda d: d.last_seen_s)
