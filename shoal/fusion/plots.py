"""PNG plots of fusion experiments (matplotlib, imported only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoal.fusion.experiment import ALL_DATA, SINGLE_SHARD

COLOURS = {
    ALL_DATA: "tab:blue",
    SINGLE_SHARD: "tab:red",
    "ring": "tab:green",
    "random": "tab:orange",
    "hypercube": "tab:purple",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Test error against epoch per run, mean over seeds with the 95% band (paper 003, Fig. 2-4)."""
    plt = _pyplot()
    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["runs"]:
        epochs = range(len(r["curve_mean"]))
        colour = COLOURS.get(r["topology"])
        ax.plot(epochs, [100 * v for v in r["curve_mean"]], label=r["label"], color=colour, lw=1.4)
        ax.fill_between(
            epochs,
            [100 * v for v in r["curve_lo"]],
            [100 * v for v in r["curve_hi"]],
            color=colour,
            alpha=0.15,
            lw=0,
        )
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
        runs.sort(key=lambda r: r[key])
        xs = [r[key] for r in runs]
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
    ax.set_ylabel(f"test error after {cfg['epochs']} epochs (%)")
    ax.set_title(f"{cfg['dataset']}: {cfg['peers']} peers, {cfg['split']} split, seeds {len(cfg['seeds'])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
