"""One peer, numpy only: its initial weights, its data order, and its local training between fusions.

This is what a site runs (``flower_app``'s ClientApp), so a site needs numpy and no torch. The
in-process engine (``runner``) takes its initial weights and data order from here and trains all peers
at once in torch with the same SGD step; the two agree to float precision (tested in float64).

The model is paper 003's MLP: ``x @ W + b`` per layer, tanh between layers, softmax cross-entropy on
the logits; SGD on the gradient of the batch's *summed* loss, so the learning rate is a per-example
step and batch 1 is the paper's online SGD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

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


def steps_per_epoch(n_rows: int, batch: int) -> int:
    return max(1, math.ceil(n_rows / batch))


def _own_epoch(
    shard: np.ndarray, seed: int, peer: int, epoch: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """One of a peer's own epochs as ``idx, mask [steps, batch]`` (the last batch may be short)."""
    order = epoch_order(shard, seed, peer, epoch)
    steps = steps_per_epoch(len(order), batch)
    idx = np.zeros(steps * batch, np.int64)
    mask = np.zeros(steps * batch, np.float32)
    idx[: len(order)] = order
    mask[: len(order)] = 1.0
    return idx.reshape(steps, batch), mask.reshape(steps, batch)


def peer_epoch_batches(
    shard: np.ndarray, seed: int, peer: int, batch: int, epoch: int, ticks: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Peer ``peer``'s epoch ``epoch`` (1-based) as ``idx, mask [ticks, batch]``, masked after its last step."""
    idx, mask = _own_epoch(shard, seed, peer, epoch, batch)
    ticks = len(idx) if ticks is None else ticks
    out_i = np.zeros((ticks, batch), np.int64)
    out_m = np.zeros((ticks, batch), np.float32)
    out_i[: len(idx)] = idx
    out_m[: len(idx)] = mask
    return out_i, out_m


def peer_step_batches(
    shard: np.ndarray, seed: int, peer: int, batch: int, start: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Peer ``peer``'s optimizer steps ``start .. start+count-1`` (0-based) with its epochs back to back."""
    per_epoch = steps_per_epoch(len(shard), batch)
    idx_parts, mask_parts = [], []
    first = start // per_epoch
    last = (start + count - 1) // per_epoch
    for e in range(first, last + 1):
        i, m = _own_epoch(shard, seed, peer, e + 1, batch)
        idx_parts.append(i)
        mask_parts.append(m)
    offset = start - first * per_epoch
    idx = np.concatenate(idx_parts)[offset : offset + count]
    mask = np.concatenate(mask_parts)[offset : offset + count]
    return idx, mask


def work_batches(
    shard: np.ndarray, seed: int, peer: int, batch: int, work: Any
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The minibatches of one round of local work, as ``(idx, mask) [steps, batch]`` chunks.

    ``work`` is a strategy's ``local_work(round)`` (``{"unit", "start", "count"}``, start 0-based) or a
    list of 1-based epochs.
    """
    if isinstance(work, dict) and work["unit"] == "steps":
        return [peer_step_batches(shard, seed, peer, batch, int(work["start"]), int(work["count"]))]
    if isinstance(work, dict):
        epochs: Sequence[int] = range(int(work["start"]) + 1, int(work["start"]) + int(work["count"]) + 1)
    else:
        epochs = list(work)
    return [peer_epoch_batches(shard, seed, peer, batch, e) for e in epochs]


def forward(weights: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits ``[N, classes]``."""
    h = x
    for k in range(0, len(weights), 2):
        h = h @ weights[k] + weights[k + 1]
        if k + 2 < len(weights):
            h = np.tanh(h)
    return h


def error(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows misclassified (NaN for no rows)."""
    if len(y) == 0:
        return float("nan")
    return float((forward(weights, np.asarray(x, weights[0].dtype)).argmax(1) != y).mean())


def train_local(
    dataset: Any,
    shard: np.ndarray,
    weights: Sequence[np.ndarray],
    seed: int,
    peer: int,
    work: Any,
    lr: float,
    batch: int = 1,
) -> PeerWeights:
    """Train one peer alone for one round of ``work`` from ``weights``; returns new arrays.

    Computes in the dtype of ``weights`` (float32 at a site). Same data order and step as the
    in-process engine, which back-propagates through the old weights of a layer before updating it.
    """
    ws = [np.array(w, copy=True) for w in weights]
    dtype = ws[0].dtype
    x_all = dataset.x_train
    y_all = dataset.y_train
    n_layers = len(ws) // 2
    for idx, mask in work_batches(shard, seed, peer, batch, work):
        for s in range(len(idx)):
            m = mask[s].astype(dtype)
            if not m.any():
                continue
            h = np.asarray(x_all[idx[s]], dtype)
            acts = [h]
            for k in range(n_layers):
                z = h @ ws[2 * k] + ws[2 * k + 1]
                h = np.tanh(z) if k < n_layers - 1 else z
                acts.append(h)
            d = np.exp(h - h.max(1, keepdims=True))
            d /= d.sum(1, keepdims=True)
            d[np.arange(len(d)), y_all[idx[s]]] -= 1.0
            d *= m[:, None]
            for k in reversed(range(n_layers)):
                a = acts[k]
                d_prev = (d @ ws[2 * k].T) * (1.0 - a * a) if k > 0 else None
                ws[2 * k] -= lr * (a.T @ d)
                ws[2 * k + 1] -= lr * d.sum(0)
                if d_prev is not None:
                    d = d_prev
    return ws
