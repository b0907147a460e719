"""Paper 002, chapter 2: k-means on an artificial blob set and on the ring ("circles") set.

    shoal train kmeans --data blobs --export models/
    shoal train kmeans --data circles

The book's loop, one iteration at a time: every point goes to its nearest centroid, every centroid
moves to the mean of its points, and the loop stops when no point changes cluster. Each iteration is
one step of scikit-learn's KMeans started from the previous centroids, so the path of every centroid
is recorded and drawn (``kmeans.png``).

Metric: the adjusted Rand index of the clusters against the groups the generator drew (1: the same
partition, 0: no better than chance), on held-out points assigned by the trained model. On the rings
k-means cuts each ring in halves instead of separating them (an index near 0): the book's point that
k-means wants round, separate clusters.

Served as "which cluster": ONNX through skl2onnx, input ``features`` FP32 [-1, 2], outputs ``label``
INT64 [-1] (the cluster) and ``scores`` FP32 [-1, k] (the distance to each centroid).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoal.modelrepo import TensorSpec
from shoal.train.catalogue import Run, Session, Trained
from shoal.train.data import array_sha256
from shoal.train.figures import pyplot, save
from shoal.train.publish import sklearn_publisher


@dataclass
class Config:
    data: str = "blobs"  # blobs: 4 gaussian blobs; circles: 2 concentric rings
    samples: int = 400  # points generated (half for fitting, half held out)
    clusters: int = 0  # k; 0: as many as the set has groups (4 blobs, 2 rings)
    max_iterations: int = 100  # stop here even if points still change cluster
    seed: int = 0  # seed of the points and of the initial centroids (k of the points)


def make_set(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_blobs, make_circles

    if cfg.data == "blobs":
        centres = [(-2.0, -2.0), (-2.0, 1.5), (1.5, -2.0), (2.0, 1.5)]
        x, y = make_blobs(cfg.samples, centers=centres, cluster_std=0.8, random_state=cfg.seed)
    elif cfg.data == "circles":
        x, y = make_circles(cfg.samples, factor=0.4, noise=0.05, random_state=cfg.seed)
    else:
        raise ValueError(f"kmeans: --data is blobs or circles, not {cfg.data!r}")
    return x, y


def iterate(x: np.ndarray, k: int, seed: int, max_iterations: int) -> tuple[object, list[np.ndarray], int]:
    """The fitted KMeans, the centroids before the first and after every iteration, and how many
    iterations ran until no point changed cluster."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    path = [x[rng.choice(len(x), k, replace=False)]]
    labels = None
    km = None
    for it in range(1, max_iterations + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one iteration never "converges" in scikit-learn's sense
            km = KMeans(n_clusters=k, init=path[-1], n_init=1, max_iter=1).fit(x)
        path.append(km.cluster_centers_.copy())
        if labels is not None and np.array_equal(km.labels_, labels):
            return km, path, it
        labels = km.labels_
    return km, path, max_iterations


def plot(x: np.ndarray, labels: np.ndarray, path: list[np.ndarray], out: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.scatter(x[:, 0], x[:, 1], c=labels, cmap="tab10", s=12, alpha=0.6)
    steps = np.stack(path)  # [iterations + 1, k, 2]
    for c in range(steps.shape[1]):
        ax.plot(steps[:, c, 0], steps[:, c, 1], "k.-", lw=1, ms=5)
        ax.plot(*steps[0, c], "kx", ms=9)
        ax.plot(*steps[-1, c], "k*", ms=14, mec="white")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.text(0.01, 0.01, "x: start, *: end, dots: each iteration", transform=ax.transAxes, fontsize=8)
    return save(fig, out)


def train(cfg: Config, run: Run, log=print) -> Trained:  # noqa: ANN001
    from sklearn.metrics import adjusted_rand_score

    session = Session(run, "kmeans", cfg.data, device="cpu (scikit-learn)")
    x, groups = make_set(cfg)
    k = cfg.clusters or len(np.unique(groups))
    half = len(x) // 2
    with session.timed():
        km, path, iterations = iterate(x[:half], k, cfg.seed, cfg.max_iterations)
    held_out = km.predict(x[half:])  # type: ignore[attr-defined]
    ari = float(adjusted_rand_score(groups[half:], held_out))
    log(
        f"k-means on {cfg.data}: k={k}, {iterations} iterations until no point moved; "
        f"adjusted Rand index on {len(x) - half} held-out points {ari:.3f}"
    )
    title = f"k-means, {cfg.data}: centroids over {iterations} iterations (ARI {ari:.2f})"
    labels = km.labels_  # type: ignore[attr-defined]
    session.draw({"kmeans.png": lambda p: plot(x[:half], labels, path, p, title)})
    name = f"kmeans-{cfg.data}"
    dataset = f"scikit-learn make_{cfg.data}, {cfg.samples} points, seed {cfg.seed}"
    details = {
        "iterations": iterations,
        "clusters": k,
        "inertia": round(float(km.inertia_), 4),  # type: ignore[attr-defined]
        "centroids": np.round(path[-1], 4).tolist(),
    }
    sha = {"points": array_sha256(x, groups)}
    outcome = session.outcome(name, dataset, "adjusted Rand index", ari, details, sha)
    outputs = [TensorSpec("label", "INT64", (-1,)), TensorSpec("scores", "FP32", (-1, k))]
    return Trained(outcome, sklearn_publisher(km, name, x[half:], outputs))
