"""What the catalogue's regression and classification families on feature tables share: the split,
the standardisation kept inside the network (so the served model takes raw features, as a device
has them) and the test figures."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Standardise(nn.Module):
    """(x - mean) / std with the training set's statistics, as constants of the graph."""

    def __init__(self, x: np.ndarray) -> None:
        super().__init__()
        std = x.std(0)
        self.register_buffer("mean", torch.tensor(x.mean(0), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(np.where(std > 1e-9, std, 1.0), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train and test row indices; the same seed, the same split."""
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * test_fraction)))
    return np.sort(order[k:]), np.sort(order[:k])


def f32(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


@torch.no_grad()
def regression_figures(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    dev = next(model.parameters()).device
    pred = model(x.to(dev)).cpu().reshape(-1)
    err = pred - y.reshape(-1)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {
        "test_rmse": float(err.pow(2).mean().sqrt()),
        "test_mae": float(err.abs().mean()),
        "test_r2": 1.0 - float(err.pow(2).sum()) / ss_tot if ss_tot else 0.0,
    }


@torch.no_grad()
def classification_figures(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    dev = next(model.parameters()).device
    logits = model(x.to(dev)).cpu()
    return {
        "test_loss": float(F.cross_entropy(logits, y)),
        "test_accuracy": float((logits.argmax(1) == y).float().mean()),
    }


def predicted_against_true(ax: object, true: np.ndarray, pred: np.ndarray, quantity: str, title: str) -> None:
    """A regression's test rows on a matplotlib axis: predicted against true, and the diagonal."""
    ax.scatter(true, pred, s=12)  # type: ignore[attr-defined]
    lim = [min(true.min(), pred.min()), max(true.max(), pred.max())]
    ax.plot(lim, lim, "k--", lw=1)  # type: ignore[attr-defined]
    ax.set_xlabel(f"{quantity} (true)")  # type: ignore[attr-defined]
    ax.set_ylabel("predicted")  # type: ignore[attr-defined]
    ax.set_title(title)  # type: ignore[attr-defined]
