"""The fusion strategy: who fuses with whom in each round, by which rule, and how often. No transport.

:class:`PeerFusion` holds the whole of paper 003's schedule as parameters: the topology (Algorithms
2-4), the fusion rate and rule (Algorithm 1), the readings where the paper is ambiguous, and the fusion
interval. Like a Flower ``Strategy`` it is a small object apart from the engine that moves the
weights: the in-process runner (``runner``) and the Flower ServerApp (``flower_app``) both ask it for a
round's pairs and let it fuse what the peers sent. Unlike Flower's strategies it keeps **one model per
peer**, not a global model: fusion averages pairs of peers, it never makes a single model.

Pure numpy; no torch, no flwr.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shoal.fusion.algorithm import UPDATES, apply_schedule, check_update
from shoal.fusion.topology import HYPERCUBE_EDGES, TOPOLOGIES, check_hypercube, schedule

PeerWeights = list[np.ndarray]

# Not in the paper: every peer takes the plain mean of all present peers each round. A reference that
# mixes as fast as anything can, to tell how much of a topology's gap is mixing and how much is drift.
AVERAGE = "average"
UNITS = ("steps", "epochs")
_INTERVAL_RE = re.compile(r"^\s*(\d+)\s*(steps?|epochs?)?\s*$")


@dataclass(frozen=True, order=True)
class Interval:
    """How much local training happens between two fusion rounds: ``count`` optimizer steps or epochs.

    An epoch is one pass of a peer over its own shard. Parsed from ``"10steps"``, ``"1epoch"``,
    ``"2epochs"`` or a bare number of epochs (``"3"``).
    """

    count: int
    unit: str = "epochs"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unknown interval unit {self.unit!r}: use steps or epochs")
        if self.count < 1:
            raise ValueError(f"a fusion interval must be at least 1 {self.unit[:-1]}, not {self.count}")

    @classmethod
    def parse(cls, text: str | int | Interval) -> Interval:
        if isinstance(text, Interval):
            return text
        m = _INTERVAL_RE.match(str(text))
        if not m:
            raise ValueError(f"bad fusion interval {text!r}: write it like 10steps, 1epoch or 2epochs")
        unit = m.group(2) or "epochs"
        return cls(int(m.group(1)), unit if unit.endswith("s") else unit + "s")

    def __str__(self) -> str:
        unit = self.unit if self.count != 1 or self.unit == "steps" else self.unit[:-1]
        return f"{self.count}{unit}"


@dataclass(frozen=True)
class PeerFusion:
    """Paper 003's cooperative learning schedule over ``peers`` peers (indices ``0..peers-1``).

    - ``topology``: ``ring`` (Alg. 2), ``random`` (Alg. 3), ``hypercube`` (Alg. 4), ``average`` (a
      reference, not in the paper) or ``none`` (peers train alone);
    - ``rate``: the fusion rate F of Algorithm 1;
    - ``update``: Algorithm 1's order, ``sequential`` as printed or ``simultaneous``;
    - ``hypercube_edges``: Algorithm 4's reading, ``twice`` per stage as printed or ``once``;
    - ``every``: the fusion interval (steps or epochs of local training per round);
    - ``seed``: the random topology's pairs are a function of ``(seed, round)``.

    Rounds are numbered from 0; round ``r`` follows ``(r+1) * every`` of local training.
    """

    peers: int
    topology: str = "ring"
    rate: float = 0.55
    update: str = "sequential"
    hypercube_edges: str = "twice"
    every: Interval = field(default_factory=lambda: Interval(1, "epochs"))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.peers < 1:
            raise ValueError(f"need at least one peer, not {self.peers}")
        if self.topology not in (*TOPOLOGIES, AVERAGE, "none"):
            raise ValueError(
                f"unknown topology {self.topology!r}: use one of {', '.join(TOPOLOGIES)}, {AVERAGE} or none"
            )
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"the fusion rate must lie in [0, 1], not {self.rate}")
        check_update(self.update)
        check_hypercube(self.hypercube_edges)
        object.__setattr__(self, "every", Interval.parse(self.every))

    def pairs(self, round_: int, present: set[int] | None = None) -> list[tuple[int, int]]:
        """The ordered pairs fused in round ``round_``; pairs with a peer not in ``present`` are skipped."""
        if self.topology in (AVERAGE, "none"):
            return []
        sched = schedule(self.topology, self.peers, self.seed, round_, self.hypercube_edges)
        if present is None:
            return sched
        return [(a, b) for a, b in sched if a in present and b in present]

    def fuse(self, round_: int, received: Mapping[int, Sequence[np.ndarray]]) -> dict[int, PeerWeights]:
        """The server's work in one round: fuse the weights the present peers sent, return theirs.

        Peers missing from ``received`` (dropped out, timed out) sit the round out: every pair that
        involves one is skipped, and they keep what they had.
        """
        unknown = [p for p in received if not 0 <= p < self.peers]
        if unknown:
            raise ValueError(f"peers {unknown} are outside 0..{self.peers - 1}")
        if self.topology == AVERAGE:
            if not received:
                return {}
            mean = [np.mean(np.stack(ws), axis=0) for ws in zip(*received.values(), strict=True)]
            return {p: [m.copy() for m in mean] for p in received}
        table: list[Sequence[np.ndarray]] = [received.get(p, []) for p in range(self.peers)]
        fused = apply_schedule(table, self.pairs(round_, set(received)), self.rate, self.update)
        return {p: list(fused[p]) for p in received}

    def local_work(self, round_: int) -> dict[str, int | str]:
        """What each peer trains before round ``round_``: ``{"unit", "start", "count"}`` (0-based start)."""
        return {"unit": self.every.unit, "start": round_ * self.every.count, "count": self.every.count}

    def describe(self) -> dict[str, Any]:
        """The strategy as plain data (provenance of a fused model, logs)."""
        d = asdict(self)
        d["every"] = str(self.every)
        return d


__all__ = ["AVERAGE", "HYPERCUBE_EDGES", "TOPOLOGIES", "UPDATES", "Interval", "PeerFusion"]
