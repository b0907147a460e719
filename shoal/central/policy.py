"""Which cluster a device is sent to: a pure function of the live table, with no I/O and no clock.

Among clusters that reported recently and have a ready entry for the model (and the version, when the
device names one; otherwise the newest version any of them serves), the least loaded wins. A cluster
where the model is asleep (no worker, one started for the first request) is a candidate too, chosen
only when no cluster has it awake. Load is
``(in_flight + queue + assigned) / capacity``: ``assigned`` counts the routes central handed out for
that cluster since its last report, so a burst of new devices within one report interval spreads over
the clusters instead of all landing on the one that looked idle a second ago. Ties go to the lower
recent latency, then to the name, so the choice is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shoal.modelrepo.versions import version_key
from shoal.protocol.central_messages import ModelLoad


@dataclass(frozen=True)
class ClusterInfo:
    name: str
    address: str
    models: tuple[ModelLoad, ...]
    last_report: float  # monotonic seconds of the last report


@dataclass(frozen=True)
class Choice:
    cluster: ClusterInfo
    entry: ModelLoad
    load: float


def is_live(c: ClusterInfo, now: float, max_age_s: float) -> bool:
    return now - c.last_report < max_age_s


def load_of(entry: ModelLoad, assigned: float = 0.0) -> float:
    if entry.capacity <= 0:
        return math.inf
    return (entry.in_flight + entry.queue + assigned) / entry.capacity


def choose_cluster(
    clusters: Iterable[ClusterInfo],
    model: str,
    version: str | None = None,
    exclude: Iterable[str] = (),
    *,
    now: float,
    max_age_s: float = 3.0,
    assigned: Mapping[str, float] | None = None,
) -> Choice | None:
    """The cluster to send a device to, or None when no live cluster outside ``exclude`` serves it."""
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
    best = min(
        candidates,
        key=lambda cm: (
            not cm[1].ready,  # awake first
            load_of(cm[1], assigned.get(cm[0].name, 0.0)),
            cm[1].latency_ms,
            cm[0].name,
        ),
    )
    return Choice(best[0], best[1], load_of(best[1], assigned.get(best[0].name, 0.0)))
