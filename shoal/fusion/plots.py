"""PNG plots of fusion experiments (matplotlib, imported only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoal.fusion.experiment import ALL_DATA, SINGLE_SHARD
from shoal.fusion.strategy import Interval

COLOURS = {
    ALL_DATA: "tab:blue",
    SINGLE_SHARD: "tab:red",
    "ring": "tab:green",
    "random": "tab:orange",
    "hypercube": "tab:purple",
    "average": "tab:gray",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax: Any, run: dict[str, Any], colour: str | None, alpha: float) -> None:
    """A run's 95% band over seeds, in percent."""
    epochs = range(len(run["curve_mean"]))
    lo = [max(100 * v, 0.5) for v in run["curve_lo"]]  # a band below 0 has no place on a log scale
    hi = [100 * v for v in run["curve_hi"]]
    ax.fill_between(epochs, lo, hi, color=colour, alpha=alpha, lw=0)


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Test error against epoch per run, mean over seeds with the 95% band (paper 003, Fig. 2-4)."""
    plt = _pyplot()
    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["runs"]:
        epochs = range(len(r["curve_mean"]))
        colour = COLOURS.get(r["topology"])
        ax.plot(epochs, [100 * v for v in r["curve_mean"]], label=r["label"], color=colour, lw=1.4)
        _band(ax, r, colour, 0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_yscale("log")
    ax.set_title(f"{cfg['dataset']}: {cfg['peers']} peers, {cfg['split']} split, seeds {len(cfg['seeds'])}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(result: dict[str, Any], key: str, path: Path) -> None:
    """Final test error against fusion ``rate`` (Fig. 5) or frequency ``every`` (Fig. 6) per topology."""
    plt = _pyplot()
    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_topo: dict[str, list[dict[str, Any]]] = {}
    for r in result["runs"]:
        if r["topology"] in (ALL_DATA, SINGLE_SHARD):
            lo, hi = r["final_ci95"]
            colour = COLOURS[r["topology"]]
            ax.axhline(100 * r["final_error"], color=colour, ls="--", lw=1, label=r["label"])
            ax.axhspan(100 * lo, 100 * hi, color=colour, alpha=0.1)
        else:
            by_topo.setdefault(r["topology"], []).append(r)
    for topo, runs in by_topo.items():
        runs.sort(key=lambda r: _sweep_x(r, key))
        xs = [_sweep_x(r, key) for r in runs]
        ax.plot(xs, [100 * r["final_error"] for r in runs], "o-", ms=3, color=COLOURS.get(topo), label=topo)
        ax.fill_between(
            xs,
            [100 * r["final_ci95"][0] for r in runs],
            [100 * r["final_ci95"][1] for r in runs],
            color=COLOURS.get(topo),
            alpha=0.15,
            lw=0,
        )
    ax.set_xlabel("fusion rate F" if key == "rate" else "fusion frequency K (epochs between fusions)")
    if key == "every":
        ax.set_xscale("log")
    ax.set_ylabel(f"test error after {cfg['epochs']} epochs (%)")
    ax.set_title(f"{cfg['dataset']}: {cfg['peers']} peers, {cfg['split']} split, seeds {len(cfg['seeds'])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sweep_x(run: dict[str, Any], key: str) -> float:
    if key == "every":
        return Interval.parse(run["every"]).count
    return float(run[key])


def plot_grid(result: dict[str, Any], path: Path, reference: tuple[float, str] | None = None) -> None:
    """Error against epoch, one panel per fusion interval: a line per topology and reading.

    Colour is the topology; line style the reading (solid: sequential as printed, dashed:
    simultaneous; for the hypercube, thick: every edge twice as printed, thin: once). The
    baselines are in every panel; ``reference`` draws a horizontal line ``(error %, label)``. Means over
    seeds only: with this many lines, bands hide more than they show (``grid.md`` has the intervals).
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cfg = result["config"]
    intervals = cfg["intervals"]
    cols = min(3, len(intervals))
    rows = -(-len(intervals) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4 * rows), sharey=True, squeeze=False)
    for ax, interval in zip(axes.flat, intervals, strict=False):
        for r in result["runs"]:
            if r["topology"] not in (ALL_DATA, SINGLE_SHARD) and r["every"] != interval:
                continue
            epochs = range(len(r["curve_mean"]))
            colour = COLOURS.get(r["topology"])
            dashed = r.get("update") == "simultaneous" and r["topology"] not in (
                ALL_DATA,
                SINGLE_SHARD,
                "average",
            )
            thin = r["topology"] == "hypercube" and r.get("hypercube_edges") == "once"
            ax.plot(
                epochs,
                [100 * v for v in r["curve_mean"]],
                color=colour,
                ls="--" if dashed else "-",
                lw=0.9 if thin else 1.6,
                label=r["label"].replace(f" every {interval}", ""),
            )
        if reference is not None:
            ax.axhline(reference[0], color="black", ls=":", lw=1, label=reference[1])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"fuse every {interval}")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(intervals) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("test error (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(
        f"{cfg['dataset']}: {cfg['peers']} peers, {cfg['split']} split, F={cfg['rates'][0]:g}, "
        f"batch {cfg['batch']}, mean of {len(cfg['seeds'])} seeds"
    )
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(labels) + 2) // 3), 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
