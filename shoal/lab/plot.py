"""The run's timeline as a PNG (matplotlib, Agg): answers and failures per 200 ms, the slowest request
sent in each 200 ms, and the workers each gateway holds as accepting, with the faults marked (a
fault that lasts shaded until it heals, a crash a line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

BIN_S = 0.2


def plot_timeline(
    reqs: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    faults: list[dict[str, Any]],
    gateways: list[str],
    t0: float,
    path: Path,
    title: str = "",
) -> Path:
    """``reqs``: ``checker.pair_requests``' records; ``samples``: the observer's; times from ``t0``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = np.asarray([r["done"] - t0 for r in reqs if r["ok"]])
    failed = np.asarray([r["done"] - t0 for r in reqs if r["done"] is not None and not r["ok"]])
    last = max([r["done"] or r["sent"] for r in reqs], default=t0) - t0
    edges = np.arange(0.0, last + 2 * BIN_S, BIN_S)
    answered, _ = np.histogram(done, edges)
    fails, _ = np.histogram(failed, edges)
    sent = np.asarray([r["sent"] - t0 for r in reqs])
    lat = np.asarray([((r["done"] or t0 + last) - r["sent"]) for r in reqs])
    slowest = np.full(len(edges) - 1, np.nan)
    idx = np.clip(np.searchsorted(edges, sent, side="right") - 1, 0, len(slowest) - 1)
    for i, x in zip(idx, lat, strict=True):
        slowest[i] = x if np.isnan(slowest[i]) else max(slowest[i], x)

    fig, axes = plt.subplots(4, 1, figsize=(10, 8), sharex=True)
    ans, fail, slow, work = axes
    ans.plot(edges[:-1], answered, drawstyle="steps-post")
    ans.set_ylabel(f"answered / {int(BIN_S * 1000)} ms")
    fail.plot(edges[:-1], fails, drawstyle="steps-post", color="tab:red")
    fail.set_ylabel("failed")
    fail.set_ylim(bottom=0, top=max(1, int(fails.max()) + 1) if len(fails) else 1)
    slow.plot(edges[:-1], slowest, drawstyle="steps-post", color="tab:purple")
    slow.set_ylabel("slowest s\n(by time sent)")
    for gw in gateways:
        pts = sorted(
            (s["t"] - t0, sum(w["accepting"] for w in s["workers"].values()) if s["ok"] else 0)
            for s in samples
            if s["source"] == gw
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            work.plot(xs, ys, drawstyle="steps-post", label=gw)
    work.set_ylabel("workers held")
    work.set_xlabel("seconds")
    work.legend(loc="lower left", fontsize=8)
    for ax in axes:
        for f in faults:
            if "heal" in f:  # a fault that lasted: partition, dropped packets, a slow link, ...
                color = {"partition": "orange", "drop": "red", "lossy": "purple", "slow": "blue"}.get(f["kind"], "grey")
                ax.axvspan(f["start"] - t0, f["heal"] - t0, color=color, alpha=0.2)
            else:
                ax.axvline(f["start"] - t0, color="black", linestyle="--")
    for f in faults:
        ans.annotate(
            f["label"], (f["start"] - t0, 1.0), xycoords=("data", "axes fraction"), fontsize=8, va="bottom"
        )
    fig.suptitle(title or "shoal lab: requests, failures, workers, faults")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
