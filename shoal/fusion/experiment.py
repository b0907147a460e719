"""Paper 003's experiments on the in-process runner: build the groups, run them, summarise with intervals.

An experiment runs every topology (and every swept fusion rate, interval and reading) for several
seeds, plus two baselines per seed: the *single-shard* peers (topology ``none``: the same shards, no
fusion) and one *all-data* model trained on the union of the shards. The all-data models run in a
second engine because one pass over all the data takes ``n`` times the steps of a shard.

The work is cut into *cells*: one seed's baselines, and one seed's fused runs per fusion interval.
Each finished cell is written to ``<out>/cells/<cell>.json`` at once, and a cell already there is not
run again: an interrupted sweep keeps what it finished, and the same command continues it. The
summary (curves and final errors with 95% intervals over seeds) is computed from the cells.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.fusion import datasets
from shoal.fusion.algorithm import UPDATES
from shoal.fusion.strategy import AVERAGE, Interval
from shoal.fusion.topology import HYPERCUBE_EDGES, TOPOLOGIES

# Cells written by an older shoal (errors measured at another point) are run again, not mixed in.
CELL_FORMAT = 2
ALL_DATA = "all-data"
SINGLE_SHARD = "single-shard"

# Two-sided 95% Student t quantiles by degrees of freedom (scipy is not a dependency).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

Progress = Callable[[str, int], Callable[[int, np.ndarray], None] | None]


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
    intervals: list[str] = field(default_factory=lambda: ["1epoch"])
    updates: list[str] = field(default_factory=lambda: ["sequential"])
    hypercube_edges: list[str] = field(default_factory=lambda: ["twice"])
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
        """Check the choices and fill the per-data-set defaults (paper 003's architectures and rates)."""
        d = datasets
        for name, values, known in (
            ("topology", self.topologies, (*TOPOLOGIES, AVERAGE)),
            ("update order", self.updates, UPDATES),
            ("hypercube reading", self.hypercube_edges, HYPERCUBE_EDGES),
        ):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise ValueError(f"unknown {name} {bad or values}: use one of {', '.join(known)}")
        intervals = [str(Interval.parse(i)) for i in self.intervals]
        peers = self.peers
        if peers is None:
            peers = d.load(self.dataset).n_classes if self.split == "one-class" else 8
        return Config(
            **{
                **asdict(self),
                "intervals": intervals,
                "peers": peers,
                "lr": self.lr if self.lr is not None else d.LEARNING_RATE[self.dataset],
                "hidden": list(self.hidden) if self.hidden else list(d.HIDDEN[self.dataset]),
                "batch": self.batch if self.batch is not None else d.BATCH[self.dataset],
            }
        )


def run_label(topology: str, rate: float, interval: str, update: str, edges: str) -> str:
    """The name of one fused run in tables and plots, with every parameter that tells it apart."""
    if topology == AVERAGE:
        return f"average every {interval}"
    label = f"{topology} F={rate:g} every {interval} {update}"
    return label + (f" edges {edges}" if topology == "hypercube" else "")


def cells(cfg: Config) -> list[tuple[str, int, str | None]]:
    """The cells of an experiment: ``(name, seed, interval)``, interval None for a seed's baselines."""
    out: list[tuple[str, int, str | None]] = []
    for seed in cfg.seeds:
        if cfg.baselines:
            out.append((f"seed{seed}-baselines", seed, None))
        for interval in cfg.intervals:
            out.append((f"seed{seed}-every{interval}", seed, interval))
    return out


def run_cell(
    cfg: Config, seed: int, interval: str | None, progress: Progress | None = None, name: str = ""
) -> dict[str, Any]:
    """Run one cell; returns ``{label: {params, "curve": mean over peers per epoch, "final_peers"}}``."""
    from shoal.fusion import runner

    assert cfg.peers is not None and cfg.hidden is not None and cfg.lr is not None and cfg.batch is not None
    data = datasets.load(cfg.dataset)
    shards = datasets.shard(data.y_train, cfg.split, cfg.peers, seed=seed, alpha=cfg.alpha)
    engines: list[list[runner.Group]] = []
    if interval is None:
        engines.append([runner.Group("none", shards, seed, 0.0, 1, cfg.shared_init, SINGLE_SHARD)])
        rows = np.sort(np.concatenate(shards))
        engines.append([runner.Group("none", [rows], seed, 0.0, 1, True, ALL_DATA)])
    else:
        groups = []
        for topo in cfg.topologies:
            for rate in cfg.rates if topo != AVERAGE else [0.0]:
                for update in cfg.updates if topo != AVERAGE else ["sequential"]:
                    for edges in cfg.hypercube_edges if topo == "hypercube" else ["twice"]:
                        label = run_label(topo, rate, interval, update, edges)
                        groups.append(
                            runner.Group(
                                topo, shards, seed, rate, interval, cfg.shared_init, label, {}, update, edges
                            )
                        )
        engines.append(groups)
    out: dict[str, Any] = {}
    for gs in engines:
        cb = progress(f"{name or cfg.dataset} {gs[0].label}", cfg.epochs) if progress else None
        tr = runner.run(data, gs, cfg.hidden, cfg.lr, cfg.epochs, cfg.batch, engine=cfg.engine, on_epoch=cb)
        for g_i, g in enumerate(tr.groups):
            errs = tr.group_errors(g_i)
            before = tr.group_errors(g_i, before=True)
            out[g.label] = {
                "topology": g.topology if g.label not in (ALL_DATA, SINGLE_SHARD) else g.label,
                "rate": g.rate,
                "every": str(g.interval),
                "update": g.update,
                "hypercube_edges": g.hypercube_edges,
                "curve": errs.mean(1).tolist(),
                # Right before the last fusion round of each epoch (None: no round that epoch).
                "curve_before": [None if np.isnan(v).all() else float(np.nanmean(v)) for v in before],
                "final_peers": errs[-1].tolist(),
                "seconds": tr.seconds,
            }
    return out


def run_experiment(
    cfg: Config,
    progress: Progress | None = None,
    out: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` cell by cell and return a JSON-ready summary with 95% intervals over seeds.

    With ``out``, each finished cell is saved under ``out/cells/`` and cells found there are reused
    (only when they were run with the same settings), so an interrupted run continues where it stopped.
    ``progress(name, epochs)`` may return a per-epoch callback (the CLI's progress bar).
    """
    cfg = cfg.resolved()
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("seeds", "intervals", "engine")}
    settings["cell_format"] = CELL_FORMAT
    for name, seed, interval in cells(cfg):
        path = out / "cells" / f"{name}.json" if out is not None else None
        cell = None
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings:
                cell = saved["runs"]
                if log:
                    log(f"{name}: reusing {path}")
        if cell is None:
            cell = run_cell(cfg, seed, interval, progress, name)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"settings": settings, "seed": seed, "runs": cell}))
                tmp.replace(path)
        results[name] = cell
    return summarise(cfg, results, time.perf_counter() - t0)


def summarise(cfg: Config, cell_results: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Per label: the per-seed curves (mean over peers), their mean with a 95% band, final errors."""
    by_label: dict[str, dict[str, Any]] = {}
    for cell in cell_results.values():
        for label, r in cell.items():
            skip = ("curve", "curve_before", "final_peers")
            e = by_label.setdefault(label, {**{k: r[k] for k in r if k not in skip}})
            e.setdefault("curves", []).append(r["curve"])
            e.setdefault("befores", []).append(
                [np.nan if v is None else v for v in r.get("curve_before", [])]
            )
            e.setdefault("final_peers", []).append(r["final_peers"])
    runs = []
    baselines_last = sorted(by_label.items(), key=lambda kv: kv[0] in (SINGLE_SHARD, ALL_DATA))
    for label, e in baselines_last:
        curves = np.array(e.pop("curves"))  # [seeds, epochs + 1]
        befores = np.array(e.pop("befores"), dtype=np.float64)
        lo_hi = [mean_ci(curves[:, k]) for k in range(curves.shape[1])]
        final = mean_ci(curves[:, -1])
        e.pop("seconds", None)
        runs.append(
            {
                "label": label,
                **e,
                "final_error": final[0],
                "final_ci95": [final[1], final[2]],
                "final_per_seed": curves[:, -1].tolist(),
                "final_per_peer": e.pop("final_peers"),
                "curves_per_seed": curves.tolist(),
                "curve_mean": [x[0] for x in lo_hi],
                "curve_lo": [x[1] for x in lo_hi],
                "curve_hi": [x[2] for x in lo_hi],
                "curve_before": _nanmean_columns(befores),
            }
        )
    return {"config": asdict(cfg), "seconds": seconds, "runs": runs}


def _nanmean_columns(a: np.ndarray) -> list[float | None]:
    """Mean over seeds per epoch, None where no seed has a value."""
    if a.size == 0:
        return []
    return [None if np.isnan(col).all() else float(np.nanmean(col)) for col in a.T]


def gap_to_all_data(result: dict[str, Any], run: dict[str, Any]) -> tuple[float, float, float] | None:
    """Paired per-seed difference ``run - all-data`` of the final error, in percentage points, with its 95% CI.

    Each seed's runs share the shards, so the paired difference is tighter than comparing two intervals.
    """
    ref = next((r for r in result["runs"] if r["label"] == ALL_DATA), None)
    if ref is None or len(ref["final_per_seed"]) != len(run["final_per_seed"]):
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


def reading_label(run: dict[str, Any]) -> str:
    """A fused run's topology and reading without its interval (the row of :func:`markdown_grid`)."""
    if run["topology"] in (ALL_DATA, SINGLE_SHARD, AVERAGE):
        return run["topology"] if run["topology"] != AVERAGE else "average (reference)"
    label = f"{run['topology']} {run['update']}"
    return label + (f", edges {run['hypercube_edges']}" if run["topology"] == "hypercube" else "")


def tail_mean(run: dict[str, Any], tail: int) -> tuple[float, float, float]:
    """Mean error over the last ``tail`` epochs per seed, then over seeds with a 95% interval.

    Steadier than the last epoch alone when the state right after a round varies from round to round.
    """
    per_seed = [float(np.mean(c[-tail:])) for c in run["curves_per_seed"]]
    return mean_ci(per_seed)


def markdown_grid(result: dict[str, Any], epochs: Sequence[int] = (), tail: int = 5) -> str:
    """Errors in % with a row per topology and reading, columns per interval.

    Per interval: the mean error after each of ``epochs`` (how fast it falls), the mean over the last
    ``tail`` epochs (per seed, then over seeds, with a 95% interval), and the same epochs measured
    right before their last round (how far the peers drift between rounds).
    """
    intervals = result["config"]["intervals"]
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for r in result["runs"]:
        rows.setdefault(reading_label(r), {})[
            r["every"] if r["topology"] not in (ALL_DATA, SINGLE_SHARD) else "*"
        ] = r
    last = result["config"]["epochs"]
    span = f"epochs {last - tail + 1}-{last}" if tail > 1 else f"epoch {last}"
    head = ["run"]
    for iv in intervals:
        head += [f"every {iv}: epoch {e}" for e in epochs]
        head += [f"every {iv}: {span}", f"every {iv}: {span}, before the round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by in rows.items():
        cells = [name]
        for iv in intervals:
            r = by.get(iv) or by.get("*")
            if r is None:
                cells += [""] * (len(epochs) + 2)
                continue
            cells += [f"{100 * r['curve_mean'][e]:.1f}" for e in epochs]
            m, lo, hi = tail_mean(r, tail)
            cells.append(f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
            before = [v for v in (r.get("curve_before") or [])[-tail:] if v is not None]
            cells.append(f"{100 * float(np.mean(before)):.1f}" if before else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
