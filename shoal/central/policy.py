"""Which cluster a device is sent to: a pure function of the live table, with no I/O and no clock.

Among clusters that reported recently and have a ready entry for the model (and the version, when the
device names one; otherwise the newest version any of them serves), the least loaded wins. A cluster
where the model is asleep (no worker, one started for the first request) is a candidate too, chosen
only when no cluster has it awake. Load is
``(in_flight + queue + assigned) / capacity``: ``assigned`` counts the routes central handed out for
that cluster since its last report, so a burst of new devices within one report interval spreads over
the clusters instead of all landing on the one that looked idle a second ago. Ties go to the lower
recent latency, then to the name, so the choice is deterministic.

A cluster is served by one or more gateways, each reporting on its own. ``cluster_of`` merges its live
gateways' reports into the cluster the choice sees: workers dial every gateway of their cluster and
split their capacity between them, so per model version in flight, queue and capacity add up, the
worker count is the largest any gateway sees, the model is ready where any gateway has it ready and
asleep only where all have it asleep, and latency is the capacity-weighted mean. Within the chosen
cluster, ``rank_gateways`` orders the live gateways serving the model by their own load (routes
handed out since each gateway's last report counted against it), ties by id: the device is sent to
the first and falls back on the others in turn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shoal.modelrepo.versions import version_key
from shoal.protocol.central_messages import ModelLoad, Operation


@dataclass(frozen=True)
class GatewayInfo:
    """One gateway of a cluster, as its last report described it."""

    id: str  # "" for an older gateway that sends none
    address: str
    models: tuple[ModelLoad, ...]
    last_report: float  # monotonic seconds of its last report
    workers: str = ""
    ops: tuple[Operation, ...] = ()  # operators' loads and unloads made at it


@dataclass(frozen=True)
class ClusterInfo:
    """A cluster as the choice sees it: ``cluster_of`` its gateways (or given as it is, in tests)."""

    name: str
    address: str
    models: tuple[ModelLoad, ...]
    last_report: float  # monotonic seconds of its latest report from any gateway
    gateways: tuple[GatewayInfo, ...] = ()  # those merged into ``models``, by id


@dataclass(frozen=True)
class Choice:
    cluster: ClusterInfo
    entry: ModelLoad
    load: float
    gateways: tuple[GatewayInfo, ...] = ()  # of the cluster, serving the model, least loaded first

    @property
    def urls(self) -> list[str]:
        """Where to send the device: the first, then the others in turn (each address once)."""
        urls = list(dict.fromkeys(g.address for g in self.gateways))
        return urls or [self.cluster.address]


def is_live(c: ClusterInfo | GatewayInfo, now: float, max_age_s: float) -> bool:
    return now - c.last_report < max_age_s


def load_of(entry: ModelLoad, assigned: float = 0.0) -> float:
    if entry.capacity <= 0:
        return math.inf
    return (entry.in_flight + entry.queue + assigned) / entry.capacity


def total_load(models: Iterable[ModelLoad]) -> float | None:
    """(in_flight + queue) / capacity over all of a gateway's or a cluster's models; None without capacity."""
    models = list(models)
    capacity = sum(m.capacity for m in models)
    return sum(m.in_flight + m.queue for m in models) / capacity if capacity > 0 else None


def merge_models(reports: Iterable[Iterable[ModelLoad]]) -> tuple[ModelLoad, ...]:
    """Per model version, the sum of several gateways' reports (see the module's docstring)."""
    parts: dict[tuple[str, str], list[ModelLoad]] = {}
    for models in reports:
        for m in models:
            parts.setdefault((m.name, m.version), []).append(m)
    merged = []
    for (name, version), ms in parts.items():
        if len(ms) == 1:
            merged.append(ms[0])
            continue
        capacity = sum(m.capacity for m in ms)
        if capacity > 0:
            latency = sum(m.latency_ms * m.capacity for m in ms) / capacity
        else:
            latency = sum(m.latency_ms for m in ms) / len(ms)
        merged.append(
            ModelLoad(
                name,
                version,
                ready=any(m.ready for m in ms),
                in_flight=sum(m.in_flight for m in ms),
                capacity=capacity,
                queue=sum(m.queue for m in ms),
                latency_ms=latency,
                workers=max(m.workers for m in ms),
                asleep=all(m.asleep for m in ms),
            )
        )
    return tuple(merged)


def cluster_of(name: str, gateways: Iterable[GatewayInfo], now: float, max_age_s: float) -> ClusterInfo:
    """The cluster its live gateways make (all of them when none is live: a silent cluster shows what it
    served last). Its address is its least-loaded gateway's; it is live while any gateway is."""
    every = sorted(gateways, key=lambda g: g.id)
    if not every:
        raise ValueError(f"cluster {name!r} has no gateway")
    use = [g for g in every if is_live(g, now, max_age_s)] or every

    def busy(g: GatewayInfo) -> tuple[float, str]:
        load = total_load(g.models)
        return (math.inf if load is None else load, g.id)

    return ClusterInfo(
        name,
        min(use, key=busy).address,
        merge_models(g.models for g in use),
        max(g.last_report for g in every),
        tuple(use),
    )


def rank_gateways(
    gateways: Iterable[GatewayInfo],
    model: str,
    version: str,
    *,
    now: float,
    max_age_s: float = 3.0,
    assigned: Mapping[str, float] | None = None,
) -> tuple[GatewayInfo, ...]:
    """The live gateways serving ``model`` ``version`` (ready or asleep), least loaded first: awake
    before asleep, then by ``(in_flight + queue + assigned) / capacity``, ties by id."""
    assigned = assigned or {}
    ranked: list[tuple[bool, float, str, GatewayInfo]] = []
    for g in gateways:
        if not is_live(g, now, max_age_s):
            continue
        for m in g.models:
            if m.name == model and m.version == version and (m.ready or m.asleep):
                ranked.append((not m.ready, load_of(m, assigned.get(g.id, 0.0)), g.id, g))
                break
    ranked.sort(key=lambda r: r[:3])
    return tuple(r[3] for r in ranked)


def choose_cluster(
    clusters: Iterable[ClusterInfo],
    model: str,
    version: str | None = None,
    exclude: Iterable[str] = (),
    *,
    now: float,
    max_age_s: float = 3.0,
    assigned: Mapping[str, float] | None = None,
    gateway_assigned: Mapping[str, Mapping[str, float]] | None = None,
    avoid: Iterable[str] = (),
) -> Choice | None:
    """The cluster to send a device to, and its gateways to try in turn, or None when no live cluster
    outside ``exclude`` serves it. ``assigned``: routes handed out per cluster since its last reports;
    ``gateway_assigned``: the same per cluster and gateway; ``avoid``: gateway addresses the device
    could not reach, left out (a cluster left with none serving the model is skipped)."""
    avoided = {a.rstrip("/") for a in avoid}
    skip = set(exclude)
    assigned = assigned or {}
    candidates: list[tuple[ClusterInfo, ModelLoad]] = []
    for c in clusters:
        if c.name in skip or not is_live(c, now, max_age_s):
            continue
        for m in c.models:
            if m.name == model and (m.ready or m.asleep) and (version is None or m.version == version):
                candidates.append((c, m))
    if not candidates:
        return None
    if version is None:
        newest = max((m.version for _, m in candidates), key=version_key)
        candidates = [(c, m) for c, m in candidates if m.version == newest]
    candidates.sort(
        key=lambda cm: (
            not cm[1].ready,  # awake first
            load_of(cm[1], assigned.get(cm[0].name, 0.0)),
            cm[1].latency_ms,
            cm[0].name,
        ),
    )
    for chosen, entry in candidates:
        gateways = rank_gateways(
            chosen.gateways,
            model,
            entry.version,
            now=now,
            max_age_s=max_age_s,
            assigned=(gateway_assigned or {}).get(chosen.name),
        )
        if avoided:
            gateways = tuple(g for g in gateways if g.address.rstrip("/") not in avoided)
            if not gateways:
                continue
        return Choice(chosen, entry, load_of(entry, assigned.get(chosen.name, 0.0)), gateways)
    return None
