"""In-process engine for cooperative learning: many peers trained at once as one batched computation.

Every peer is a tanh MLP with its own weights. All peers of all replicas of an experiment (each
topology, fusion rate, fusion frequency and seed is a *group* of peers) live in one tensor with a
leading peer dimension, so one SGD step of every peer is a handful of batched matmuls
(``torch.baddbmm``) instead of a Python loop over peers. The fusion rule and the schedules come from
the pure functions in ``algorithm`` and ``topology``; this module only runs them.

Training is plain SGD on the softmax cross-entropy, with the gradient of the batch's *summed* loss:
the learning rate is a per-example step, so batch 1 is exactly the paper's online SGD and a batch of
``b`` takes the same step per example. Each peer walks its own shard in its own order, reproducible
from ``(seed, peer, epoch)``; peers with smaller shards sit out the last steps of an epoch (masked),
so every peer sees exactly its shard once per epoch, as it would if trained alone.

Time runs in *ticks*: one tick is one optimizer step of every peer at once. An engine epoch is ``T``
ticks, the steps of one pass over the largest shard. A group fuses on its interval (its strategy's
``every``):

- every ``K`` epochs: each peer trains one pass over its shard per engine epoch (peers with smaller
  shards sit out the last ticks, masked); after every ``K``-th engine epoch the group runs a round;
- every ``k`` steps: each peer walks its own epochs back to back (a peer with a smaller shard starts
  its next epoch sooner, nothing is masked), and the group runs a round after every ``k``-th tick.

Round ``r`` (0-based) is the ``r``-th round the group runs. Every peer is evaluated on the test set
once per engine epoch (the "epoch" of the error curves): right after its group's last fusion round of
that epoch, so that curves of different intervals all show fused models, and also right before that
round, which measures the drift since the previous round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shoal.fusion.algorithm import fuse
from shoal.fusion.peer import (  # noqa: F401  (the engine's data order and start, shared with sites)
    PeerWeights,
    epoch_order,
    init_weights,
    layer_sizes,
    peer_epoch_batches,
    peer_step_batches,
    steps_per_epoch,
    train_local,
    work_batches,
)
from shoal.fusion.strategy import AVERAGE, Interval, PeerFusion
from shoal.fusion.topology import parallel_stages


def stack_peers(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-peer ``[ticks, batch]`` arrays into the engine's ``idx, mask [ticks, peers, batch]``."""
    idx = np.stack([p[0] for p in parts], axis=1)
    mask = np.stack([p[1] for p in parts], axis=1)
    return np.ascontiguousarray(idx), np.ascontiguousarray(mask)


class BatchedEngine:
    """``P`` MLPs in one flat parameter tensor ``[P, n_params]`` with per-layer views for the matmuls.

    The flat layout makes a fusion one vectorised :func:`fuse` call on whole rows.
    """

    def __init__(self, peers: Sequence[PeerWeights], lr: float, dtype: torch.dtype = torch.float32) -> None:
        self.lr = lr
        self.dtype = dtype
        self.shapes = [w.shape for w in peers[0]]
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.flat = torch.tensor(
            np.stack([np.concatenate([np.asarray(w).ravel() for w in p]) for p in peers]), dtype=dtype
        )
        n_peers = len(peers)
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        offset = 0
        for shape, size in zip(self.shapes, sizes, strict=True):
            view = self.flat[:, offset : offset + size]
            if len(shape) == 2:
                self.weights.append(view.view(n_peers, *shape))
            else:
                self.biases.append(view.view(n_peers, 1, shape[0]))
            offset += size

    @property
    def n_peers(self) -> int:
        return int(self.flat.shape[0])

    def train_steps(self, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, mask: np.ndarray) -> None:
        """SGD steps: step ``s`` trains peer ``p`` on rows ``idx[s, p]`` (weighted by ``mask``)."""
        idx_t = torch.from_numpy(idx)
        mask_t = torch.from_numpy(mask).to(self.dtype).unsqueeze(-1)
        n_layers = len(self.weights)
        lr = self.lr
        with torch.no_grad():
            for s in range(idx_t.shape[0]):
                rows = idx_t[s]
                h = x[rows]  # [P, B, D]
                acts = [h]
                for k in range(n_layers):
                    z = torch.baddbmm(self.biases[k], h, self.weights[k])
                    h = torch.tanh(z) if k < n_layers - 1 else z
                    acts.append(h)
                # d(sum of cross-entropies)/d(logits) = softmax - one-hot, zero for masked rows.
                d = torch.softmax(h, dim=-1)
                d.scatter_add_(2, y[rows].unsqueeze(-1), -torch.ones_like(d[..., :1]))
                d.mul_(mask_t[s])
                for k in reversed(range(n_layers)):
                    a = acts[k]
                    d_prev = None
                    if k > 0:  # back-propagate through the old weights before updating them
                        d_prev = torch.bmm(d, self.weights[k].transpose(1, 2))
                        d_prev.mul_(1.0 - a * a)
                    self.weights[k].baddbmm_(a.transpose(1, 2), d, alpha=-lr)
                    self.biases[k].sub_(d.sum(dim=1, keepdim=True), alpha=lr)
                    d = d_prev

    def predict(self, x: torch.Tensor, rows: Sequence[int] | None = None, chunk: int = 2048) -> torch.Tensor:
        """Predicted classes ``[P, N]`` of every peer (or of ``rows``) on the same inputs ``x [N, D]``."""
        sel = torch.tensor(list(rows)) if rows is not None else None
        weights = [w if sel is None else w[sel] for w in self.weights]
        biases = [b if sel is None else b[sel] for b in self.biases]
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], chunk):
                h = x[start : start + chunk]
                for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
                    h = torch.matmul(h, w) + b
                    if k < len(weights) - 1:
                        h = torch.tanh(h)
                out.append(h.argmax(-1))
        return torch.cat(out, dim=1)

    def errors(self, x: torch.Tensor, y: torch.Tensor, rows: Sequence[int] | None = None) -> np.ndarray:
        return (self.predict(x, rows) != y).to(torch.float64).mean(1).numpy()

    def fuse_steps(self, steps: Sequence[FusionStep]) -> None:
        """Run fusions: each step fuses rows ``a[k]`` with ``b[k]`` at rate ``f[k]`` by rule ``u[k]``.

        Rows within one step are all distinct, so each rule's pairs fuse as one vectorised call.
        """
        for a, b, f, u in steps:
            for update in set(u):
                k = [i for i, x in enumerate(u) if x == update]
                ia, ib = torch.tensor([a[i] for i in k]), torch.tensor([b[i] for i in k])
                rate = torch.tensor([f[i] for i in k], dtype=self.dtype).unsqueeze(1)
                new_a, new_b = fuse(
                    self.flat.index_select(0, ia), self.flat.index_select(0, ib), rate, update
                )
                self.flat.index_copy_(0, ia, new_a)
                self.flat.index_copy_(0, ib, new_b)

    def average(self, rows: Sequence[list[int]]) -> None:
        """Set each list of rows to its mean (the ``average`` reference topology)."""
        for r in rows:
            i = torch.tensor(r)
            self.flat[i] = self.flat[i].mean(0, keepdim=True)

    def peer_weights(self, p: int) -> PeerWeights:
        row = self.flat[p].numpy().astype(np.float64)
        out, offset = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            out.append(row[offset : offset + size].reshape(shape).copy())
            offset += size
        return out


class LoopEngine:
    """Reference engine: one ``torch.nn`` MLP per peer, autograd and a Python loop over peers.

    Same data order and update as :class:`BatchedEngine`; kept to check it and to measure its speed-up.
    """

    def __init__(self, peers: Sequence[PeerWeights], lr: float, dtype: torch.dtype = torch.float32) -> None:
        self.lr = lr
        self.dtype = dtype
        self.models: list[torch.nn.Sequential] = []
        for p in peers:
            layers: list[torch.nn.Module] = []
            for k in range(0, len(p), 2):
                lin = torch.nn.Linear(p[k].shape[0], p[k].shape[1], dtype=dtype)
                with torch.no_grad():
                    lin.weight.copy_(torch.tensor(p[k].T, dtype=dtype))
                    lin.bias.copy_(torch.tensor(p[k + 1], dtype=dtype))
                layers += [lin, torch.nn.Tanh()]
            self.models.append(torch.nn.Sequential(*layers[:-1]))

    @property
    def n_peers(self) -> int:
        return len(self.models)

    def train_steps(self, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, mask: np.ndarray) -> None:
        for p, model in enumerate(self.models):
            for s in range(idx.shape[0]):
                rows = torch.from_numpy(idx[s, p][mask[s, p] > 0])
                if len(rows) == 0:
                    continue
                loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="sum")
                model.zero_grad()
                loss.backward()
                with torch.no_grad():
                    for param in model.parameters():
                        param.sub_(param.grad, alpha=self.lr)

    def errors(self, x: torch.Tensor, y: torch.Tensor, rows: Sequence[int] | None = None) -> np.ndarray:
        models = self.models if rows is None else [self.models[r] for r in rows]
        with torch.no_grad():
            return np.array([(m(x).argmax(-1) != y).to(torch.float64).mean().item() for m in models])

    def fuse_steps(self, steps: Sequence[FusionStep]) -> None:
        for a, b, f, u in steps:
            for i, j, rate, update in zip(a, b, f, u, strict=True):
                with torch.no_grad():
                    for pa, pb in zip(self.models[i].parameters(), self.models[j].parameters(), strict=True):
                        na, nb = fuse(pa.detach().clone(), pb.detach().clone(), rate, update)
                        pa.copy_(na)
                        pb.copy_(nb)

    def average(self, rows: Sequence[list[int]]) -> None:
        with torch.no_grad():
            for r in rows:
                for params in zip(*(self.models[i].parameters() for i in r), strict=True):
                    mean = torch.stack([q.detach() for q in params]).mean(0)
                    for q in params:
                        q.copy_(mean)

    def peer_weights(self, p: int) -> PeerWeights:
        out = []
        for lin in self.models[p]:
            if isinstance(lin, torch.nn.Linear):
                out += [
                    lin.weight.detach().numpy().T.astype(np.float64),
                    lin.bias.detach().numpy().astype(np.float64),
                ]
        return out


ENGINES: dict[str, type[BatchedEngine] | type[LoopEngine]] = {"batched": BatchedEngine, "loop": LoopEngine}


@dataclass
class Group:
    """Peers that fuse with each other: one topology, rate, interval, reading and seed."""

    topology: str  # ring, random, hypercube, average (reference), or none (peers train alone)
    shards: list[np.ndarray]  # each peer's training rows
    seed: int = 0
    rate: float = 0.55
    every: Interval | int | str = 1  # an int or a bare number: epochs
    shared_init: bool = True
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    update: str = "sequential"
    hypercube_edges: str = "twice"

    def __post_init__(self) -> None:
        self.every = Interval.parse(self.every)
        self.strategy = PeerFusion(
            len(self.shards),
            self.topology,
            self.rate,
            self.update,
            self.hypercube_edges,
            self.every,
            self.seed,
        )

    @property
    def interval(self) -> Interval:
        assert isinstance(self.every, Interval)
        return self.every


@dataclass
class Trace:
    """What a run produced: per-peer test errors by epoch (row 0: before training), final weights.

    ``errors[e][p]``: right after peer ``p``'s group's last fusion round of epoch ``e`` (at the end
    of the epoch if the group did not fuse in it). ``errors_before[e][p]``: right before that round
    (NaN if none), so ``errors_before - errors`` is what the round undid of the drift since the
    previous one.
    """

    groups: list[Group]
    errors: np.ndarray  # [epochs + 1, total peers]
    offsets: list[int]  # first row of each group in the peer dimension
    weights: list[PeerWeights]
    seconds: float
    ticks_per_epoch: int = 0
    errors_before: np.ndarray | None = None

    def group_errors(self, g: int, before: bool = False) -> np.ndarray:
        start = self.offsets[g]
        errs = self.errors_before if before else self.errors
        assert errs is not None
        return errs[:, start : start + len(self.groups[g].shards)]


# One vectorised fusion: rows a[k] and b[k] fuse at rate f[k] by update rule u[k]; all rows distinct.
FusionStep = tuple[list[int], list[int], list[float], list[str]]


def round_due(group: Group, tick: int, ticks_per_epoch: int) -> int | None:
    """The round ``group`` runs after ``tick`` ticks (1-based count), or None if it does not fuse then."""
    every = group.interval
    if group.topology == "none":
        return None
    if every.unit == "steps":
        return tick // every.count - 1 if tick % every.count == 0 else None
    if tick % ticks_per_epoch:
        return None
    epoch = tick // ticks_per_epoch
    return epoch // every.count - 1 if epoch % every.count == 0 else None


def fusion_steps(
    groups: Sequence[Group], offsets: Sequence[int], tick: int, ticks_per_epoch: int
) -> tuple[list[FusionStep], list[list[int]]]:
    """What fuses after ``tick``: pair steps merged across groups, and the row sets to average.

    Each group's round is cut into runs of pairs on distinct peers (``parallel_stages``); step ``k``
    holds run ``k`` of every group. Groups are disjoint, so one step's pairs touch distinct peers and
    run as one vectorised fusion, and the result equals fusing every pair one by one in order.
    """
    per_group: list[list[FusionStep]] = []
    averages: list[list[int]] = []
    for g, off in zip(groups, offsets, strict=True):
        r = round_due(g, tick, ticks_per_epoch)
        if r is None:
            continue
        if g.topology == AVERAGE:
            averages.append([off + p for p in range(len(g.shards))])
            continue
        stages = parallel_stages(g.strategy.pairs(r))
        per_group.append(
            [
                ([off + i for i, _ in st], [off + j for _, j in st], [g.rate] * len(st), [g.update] * len(st))
                for st in stages
            ]
        )
    steps: list[FusionStep] = []
    for k in range(max((len(s) for s in per_group), default=0)):
        parts = [s[k] for s in per_group if k < len(s)]
        steps.append(
            (
                [i for p in parts for i in p[0]],
                [j for p in parts for j in p[1]],
                [f for p in parts for f in p[2]],
                [u for p in parts for u in p[3]],
            )
        )
    return steps, averages


def engine_epoch(
    groups: Sequence[Group], seeds: Sequence[int], peer_ids: Sequence[int], batch: int, epoch: int, ticks: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``idx, mask [ticks, peers, batch]`` of engine epoch ``epoch`` (1-based) for every peer."""
    parts = []
    k = 0
    for g in groups:
        for shard in g.shards:
            if g.interval.unit == "steps":
                parts.append(
                    peer_step_batches(shard, seeds[k], peer_ids[k], batch, (epoch - 1) * ticks, ticks)
                )
            else:
                parts.append(peer_epoch_batches(shard, seeds[k], peer_ids[k], batch, epoch, ticks))
            k += 1
    return stack_peers(parts)


def run(
    dataset: Any,
    groups: Sequence[Group],
    hidden: Sequence[int],
    lr: float,
    epochs: int,
    batch: int = 1,
    engine: str = "batched",
    dtype: torch.dtype = torch.float32,
    start: Sequence[PeerWeights] | None = None,
    on_epoch: Callable[[int, np.ndarray], None] | None = None,
) -> Trace:
    """Train every group's peers for ``epochs`` engine epochs in one engine; fuse and evaluate as above.

    ``dataset`` has ``x_train, y_train, x_test, y_test, n_classes`` (see ``datasets.Dataset``).
    ``start`` overrides the initial weights (one list per peer, all groups in order).
    """
    sizes = layer_sizes(dataset.x_train.shape[1], hidden, dataset.n_classes)
    offsets, peers, seeds, peer_ids = [], [], [], []
    for g in groups:
        offsets.append(len(peers))
        for p in range(len(g.shards)):
            peers.append(init_weights(sizes, g.seed, p, g.shared_init))
            seeds.append(g.seed)
            peer_ids.append(p)
    if start is not None:
        peers = [list(p) for p in start]
    ticks = max(steps_per_epoch(len(s), batch) for g in groups for s in g.shards)
    eng = ENGINES[engine](peers, lr, dtype)
    x = torch.tensor(dataset.x_train, dtype=dtype)
    y = torch.tensor(dataset.y_train, dtype=torch.int64)
    xt = torch.tensor(dataset.x_test, dtype=dtype)
    yt = torch.tensor(dataset.y_test, dtype=torch.int64)
    errors = np.zeros((epochs + 1, len(peers)))
    errors_before = np.full((epochs + 1, len(peers)), np.nan)
    errors[0] = eng.errors(xt, yt)
    step_counts = sorted(
        {g.interval.count for g in groups if g.interval.unit == "steps" and g.topology != "none"}
    )
    rows_of = [list(range(off, off + len(g.shards))) for g, off in zip(groups, offsets, strict=True)]
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        idx, mask = engine_epoch(groups, seeds, peer_ids, batch, epoch, ticks)
        first = (epoch - 1) * ticks
        # Ticks of this epoch after which some group fuses, and the epoch's end.
        cuts = sorted(
            {ticks}
            | {t - first for t in range(first + 1, first + ticks + 1) if any(t % k == 0 for k in step_counts)}
        )
        # Each group is measured right before and after its last round of the epoch, so every curve
        # shows the fused state whatever its interval, and the gap shows the drift in between.
        last = {
            g_i: max((c for c in cuts if round_due(g, first + c, ticks) is not None), default=ticks)
            for g_i, g in enumerate(groups)
        }
        done = 0
        for cut in cuts:
            eng.train_steps(x, y, idx[done:cut], mask[done:cut])
            done = cut
            due = [g_i for g_i, c in last.items() if c == cut]
            fusing = [g_i for g_i in due if round_due(groups[g_i], first + cut, ticks) is not None]
            rows = [r for g_i in fusing for r in rows_of[g_i]]
            if rows:
                errors_before[epoch, rows] = eng.errors(xt, yt, rows)
            pair_steps, averages = fusion_steps(groups, offsets, first + cut, ticks)
            eng.fuse_steps(pair_steps)
            eng.average(averages)
            rows = [r for g_i in due for r in rows_of[g_i]]
            if rows:
                errors[epoch, rows] = eng.errors(xt, yt, rows)
        if on_epoch is not None:
            on_epoch(epoch, errors[epoch])
    seconds = time.perf_counter() - t0
    weights = [eng.peer_weights(p) for p in range(len(peers))]
    return Trace(list(groups), errors, offsets, weights, seconds, ticks, errors_before)


def train_peer(
    dataset: Any,
    shard: np.ndarray,
    weights: PeerWeights,
    seed: int,
    peer: int,
    work: Interval | dict[str, Any] | Sequence[int],
    hidden: Sequence[int],
    lr: float,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
) -> PeerWeights:
    """Train one peer alone: what a site runs between two fusions.

    ``work`` is a strategy's ``local_work(round)`` (``{"unit", "start", "count"}``) or a list of
    1-based epochs. Uses the same data order and step as :func:`run`, so a peer on another machine
    computes the weights the in-process runner would.
    """
    eng = BatchedEngine([weights], lr, dtype)
    x = torch.tensor(dataset.x_train, dtype=dtype)
    y = torch.tensor(dataset.y_train, dtype=torch.int64)
    for idx, mask in work_batches(shard, seed, peer, batch, work):
        eng.train_steps(x, y, *stack_peers([(idx, mask)]))
    return eng.peer_weights(0)


def replay(
    dataset: Any,
    shards: Sequence[np.ndarray],
    strategy: PeerFusion,
    rounds: int,
    hidden: Sequence[int],
    lr: float,
    batch: int = 1,
    absent: dict[int, set[int]] | None = None,
    dtype: type[np.floating[Any]] = np.float32,
) -> dict[int, PeerWeights]:
    """Cooperative learning one peer and one round at a time, as a federation runs it.

    Round ``r`` (0-based): every peer not in ``absent[r]`` trains ``strategy.local_work(r)`` from its
    last fused weights with a site's trainer (``peer.train_local``, numpy), then ``strategy.fuse``
    runs over those present. The batched :func:`run` computes the same weights for one group with
    no absences (tested).
    """
    sizes = layer_sizes(dataset.x_train.shape[1], hidden, dataset.n_classes)
    weights = {
        p: [w.astype(dtype) for w in init_weights(sizes, strategy.seed, p)] for p in range(len(shards))
    }
    for r in range(rounds):
        present = [p for p in range(len(shards)) if p not in (absent or {}).get(r, set())]
        work = strategy.local_work(r)
        received = {
            p: train_local(dataset, shards[p], weights[p], strategy.seed, p, work, lr, batch) for p in present
        }
        weights.update(strategy.fuse(r, received))
    return weights
