"""Scheduling policies of the gateway, as pure functions over plain state (tested in isolation)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from shoal.modelrepo.versions import newest_version, version_key  # noqa: F401 (the one order, used here)


class WorkerLoadView(Protocol):
    in_flight: int
    capacity: int
    latency_ewma_ms: float
    accepting: bool


def pick_worker(workers: Sequence[WorkerLoadView]) -> int | None:
    """Index of the least-loaded worker that can take one more request, or None when all are full.

    Load is requests in flight relative to the capacity the worker announced (running plus its
    prefetch queue); ties go to the worker with the lower recent latency, then to the earlier one in
    the list. A worker never gets more than its capacity, and a draining worker gets nothing.
    """
    best = None
    best_key = (2.0, 0.0)
    for i, w in enumerate(workers):
        if not w.accepting or w.in_flight >= w.capacity:
            continue
        key = (w.in_flight / w.capacity, w.latency_ewma_ms)
        if key < best_key:
            best, best_key = i, key
    return best


def ewma(previous: float, sample: float, alpha: float = 0.2) -> float:
    """Recent latency: exponentially weighted; the first sample replaces the zero start."""
    return sample if previous <= 0.0 else previous + alpha * (sample - previous)


def retry_after_s(queue_len: int, capacity_total: int, latency_ms: float) -> int:
    """Seconds a refused client should wait: the time to drain the queue at current speed, at least 1."""
    if capacity_total <= 0 or latency_ms <= 0:
        return 1
    drain_s = queue_len / capacity_total * latency_ms / 1000.0
    return max(1, min(30, int(drain_s + 0.999)))


def shed_retry_after_ms(wait_s: float, left_s: float) -> int:
    """Milliseconds a request refused for its deadline should wait before it tries again: until the
    work queued before it has drained enough for its answer to fit (``wait_s`` predicted, ``left_s``
    its deadline's remainder), at least 1."""
    return max(1, math.ceil(round((wait_s - left_s) * 1000.0, 3)))


class Patience:
    """How long a model's clients wait before they give up, learned from those that leave (disconnect
    or cancel) before their answer: the 10th percentile of the last 64 waits, once at least 8 came
    within 10 s, forgotten 10 s after the last. A request whose client did not say its deadline is
    admitted against this as well (``Dispatcher.submit``): clients that give up after 300 ms without
    saying so are refused at once instead of queued for answers nobody will read."""

    WINDOW_S = 10.0
    MIN_SEEN = 8
    KEEP = 64

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []  # (when, how long it had waited)
        self.value: float | None = None

    def left(self, waited_s: float, now: float) -> None:
        seen = self.seen
        seen.append((now, waited_s))
        if len(seen) > self.KEEP:
            del seen[0]
        recent = sorted(w for t, w in seen if now - t <= self.WINDOW_S)
        self.value = recent[len(recent) // 10] if len(recent) >= self.MIN_SEEN else None

    def seconds(self, now: float) -> float | None:
        """The clients' patience now; None when too few left lately to tell."""
        if self.value is None or now - self.seen[-1][0] > self.WINDOW_S:
            return None
        return self.value


MAX_PRIORITY_LEVELS = 16


def parse_priorities(levels: int, default: int, block: Any) -> tuple[int, int, dict[str, int]]:
    """The gateway's priority levels, its default level and the file's ``priorities`` block (model ->
    default level), checked: ``ValueError`` says what is wrong."""
    if not 1 <= levels <= MAX_PRIORITY_LEVELS:
        raise ValueError(f"--priority-levels must be 1 to {MAX_PRIORITY_LEVELS}, not {levels}")
    if not 1 <= default <= levels:
        raise ValueError(f"--default-priority must be a level from 1 to {levels}, not {default}")
    if block is None:
        return levels, default, {}
    if not isinstance(block, dict):
        raise ValueError("priorities: must map model names to their default priority level")
    per_model = {}
    for model, level in block.items():
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= levels:
            raise ValueError(f"priorities.{model}: a level from 1 to {levels}, not {level!r}")
        per_model[str(model)] = level
    return levels, default, per_model


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's live versions a gateway serves: ``all``, the newest ``n`` (``latest``) or the
    listed ``versions`` (``specific``). Declared per model in the gateway file's ``versions`` block."""

    kind: Literal["all", "latest", "specific"] = "all"
    n: int = 0  # latest: how many of the newest
    versions: tuple[str, ...] = ()  # specific: which


def parse_version_policy(decl: object, where: str) -> VersionPolicy:
    """``{policy: all}``, ``{policy: latest, n: 2}`` or ``{policy: specific, versions: ["1", "3"]}``."""
    if not isinstance(decl, dict) or decl.get("policy") not in ("all", "latest", "specific"):
        raise ValueError(f"{where}: policy must be all, latest (with n) or specific (with versions)")
    kind = decl["policy"]
    if kind == "latest":
        n = decl.get("n", 1)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{where}.n: must be a positive integer")
        return VersionPolicy("latest", n=n)
    if kind == "specific":
        vs = decl.get("versions")
        if not isinstance(vs, list) or not vs:
            raise ValueError(f"{where}.versions: must be a non-empty list")
        return VersionPolicy("specific", versions=tuple(str(v) for v in vs))
    return VersionPolicy("all")


def visible_versions(policy: VersionPolicy | None, live: Iterable[str]) -> set[str]:
    """Which of the versions that have live workers a gateway serves, under a model's version policy:
    all of them, the newest n, or a listed few."""
    live = list(live)
    if policy is None or policy.kind == "all":
        return set(live)
    if policy.kind == "latest":
        return set(sorted(live, key=version_key)[-policy.n :])
    return {v for v in live if v in policy.versions}
