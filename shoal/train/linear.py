"""Paper 002, chapter 3: linear regression by gradient descent.

    shoal train linear --data line --export models/       # one variable, artificial
    shoal train linear --data diabetes --export models/   # ten variables, scikit-learn's diabetes set

The model is the book's ``y = x W + b`` fitted by minimising the mean squared error with gradient
descent. On ``line`` the data is drawn around ``y = 2x + 1`` and the figure shows the fitted line
after each epoch converging on it. On ``diabetes`` (442 patients, 10 standardised variables, a
measure of disease progression one year later) the result is checked against the least-squares
solution scikit-learn computes in closed form: gradient descent should reach the same test R².

Served as a regression: input ``features`` FP32 [-1, F] (raw values; the standardisation is part of
the graph), output ``prediction`` FP32 [-1, 1].
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
from shoal.train.tabular import Standardise, f32, predicted_against_true, regression_figures, split


@dataclass
class Config:
    data: str = "line"  # line: y = 2x + 1 + noise; diabetes: scikit-learn's 10-variable set
    samples: int = 200  # points generated for 'line'
    noise: float = 0.5  # standard deviation of the noise on 'line'
    epochs: int = 100  # passes over the training set
    lr: float = 0.05  # gradient descent step
    batch_size: int = 32  # examples per step
    optimizer: str = "sgd"  # sgd (the book's gradient descent) | momentum | adam
    test_fraction: float = 0.2  # rows held out for the test figures
    seed: int = 0  # seed of the data, the split and the weights


def load(cfg: Config) -> Table:
    if cfg.data == "diabetes":
        return sklearn_set("diabetes")
    if cfg.data != "line":
        raise ValueError(f"linear: --data is line or diabetes, not {cfg.data!r}")
    rng = np.random.default_rng(cfg.seed)
    x = rng.uniform(-3, 3, (cfg.samples, 1))
    y = 2.0 * x[:, 0] + 1.0 + rng.normal(0, cfg.noise, cfg.samples)
    return Table(x, y, ["x"], [], "artificial y = 2x + 1 + noise", array_sha256(x, y))


def plot(cfg: Config, model: nn.Module, t: Table, test: np.ndarray, lines: list[tuple[float, float]], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if cfg.data == "line":
        ax.scatter(t.x[:, 0], t.y, s=8, alpha=0.5, label="data")
        xs = np.array([t.x.min(), t.x.max()])
        for i, (w, b) in enumerate(lines):
            ax.plot(xs, w * xs + b, color=plt.cm.viridis(i / max(1, len(lines) - 1)), lw=0.8, alpha=0.7)
        ax.plot(xs, 2 * xs + 1, "r--", lw=1.5, label="y = 2x + 1")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(f"fitted line after each epoch (dark: first), final y = {lines[-1][0]:.2f}x + {lines[-1][1]:.2f}")
        ax.legend(loc="upper left")
    else:
        with torch.no_grad():
            pred = model(f32(t.x[test])).reshape(-1).numpy()
        predicted_against_true(ax, t.y[test], pred, "disease progression", "diabetes: test rows")
    return save(fig, out)


def train(cfg: Config, run: Run, log=print) -> Trained:  # noqa: ANN001
    trainer = begin(run, "linear", cfg)
    t = load(cfg)
    tr, te = split(len(t.y), cfg.test_fraction, cfg.seed)
    model = nn.Sequential(Standardise(t.x[tr]), nn.Linear(t.x.shape[1], 1))
    xte, yte = f32(t.x[te]), f32(t.y[te])
    lines: list[tuple[float, float]] = []

    def evaluate(m: nn.Module) -> dict[str, float]:
        if cfg.data == "line":  # the fitted line in the original units, for the figure
            s, lin = m[0], m[1]
            w = float(lin.weight[0, 0].detach() / s.std[0])
            b = float(lin.bias[0].detach() - w * s.mean[0])
            lines.append((w, b))
        return regression_figures(m, xte, yte)

    hist = trainer.fit(model, Tensors(f32(t.x[tr]), f32(t.y[tr]).unsqueeze(1)), F.mse_loss, evaluate, log)
    figures = hist.epochs[-1]
    details: dict[str, object] = {k: round(v, 6) for k, v in figures.items() if k != "epoch"}
    if cfg.data == "line" and lines:
        details["slope"], details["intercept"] = round(lines[-1][0], 4), round(lines[-1][1], 4)
    else:
        from sklearn.linear_model import LinearRegression

        ls = LinearRegression().fit(t.x[tr], t.y[tr])
        details["least_squares_test_r2"] = round(float(ls.score(t.x[te], t.y[te])), 6)
        log(f"closed-form least squares: test R² {details['least_squares_test_r2']:.4f}")
    trainer.draw(
        {
            "curves.png": lambda p: plot_history(hist, p, f"linear regression, {cfg.data}"),
            "fit.png": lambda p: plot(cfg, model, t, te, lines, p),
        }
    )
    name = f"linear-{cfg.data}"
    outcome = trainer.outcome(name, t.name, "test R²", figures["test_r2"], details, {"table": t.sha256})
    feeds = {"features": t.x[te].astype(np.float32)}
    return Trained(outcome, torch_publisher(model, name, feeds, [TensorSpec("prediction", "FP32", (-1, 1))]))
