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

An epoch is: every peer trains one pass over its shard; then, every ``every`` epochs, the group runs
one fusion round (round ``r`` = the number of rounds run before) over its topology; then every peer
is evaluated on the test set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shoal.fusion.algorithm import fuse
from shoal.fusion.topology import schedule

# Lists of per-peer weight arrays, in layer order: W1 [in, h1], b1 [h1], W2, b2, ...
PeerWeights = list[np.ndarray]


def layer_sizes(n_features: int, hidden: Sequence[int], n_classes: int) -> list[int]:
    return [n_features, *hidden, n_classes]


def init_weights(sizes: Sequence[int], seed: int, peer: int = 0, shared: bool = True) -> PeerWeights:
    """Glorot-uniform weights (suited to tanh), zero biases. Shared init: every peer gets the same draw.

    Averaging only helps peers that start from the same weights (their hidden units then line up);
    ``shared=False`` gives each peer its own draw to show what happens without it.
    """
    rng = np.random.default_rng([seed, 0x1417, 0 if shared else peer + 1])
    out: PeerWeights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        out.append(rng.uniform(-limit, limit, size=(fan_in, fan_out)))
        out.append(np.zeros(fan_out))
    return out


def epoch_order(shard: np.ndarray, seed: int, peer: int, epoch: int) -> np.ndarray:
    """The order in which peer ``peer`` visits its shard in ``epoch`` (same in every engine)."""
    return shard[np.random.default_rng([seed, peer, epoch, 0x0DE5]).permutation(len(shard))]


def epoch_batches(orders: Sequence[np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack the peers' orders into ``idx [steps, peers, batch]`` and ``mask`` (0 where a peer is done)."""
    steps = max(math.ceil(len(o) / batch) for o in orders)
    idx = np.zeros((steps * batch, len(orders)), np.int64)
    mask = np.zeros((steps * batch, len(orders)), np.float32)
    for p, o in enumerate(orders):
        idx[: len(o), p] = o
        mask[: len(o), p] = 1.0
    shape = (steps, batch, len(orders))
    return idx.reshape(shape).transpose(0, 2, 1).copy(), mask.reshape(shape).transpose(0, 2, 1).copy()


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

    def train_epoch(self, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, mask: np.ndarray) -> None:
        """One SGD pass: step ``s`` trains peer ``p`` on rows ``idx[s, p]`` (weighted by ``mask``)."""
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

    def predict(self, x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Predicted classes ``[P, N]`` of every peer on the same rows ``x [N, D]``."""
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], chunk):
                h = x[start : start + chunk]
                for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                    h = torch.matmul(h, w) + b
                    if k < len(self.weights) - 1:
                        h = torch.tanh(h)
                out.append(h.argmax(-1))
        return torch.cat(out, dim=1)

    def errors(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        return (self.predict(x) != y).to(torch.float64).mean(1).numpy()

    def fuse_steps(self, steps: Sequence[tuple[list[int], list[int], list[float]]]) -> None:
        """Run fusions: each step fuses rows ``a[k]`` with ``b[k]`` at rate ``f[k]`` (all distinct rows)."""
        for a, b, f in steps:
            ia, ib = torch.tensor(a), torch.tensor(b)
            rate = torch.tensor(f, dtype=self.dtype).unsqueeze(1)
            new_a, new_b = fuse(self.flat[ia], self.flat[ib], rate)
            self.flat[ia] = new_a
            self.flat[ib] = new_b

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

    def train_epoch(self, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, mask: np.ndarray) -> None:
        for p, model in enumerate(self.models):
            for s in range(idx.shape[0]):
                rows = torch.from_numpy(idx[s, p][mask[s, p] > 0])
                if len(rows) == 0:
                    break
                loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="sum")
                model.zero_grad()
                loss.backward()
                with torch.no_grad():
                    for param in model.parameters():
                        param.sub_(param.grad, alpha=self.lr)

    def errors(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.array([(m(x).argmax(-1) != y).to(torch.float64).mean().item() for m in self.models])

    def fuse_steps(self, steps: Sequence[tuple[list[int], list[int], list[float]]]) -> None:
        for a, b, f in steps:
            for i, j, rate in zip(a, b, f, strict=True):
                with torch.no_grad():
                    for pa, pb in zip(self.models[i].parameters(), self.models[j].parameters(), strict=True):
                        na, nb = fuse(pa.detach().clone(), pb.detach().clone(), rate)
                        pa.copy_(na)
                        pb.copy_(nb)

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
    """Peers that fuse with each other: one topology, rate, frequency and seed."""

    topology: str  # ring, random, hypercube, or none (peers train alone)
    shards: list[np.ndarray]  # each peer's training rows
    seed: int = 0
    rate: float = 0.55
    every: int = 1
    shared_init: bool = True
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trace:
    """What a run produced: ``errors[e][p]`` after epoch ``e`` (row 0: before training), final weights."""

    groups: list[Group]
    errors: np.ndarray  # [epochs + 1, total peers]
    offsets: list[int]  # first row of each group in the peer dimension
    weights: list[PeerWeights]
    seconds: float

    def group_errors(self, g: int) -> np.ndarray:
        start = self.offsets[g]
        return self.errors[:, start : start + len(self.groups[g].shards)]


def fusion_steps(
    groups: Sequence[Group], offsets: Sequence[int], epoch: int
) -> list[tuple[list[int], list[int], list[float]]]:
    """Merge the groups that fuse after ``epoch`` (1-based) into steps of disjoint pairs.

    Step ``k`` holds the ``k``-th pair of every group's schedule; groups are disjoint, so one step's
    pairs touch distinct peers and run as one vectorised fusion.
    """
    per_group = []
    for g, off in zip(groups, offsets, strict=True):
        if g.topology == "none" or epoch % g.every:
            continue
        round_ = epoch // g.every - 1
        sched = schedule(g.topology, len(g.shards), g.seed, round_)
        per_group.append([(off + i, off + j, g.rate) for i, j in sched])
    steps = []
    for k in range(max((len(s) for s in per_group), default=0)):
        pairs = [s[k] for s in per_group if k < len(s)]
        steps.append(([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]))
    return steps


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
    """Train every group's peers for ``epochs`` epochs in one engine; fuse and evaluate as described above.

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
    shards = [s for g in groups for s in g.shards]
    eng = ENGINES[engine](peers, lr, dtype)
    x = torch.tensor(dataset.x_train, dtype=dtype)
    y = torch.tensor(dataset.y_train, dtype=torch.int64)
    xt = torch.tensor(dataset.x_test, dtype=dtype)
    yt = torch.tensor(dataset.y_test, dtype=torch.int64)
    errors = np.zeros((epochs + 1, len(peers)))
    errors[0] = eng.errors(xt, yt)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        orders = [epoch_order(s, sd, p, epoch) for s, sd, p in zip(shards, seeds, peer_ids, strict=True)]
        idx, mask = epoch_batches(orders, batch)
        eng.train_epoch(x, y, idx, mask)
        eng.fuse_steps(fusion_steps(groups, offsets, epoch))
        errors[epoch] = eng.errors(xt, yt)
        if on_epoch is not None:
            on_epoch(epoch, errors[epoch])
    seconds = time.perf_counter() - t0
    weights = [eng.peer_weights(p) for p in range(len(peers))]
    return Trace(list(groups), errors, offsets, weights, seconds)


def train_peer(
    dataset: Any,
    shard: np.ndarray,
    weights: PeerWeights,
    seed: int,
    peer: int,
    epochs: Sequence[int],
    hidden: Sequence[int],
    lr: float,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
) -> PeerWeights:
    """Train one peer alone over the given (1-based, global) epochs: what a Flower node runs locally.

    Uses the same data order and step as :func:`run`, so a peer on another machine computes the
    weights the in-process runner would.
    """
    eng = BatchedEngine([weights], lr, dtype)
    x = torch.tensor(dataset.x_train, dtype=dtype)
    y = torch.tensor(dataset.y_train, dtype=torch.int64)
    for epoch in epochs:
        idx, mask = epoch_batches([epoch_order(shard, seed, peer, epoch)], batch)
        eng.train_epoch(x, y, idx, mask)
    return eng.peer_weights(0)
