"""Paper 002, chapter 5: feed-forward networks for regression and classification.

    shoal train feedforward --data wave --export models/   # non-linear regression, artificial data
    shoal train feedforward --data cars --export models/   # fuel efficiency of cars (Auto MPG)
    shoal train feedforward --data wine --export models/   # three wine cultivars

``wave``: one input, one output, ``y = sin(2x) + 0.3 x^2`` plus noise: what a straight line cannot
fit and a small network of tanh units can (``fit.png`` draws it). ``cars``: miles per gallon of 392
cars of 1970-1982 from cylinders, displacement, horsepower, weight, acceleration, model year and
origin (the Auto MPG data, from the vega-datasets package). ``wine``: scikit-learn's wine set, 178
wines of three cultivars from 13 chemical measurements.

Every network is standardisation (inside the graph), then ``hidden`` fully connected layers with
the activation, then a linear output. Served with raw features: regression outputs ``prediction``
FP32 [-1, 1]; wine outputs ``probabilities`` FP32 [-1, 3] with the cultivar names as labels. The
input ``features`` FP32 [-1, F] is one row per example, in the order the manifest's ``features``
lists; for ``cars`` (F = 9): cylinders, displacement (cubic inches), horsepower, weight (pounds),
acceleration (seconds from 0 to 60 mph), model year written with four digits (1970-1982), then
origin one-hot as USA, Europe, Japan (``data.CARS_INPUTS``).
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
from shoal.train.data import CARS_INPUTS, Table, array_sha256, cars, sklearn_set
from shoal.train.figures import pyplot, save
from shoal.train.loop import Tensors, begin, plot_history
from shoal.train.publish import torch_publisher
from shoal.train.tabular import (
    Standardise,
    classification_figures,
    f32,
    predicted_against_true,
    regression_figures,
    split,
)


@dataclass
class Config:
    data: str = "wave"  # wave (artificial), cars (Auto MPG) or wine
    hidden: str = "32,32"  # sizes of the hidden layers, comma-separated
    activation: str = "tanh"  # tanh | relu | sigmoid
    epochs: int = 300  # passes over the training set
    lr: float = 0.003  # learning rate
    batch_size: int = 32  # examples per step
    optimizer: str = "adam"  # adam | sgd | momentum
    weight_decay: float = 0.0  # L2 penalty
    samples: int = 400  # points generated for 'wave'
    test_fraction: float = 0.2  # rows held out for the test figures
    seed: int = 0  # seed of the data, the split and the weights
    data_dir: str = ""  # where cars.json is when vega-datasets is not installed
    download: bool = False  # fetch cars.json (verified) when it is nowhere here


class Net(nn.Module):
    def __init__(self, x: np.ndarray, hidden: list[int], activation: str, outputs: int) -> None:
        super().__init__()
        act = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
        layers: list[nn.Module] = [Standardise(x)]
        width = x.shape[1]
        for h in hidden:
            layers += [nn.Linear(width, h), act()]
            width = h
        layers.append(nn.Linear(width, outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Probabilities(nn.Module):
    """The served classifier: softmax over the trained network's logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), 1)


def load(cfg: Config) -> Table:
    if cfg.data == "wave":
        rng = np.random.default_rng(cfg.seed)
        x = rng.uniform(-3, 3, (cfg.samples, 1))
        y = np.sin(2 * x[:, 0]) + 0.3 * x[:, 0] ** 2 + rng.normal(0, 0.15, cfg.samples)
        return Table(x, y, ["x"], [], "artificial y = sin(2x) + 0.3x² + noise", array_sha256(x, y))
    if cfg.data == "cars":
        return cars(cfg.data_dir or None, cfg.download)
    if cfg.data == "wine":
        return sklearn_set("wine")
    raise ValueError(f"feedforward: --data is wave, cars or wine, not {cfg.data!r}")


def plot(cfg: Config, model: nn.Module, t: Table, test: np.ndarray, out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    with torch.no_grad():
        if cfg.data == "wave":
            xs = np.linspace(t.x.min(), t.x.max(), 300)[:, None]
            ax.scatter(t.x[:, 0], t.y, s=8, alpha=0.4, label="data")
            ax.plot(xs[:, 0], model(f32(xs)).numpy()[:, 0], "r-", lw=2, label="network")
            ax.plot(xs[:, 0], np.sin(2 * xs[:, 0]) + 0.3 * xs[:, 0] ** 2, "k--", lw=1, label="sin(2x) + 0.3x²")
            ax.legend(fontsize=8)
            ax.set_title("non-linear regression")
        else:
            pred = model(f32(t.x[test])).numpy()[:, 0]
            predicted_against_true(ax, t.y[test], pred, "miles per gallon", "Auto MPG: test cars")
    return save(fig, out)


def train(cfg: Config, run: Run, log=print) -> Trained:  # noqa: ANN001
    trainer = begin(run, "feedforward", cfg)
    t = load(cfg)
    classify = bool(t.classes)
    tr, te = split(len(t.y), cfg.test_fraction, cfg.seed)
    hidden = [int(h) for h in cfg.hidden.split(",") if h.strip()]
    net = Net(t.x[tr], hidden, cfg.activation, len(t.classes) if classify else 1)
    xte = f32(t.x[te])
    if classify:
        y_train, yte = torch.tensor(t.y[tr]), torch.tensor(t.y[te])
        loss, figures = F.cross_entropy, classification_figures
    else:
        y_train, yte = f32(t.y[tr]).unsqueeze(1), f32(t.y[te])
        loss, figures = F.mse_loss, regression_figures
    hist = trainer.fit(net, Tensors(f32(t.x[tr]), y_train), loss, lambda m: figures(m, xte, yte), log)
    last = hist.epochs[-1]
    trainer.draw({"curves.png": lambda p: plot_history(hist, p, f"feed-forward network, {cfg.data}")})
    if not classify:
        trainer.draw({"fit.png": lambda p: plot(cfg, net, t, te, p)})
    name = f"feedforward-{cfg.data}"
    metric = "test accuracy" if classify else ("test RMSE (mpg)" if cfg.data == "cars" else "test RMSE")
    value = last["test_accuracy"] if classify else last["test_rmse"]
    details = {k: round(v, 6) for k, v in last.items() if k != "epoch"}
    outcome = trainer.outcome(name, t.name, metric, value, details, {"table": t.sha256})
    feeds = {"features": t.x[te].astype(np.float32)}
    described = {"features": CARS_INPUTS if cfg.data == "cars" else list(t.features)}
    if classify:
        outputs = [TensorSpec("probabilities", "FP32", (-1, len(t.classes)))]
        pub = torch_publisher(
            Probabilities(net), name, feeds, outputs, {"probabilities": t.classes}, classify=True, features=described
        )
    else:
        pub = torch_publisher(net, name, feeds, [TensorSpec("prediction", "FP32", (-1, 1))], features=described)
    return Trained(outcome, pub)
