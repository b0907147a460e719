"""Paper 002, chapter 4: logistic regression, on one variable and as softmax regression.

    shoal train logistic --data cancer --export models/   # one variable: is a tumour malignant?
    shoal train logistic --data digits --export models/   # softmax over 10 classes

``cancer``: scikit-learn's breast cancer set (569 tumours, Wisconsin) reduced to one variable, the
mean radius, as the book's example 1 uses one variable (age) to predict one yes/no outcome. The model
is ``p = sigmoid(w x + b)`` fitted by minimising the cross-entropy with gradient descent;
``fit.png`` draws the fitted logistic curve over the data.

``digits``: softmax regression (one linear layer, softmax over the ten classes) on scikit-learn's
8x8 handwritten digits (1797 images, 64 pixel values); ``weights.png`` shows each class's weights
as an image.

Served as "which class": input ``features`` FP32 [-1, F] (raw values), output ``probabilities``
FP32 [-1, classes] with the class names as labels (for ``cancer``: [1 - p, p] of the one logistic
unit, so a device reads the class as with any classifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal.modelrepo import TensorSpec
from shoal.train.catalogue import Run, Trained
from shoal.train.data import Table, array_sha256, sklearn_set
from shoal.train.figures import pyplot, save
from shoal.train.loop import Tensors, begin, plot_history
from shoal.train.publish import torch_publisher
from shoal.train.tabular import Standardise, f32, split


@dataclass
class Config:
    data: str = "cancer"  # cancer: one variable, two classes; digits: softmax over 10 classes
    epochs: int = 60  # passes over the training set
    lr: float = 0.1  # gradient descent step
    batch_size: int = 32  # examples per step
    optimizer: str = "sgd"  # sgd (the book's gradient descent) | momentum | adam
    test_fraction: float = 0.25  # rows held out for the test figures
    seed: int = 0  # seed of the split and the weights


class OneVariable(nn.Module):
    """The book's single logistic unit; ``probabilities`` gives [1 - p, p] for serving."""

    def __init__(self, x: np.ndarray) -> None:
        super().__init__()
        self.scale = Standardise(x)
        self.unit = nn.Linear(1, 1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(self.scale(x)).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.logit(x)).unsqueeze(1)
        return torch.cat([1 - p, p], 1)


class Softmax(nn.Module):
    def __init__(self, x: np.ndarray, classes: int) -> None:
        super().__init__()
        self.scale = Standardise(x)
        self.linear = nn.Linear(x.shape[1], classes)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.scale(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logit(x), 1)


class Logits(nn.Module):
    """What the training loop calls: the model's logits (the loss works on them, not on probabilities)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logit(x)


def load(cfg: Config) -> Table:
    if cfg.data == "cancer":
        t = sklearn_set("breast_cancer")
        x = t.x[:, [t.features.index("mean radius")]]
        return Table(x, t.y, ["mean radius"], t.classes, "scikit-learn breast cancer, mean radius only", array_sha256(x, t.y))
    if cfg.data == "digits":
        return sklearn_set("digits")
    raise ValueError(f"logistic: --data is cancer or digits, not {cfg.data!r}")


def plot(cfg: Config, model: nn.Module, t: Table, out: Path) -> Path:
    plt = pyplot()
    if cfg.data == "cancer":
        fig, ax = plt.subplots(figsize=(6, 4))
        jitter = np.random.default_rng(0).uniform(-0.03, 0.03, len(t.y))
        ax.scatter(t.x[:, 0], t.y + jitter, s=8, alpha=0.4, label="tumours (0 malignant, 1 benign)")
        xs = np.linspace(t.x.min(), t.x.max(), 200)[:, None]
        with torch.no_grad():
            p = model(f32(xs))[:, 1].numpy()
        ax.plot(xs[:, 0], p, "r-", label="P(benign | mean radius)")
        ax.set_xlabel("mean radius")
        ax.legend(loc="center right", fontsize=8)
        ax.set_title("one-variable logistic regression")
    else:
        w = (model.linear.weight / model.scale.std).detach().numpy()  # per raw pixel
        fig, axes = plt.subplots(1, 10, figsize=(12, 1.8))
        for d, ax in enumerate(axes):
            lim = np.abs(w[d]).max()
            ax.imshow(w[d].reshape(8, 8), cmap="RdBu", vmin=-lim, vmax=lim)
            ax.set_title(str(d))
            ax.axis("off")
        fig.suptitle("softmax regression weights per class (red: against, blue: for)")
    return save(fig, out)


def train(cfg: Config, run: Run, log=print) -> Trained:  # noqa: ANN001
    trainer = begin(run, "logistic", cfg)
    t = load(cfg)
    tr, te = split(len(t.y), cfg.test_fraction, cfg.seed)
    model: nn.Module = OneVariable(t.x[tr]) if cfg.data == "cancer" else Softmax(t.x[tr], len(t.classes))
    xte, yte = f32(t.x[te]), torch.tensor(t.y[te])

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if cfg.data == "cancer":
            return F.binary_cross_entropy_with_logits(logits, y.float())
        return F.cross_entropy(logits, y)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        m.eval()
        p = m(xte.to(trainer.ctx.device)).cpu()
        return {
            "test_loss": float(F.nll_loss(torch.log(p.clamp_min(1e-12)), yte)),
            "test_accuracy": float((p.argmax(1) == yte).float().mean()),
        }

    train_set = Tensors(f32(t.x[tr]), torch.tensor(t.y[tr]))
    hist = trainer.fit(Logits(model), train_set, loss, lambda _: evaluate(model), log)
    figures = hist.epochs[-1]
    trainer.draw(
        {
            "curves.png": lambda p: plot_history(hist, p, f"logistic regression, {cfg.data}"),
            ("fit.png" if cfg.data == "cancer" else "weights.png"): lambda p: plot(cfg, model, t, p),
        }
    )
    name = f"logistic-{cfg.data}"
    details = {"test_loss": round(figures["test_loss"], 6), "test_rows": len(te)}
    outcome = trainer.outcome(
        name, t.name, "test accuracy", figures["test_accuracy"], details, {"table": t.sha256}
    )
    feeds = {"features": t.x[te].astype(np.float32)}
    outputs = [TensorSpec("probabilities", "FP32", (-1, len(t.classes)))]
    return Trained(
        outcome, torch_publisher(model, name, feeds, outputs, {"probabilities": t.classes}, classify=True)
    )
