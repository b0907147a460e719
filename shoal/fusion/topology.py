"""Fusion topologies (paper 003, Algorithms 2-4) as schedules: the ordered pairs of one fusion round.

A schedule is a list of ``(a, b)`` peer indices; ``(a, b)`` means ``fuse(A=peer a, B=peer b)``, and the
order matters because each fusion sees the result of the previous ones. The functions are pure:
the random topology is a function of ``(n, seed, round)``, so every engine (and every machine) that
asks for the same round gets the same pairs.
"""

from __future__ import annotations

import numpy as np

Pair = tuple[int, int]
Schedule = list[Pair]

TOPOLOGIES = ("ring", "random", "hypercube")
# The two readings of Algorithm 4: every edge fused twice per stage as printed, or once.
HYPERCUBE_EDGES = ("twice", "once")


def ring(n: int) -> Schedule:
    """Algorithm 2: ``(0,1), (1,2), ..., (n-2,n-1)``, then the last peer with the first, ``(n-1,0)``.

    Knowledge accumulates as the round walks around the ring. The paper's last step reads
    ``ModelFusion(N_S, N_0)`` with ``S`` peers; ``N_S`` does not exist, so shoal reads it as the last
    peer ``N_{S-1}``. With two peers the round is ``(0,1), (1,0)``, as the algorithm's loop gives.
    """
    if n < 2:
        return []
    return [(s, (s + 1) % n) for s in range(n)]


def random_pairs(n: int, seed: int, round_: int) -> Schedule:
    """Algorithm 3 as its prose describes it: every peer fuses with one random other peer.

    A random permutation is cut into consecutive pairs. Algorithm 3's pseudo-code draws ``r1, r2``
    independently (a peer may then fuse with itself, or not at all); shoal follows the text instead
    ("every network is connected to another random network"). With an odd number of peers the one
    left over fuses, as ``A``, with a random one of the others after the pairs ("one network will be
    randomly fused with two other networks"). Pairs are reset every round and reproducible from
    ``(seed, round)``.
    """
    if n < 2:
        return []
    rng = np.random.default_rng([seed, round_, 0x5EED])
    perm = [int(p) for p in rng.permutation(n)]
    schedule = [(perm[k], perm[k + 1]) for k in range(0, n - 1, 2)]
    if n % 2:
        schedule.append((perm[-1], perm[int(rng.integers(n - 1))]))
    return schedule


def hypercube_stages(n: int, edges: str = "twice") -> list[Schedule]:
    """Algorithm 4 by stage: stage ``x`` fuses every peer ``s`` with its neighbour ``s`` xor ``2**x``.

    Two readings, by ``edges``:

    - ``"twice"`` (the default, Algorithm 4 as printed): the inner loop runs over every ``s`` with
      ``N_s`` as A, so each edge is fused twice per stage, once from each end: ``(s, b)`` when the
      loop reaches ``s`` and ``(b, s)`` when it reaches ``b``.
    - ``"once"``: each edge once per stage, the lower-numbered peer as A (a hypercube exchange).

    When ``n`` is not a power of two the peers sit on the first ``n`` corners of the smallest cube
    that holds them and an edge to a missing corner is skipped (that peer sits the stage out). The
    graph stays connected: clearing one bit of a present corner always gives a present corner.
    """
    check_hypercube(edges)
    if n < 2:
        return []
    dims = (n - 1).bit_length()
    stages = []
    for x in range(dims):
        bit = 1 << x
        if edges == "twice":
            stages.append([(s, s ^ bit) for s in range(n) if s ^ bit < n])
        else:
            stages.append([(s, s ^ bit) for s in range(n) if s & bit == 0 and s ^ bit < n])
    return stages


def hypercube(n: int, edges: str = "twice") -> Schedule:
    """Algorithm 4: the stages of :func:`hypercube_stages` one after another."""
    return [pair for stage in hypercube_stages(n, edges) for pair in stage]


def check_hypercube(edges: str) -> str:
    if edges not in HYPERCUBE_EDGES:
        raise ValueError(f"unknown hypercube reading {edges!r}: use one of {', '.join(HYPERCUBE_EDGES)}")
    return edges


def parallel_stages(sched: Schedule) -> list[Schedule]:
    """Cut a schedule into consecutive runs of pairs that touch distinct peers.

    Pairs within a run do not interact, so an engine may fuse them at once; the runs stay in order,
    so the result equals fusing the pairs one by one.
    """
    out: list[Schedule] = []
    seen: set[int] = set()
    for a, b in sched:
        if not out or a in seen or b in seen:
            out.append([])
            seen = set()
        out[-1].append((a, b))
        seen.update((a, b))
    return out


def schedule(
    topology: str, n: int, seed: int = 0, round_: int = 0, hypercube_edges: str = "twice"
) -> Schedule:
    """The schedule of one fusion round of ``topology`` over ``n`` peers (``none``: no fusion)."""
    if topology == "ring":
        return ring(n)
    if topology == "random":
        return random_pairs(n, seed, round_)
    if topology == "hypercube":
        return hypercube(n, hypercube_edges)
    if topology == "none":
        return []
    raise ValueError(f"unknown topology {topology!r}: use one of {', '.join(TOPOLOGIES)} or none")
