"""Paper 003's experiments on the in-process runner: build the groups, run them, summarise with intervals.

An experiment runs every topology (and every swept fusion rate or frequency) for several seeds at
once in one batched engine, plus two baselines per seed: the *single-shard* peers (topology
``none``: the same shards, no fusion) and one *all-data* model trained on the union of the shards.
The all-data models run in a second engine because one pass over all the data takes ``n`` times the
steps of a shard.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shoal.fusion import datasets
from shoal.fusion.topology import TOPOLOGIES

ALL_DATA = "all-data"
SINGLE_SHARD = "single-shard"

# Two-sided 95% Student t quantiles by degrees of freedom (scipy is not a dependency).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of per-seed values (the interval is the mean itself for one seed)."""
    v = np.asarray(values, np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    half = _T95.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, m - half, m + half


@dataclass
class Config:
    dataset: str = "mnist"
    split: str = "one-class"
    peers: int | None = None  # default: one per class for one-class, else 8
    topologies: list[str] = field(default_factory=lambda: list(TOPOLOGIES))
    rates: list[float] = field(default_factory=lambda: [0.55])
    everys: list[int] = field(default_factory=lambda: [1])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 30
    lr: float | None = None
    hidden: list[int] | None = None
    batch: int | None = None
    shared_init: bool = True
    alpha: float = 0.5
    baselines: bool = True
    engine: str = "batched"

    def resolved(self) -> Config:
        """Fill the per-data-set defaults (paper 003's architectures and rates, see ``datasets``)."""
        d = datasets
        peers = self.peers
        if peers is None:
            peers = d.load(self.dataset).n_classes if self.split == "one-class" else 8
        return Config(
            **{
                **asdict(self),
                "peers": peers,
                "lr": self.lr if self.lr is not None else d.LEARNING_RATE[self.dataset],
                "hidden": list(self.hidden) if self.hidden else list(d.HIDDEN[self.dataset]),
                "batch": self.batch if self.batch is not None else d.BATCH[self.dataset],
            }
        )


def run_experiment(
    cfg: Config, progress: Callable[[str, int], Callable[[int, np.ndarray], None]] | None = None
) -> dict[str, Any]:
    """Run ``cfg`` and return a JSON-ready result: per-run curves, final errors with 95% intervals.

    ``progress(name, epochs)`` may return a per-epoch callback (the CLI's progress bar).
    """
    from shoal.fusion import runner

    cfg = cfg.resolved()
    assert cfg.peers is not None and cfg.hidden is not None and cfg.lr is not None and cfg.batch is not None
    data = datasets.load(cfg.dataset)
    groups: list[runner.Group] = []
    for seed in cfg.seeds:
        shards = datasets.shard(data.y_train, cfg.split, cfg.peers, seed=seed, alpha=cfg.alpha)
        for topo in cfg.topologies:
            for rate in cfg.rates:
                for every in cfg.everys:
                    label = f"{topo} F={rate:g} K={every}"
                    groups.append(runner.Group(topo, shards, seed, rate, every, cfg.shared_init, label))
        if cfg.baselines:
            groups.append(runner.Group("none", shards, seed, 0.0, 1, cfg.shared_init, SINGLE_SHARD))
    base_groups = []
    if cfg.baselines:
        for seed in cfg.seeds:
            rows = np.sort(
                np.concatenate(datasets.shard(data.y_train, cfg.split, cfg.peers, seed, cfg.alpha))
            )
            base_groups.append(runner.Group("none", [rows], seed, 0.0, 1, True, ALL_DATA))

    traces = []
    t0 = time.perf_counter()
    for name, gs in (("peers", groups), (ALL_DATA, base_groups)):
        if not gs:
            continue
        cb = progress(f"{cfg.dataset} {name}", cfg.epochs) if progress else None
        traces.append(
            runner.run(data, gs, cfg.hidden, cfg.lr, cfg.epochs, cfg.batch, engine=cfg.engine, on_epoch=cb)
        )
    seconds = time.perf_counter() - t0

    # Per label: per-seed curve of the peers' mean error, and each seed's final per-peer errors.
    by_label: dict[str, dict[str, Any]] = {}
    for tr in traces:
        for g_i, g in enumerate(tr.groups):
            errs = tr.group_errors(g_i)
            entry = by_label.setdefault(
                g.label,
                {"topology": g.topology, "rate": g.rate, "every": g.every, "curves": [], "final_peers": []},
            )
            entry["curves"].append(errs.mean(1))
            entry["final_peers"].append(errs[-1].tolist())
    runs = []
    for label, e in by_label.items():
        curves = np.stack(e["curves"])  # [seeds, epochs + 1]
        lo_hi = [mean_ci(curves[:, k]) for k in range(curves.shape[1])]
        final = mean_ci(curves[:, -1])
        runs.append(
            {
                "label": label,
                "topology": e["topology"] if label not in (ALL_DATA, SINGLE_SHARD) else label,
                "rate": e["rate"],
                "every": e["every"],
                "final_error": final[0],
                "final_ci95": [final[1], final[2]],
                "final_per_seed": curves[:, -1].tolist(),
                "final_per_peer": e["final_peers"],
                "curve_mean": [x[0] for x in lo_hi],
                "curve_lo": [x[1] for x in lo_hi],
                "curve_hi": [x[2] for x in lo_hi],
            }
        )
    return {
        "config": asdict(cfg),
        "seconds": seconds,
        "peers_per_engine": [sum(len(g.shards) for g in tr.groups) for tr in traces],
        "runs": runs,
    }


def gap_to_all_data(result: dict[str, Any], run: dict[str, Any]) -> tuple[float, float, float] | None:
    """Paired per-seed difference ``run - all-data`` of the final error, in percentage points, with its 95% CI.

    Each seed's runs share the shards, so the paired difference is tighter than comparing two intervals.
    """
    ref = next((r for r in result["runs"] if r["label"] == ALL_DATA), None)
    if ref is None:
        return None
    diffs = [100 * (a - b) for a, b in zip(run["final_per_seed"], ref["final_per_seed"], strict=True)]
    return mean_ci(diffs)


def markdown_table(result: dict[str, Any]) -> str:
    """Final test error (mean over peers, then over seeds) with 95% intervals, one line per run."""
    cfg = result["config"]
    lines = [
        f"{cfg['dataset']}, {cfg['split']} split, {cfg['peers']} peers, hidden {cfg['hidden']}, lr {cfg['lr']}, "
        f"batch {cfg['batch']}, {cfg['epochs']} epochs, seeds {cfg['seeds']}, shared init {cfg['shared_init']}",
        "",
        "| run | final error | 95% CI | minus all-data (pp), paired 95% CI |",
        "|---|---|---|---|",
    ]
    for r in result["runs"]:
        lo, hi = r["final_ci95"]
        gap = gap_to_all_data(result, r)
        gap_s = f"{gap[0]:+.2f} [{gap[1]:+.2f}, {gap[2]:+.2f}]" if gap else ""
        lines.append(f"| {r['label']} | {r['final_error']:.4f} | [{lo:.4f}, {hi:.4f}] | {gap_s} |")
    return "\n".join(lines) + "\n"
