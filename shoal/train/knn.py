"""Paper 002, chapter 2: k-nearest neighbours on an artificial set.

    shoal train knn --data circles --export models/

A point takes the class most common among the k training points nearest to it: no training beyond
keeping the points, which the exported model carries. Where k-means cannot separate the two rings
(``shoal train kmeans --data circles``), k-NN, told the classes, does.

Metric: accuracy on held-out points. ``knn.png`` draws the class regions, the training points and
the test points, with the misclassified ones circled.

Served as "which class": ONNX through skl2onnx, input ``features`` FP32 [-1, 2], outputs ``label``
INT64 [-1] and ``probabilities`` FP32 [-1, classes] (the share of the k neighbours in each class).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoal.modelrepo import TensorSpec
from shoal.train.catalogue import Run, Session, Trained
from shoal.train.data import array_sha256
from shoal.train.figures import pyplot, save
from shoal.train.kmeans import Config as KMeansConfig
from shoal.train.kmeans import make_set
from shoal.train.publish import sklearn_publisher


@dataclass
class Config:
    data: str = "circles"  # circles: 2 rings; blobs: 4 gaussian blobs
    samples: int = 400  # points generated (half for training, half for testing)
    neighbours: int = 5  # k
    seed: int = 0  # seed of the points


CLASS_NAMES = {"circles": ["outer ring", "inner ring"], "blobs": [f"blob {i}" for i in range(4)]}


def plot(model: object, train: tuple, test: tuple, wrong: np.ndarray, out: Path, title: str) -> Path:
    plt = pyplot()
    (xtr, ytr), (xte, yte) = train, test
    lo, hi = np.vstack([xtr, xte]).min(0) - 0.3, np.vstack([xtr, xte]).max(0) + 0.3
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = model.predict(np.c_[gx.ravel(), gy.ravel()]).reshape(gx.shape)  # type: ignore[attr-defined]
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.contourf(gx, gy, grid, alpha=0.2, cmap="tab10", levels=np.arange(grid.max() + 2) - 0.5)
    ax.scatter(xtr[:, 0], xtr[:, 1], c=ytr, cmap="tab10", s=10, marker="o", alpha=0.5, label="training")
    ax.scatter(xte[:, 0], xte[:, 1], c=yte, cmap="tab10", s=22, marker="^", label="test")
    ax.scatter(xte[wrong, 0], xte[wrong, 1], s=120, facecolors="none", edgecolors="red", label="wrong")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    ax.set_aspect("equal")
    return save(fig, out)


def train(cfg: Config, run: Run, log=print) -> Trained:  # noqa: ANN001
    from sklearn.neighbors import KNeighborsClassifier

    session = Session(run, "knn", cfg.data, device="cpu (scikit-learn)")
    x, y = make_set(KMeansConfig(data=cfg.data, samples=cfg.samples, seed=cfg.seed))
    half = len(x) // 2
    with session.timed():
        knn = KNeighborsClassifier(n_neighbors=cfg.neighbours).fit(x[:half], y[:half])
        pred = knn.predict(x[half:])
    acc = float((pred == y[half:]).mean())
    log(f"k-NN on {cfg.data}: k={cfg.neighbours}, test accuracy {acc:.4f} on {len(x) - half} points")
    title = f"{cfg.neighbours}-nearest neighbours, {cfg.data}: test accuracy {acc:.1%}"
    train, test = (x[:half], y[:half]), (x[half:], y[half:])
    session.draw({"knn.png": lambda p: plot(knn, train, test, pred != y[half:], p, title)})
    name = f"knn-{cfg.data}"
    classes = CLASS_NAMES[cfg.data]
    dataset = f"scikit-learn make_{cfg.data}, {cfg.samples} points, seed {cfg.seed}"
    details = {"neighbours": cfg.neighbours, "test_points": len(x) - half}
    outcome = session.outcome(name, dataset, "test accuracy", acc, details, {"points": array_sha256(x, y)})
    outputs = [TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, len(classes)))]
    return Trained(outcome, sklearn_publisher(knn, name, x[half:], outputs, {"probabilities": classes}))
