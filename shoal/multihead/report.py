"""Write the comparison: ``results.json``, ``results.md`` (paper 001's Tables I-III for our data, the
held-out pairs, int8, and the paper's ratios next to ours) and PNG charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from shoal.multihead import data
from shoal.train.figures import pyplot, save

APPROACHES = ("MH", "2M", "HC")

# Paper 001, Tables I-III (Stanford Cars, make and type; Caffe on a Raspberry Pi 3): MH, 2M, HC.
PAPER: dict[str, dict[str, tuple[float, float, float]]] = {
    "AlexNet": {
        "size_mb": (223.0, 445.2, 445.2),
        "parameters": (20.36e6, 40.50e6, 20.33e6),
        "trained_macs": (17.00e6, 33.78e6, 17.21e6),
        "latency": (17.215, 35.498, 17.693),
    },
    "GoogleNet": {
        "size_mb": (40.9, 95.6, 48.6),
        "parameters": (8.28e6, 18.36e6, 9.92e6),
        "trained_macs": (57.344e3, 57.344e3, 107.520e3),
        "latency": (3.178, 7.265, 3.277),
    },
    "SqueezeNet": {
        "size_mb": (2.9, 5.7, 3.0),
        "parameters": (749.5e3, 1470.26e3, 745.39e3),
        "trained_macs": (28.728e3, 28.728e3, 53.865e3),
        "latency": (6.466, 12.848, 6.512),
    },
}
RATIO_ROWS = (
    ("size_mb", "size"),
    ("parameters", "parameters"),
    ("trained_macs", "MACs of trained layers"),
    ("macs", "MACs of whole model"),
    ("latency", "latency"),
)


def _n(x: float) -> str:
    """Counts as the paper prints them: 20.36M, 57.34K."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _cost(b: dict[str, Any], approach: str, key: str) -> float:
    c = b["costs"][approach]
    return c["latency"]["median_ms"] if key == "latency" else c[key]


def backbone_table(name: str, b: dict[str, Any]) -> list[str]:
    s = b["seen"]
    rows = [f"### {name}", "", "| | | MH | 2M | HC |", "|---|---|---|---|---|"]
    for metric in ("accuracy", "loss"):
        for cat in data.CATEGORIES:
            cells = [f"{s[a][cat][metric]:.3f}" for a in APPROACHES]
            rows.append(f"| {metric} | {cat} | {' | '.join(cells)} |")
    c = b["costs"]

    def row(title: str, values: list[str]) -> str:
        return f"| {title} | " + " | ".join(values) + " |"

    rows += [
        row("accuracy | both right", [f"{s[a]['both']:.3f}" for a in APPROACHES]),
        row(f"loss | over the {b['hc_classes']} pairs", ["", "", f"{s['HC']['pair_loss']:.3f}"]),
        row("size (MB) | ONNX, fp32", [f"{c[a]['size_mb']:.2f}" for a in APPROACHES]),
        row("parameters | whole", [_n(c[a]["parameters"]) for a in APPROACHES]),
        row("parameters | trained", [_n(c[a]["trained_parameters"]) for a in APPROACHES]),
        row("MACs | whole model", [_n(c[a]["macs"]) for a in APPROACHES]),
        row("MACs | trained layers", [_n(c[a]["trained_macs"]) for a in APPROACHES]),
        row(
            "latency (ms) | 1 core, 1 thread, median",
            [f"{c[a]['latency']['median_ms']:.3f}" for a in APPROACHES],
        ),
    ]
    return rows + [""]


def _head(columns: list[str]) -> list[str]:
    """A markdown table's column names and the line under them."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def ratio_table(results: dict[str, Any]) -> list[str]:
    names = list(results["backbones"])
    rows = _head(["ratio"] + ["paper " + p for p in PAPER] + [f"ours, {n}" for n in names])
    for key, label in RATIO_ROWS:
        for other, idx in (("2M", 1), ("HC", 2)):
            cells = []
            for p in PAPER.values():
                cells.append(f"{p[key][0] / p[key][idx]:.2f}" if key in p else "n/a")
            for n in names:
                b = results["backbones"][n]
                cells.append(f"{_cost(b, 'MH', key) / _cost(b, other, key):.2f}")
            rows.append(f"| MH / {other}, {label} | " + " | ".join(cells) + " |")
    return rows + [""]


def heldout_table(results: dict[str, Any]) -> list[str]:
    accuracies = ["MH digit", "MH colour", "MH both", "2M both", "HC digit", "HC colour", "HC both"]
    rows = _head(["backbone", "images", *accuracies])
    for n, b in results["backbones"].items():
        u = b.get("unseen")
        if not u:
            continue
        rows.append(
            f"| {n} | {u['images']} | {u['MH']['digit']['accuracy']:.3f} | {u['MH']['colour']['accuracy']:.3f} | "
            f"**{u['MH']['both']:.3f}** | {u['2M']['both']:.3f} | {u['HC']['digit']['accuracy']:.3f} | "
            f"{u['HC']['colour']['accuracy']:.3f} | **{u['HC']['both']:.3f}** |"
        )
    return rows + [""]


def int8_table(results: dict[str, Any]) -> list[str]:
    seen, held_out = ["seen: digit", "colour", "both"], ["held-out: digit", "colour", "both"]
    rows = _head(["backbone", "model", "size (MB)", "latency (ms)", *seen, *held_out])
    for n, b in results["backbones"].items():
        for kind in ("fp32", "int8"):
            r = b["int8"][kind]
            s, u = r.get("seen", {}), r.get("unseen", {})

            def f(d: dict[str, Any], k: str) -> str:
                return f"{d[k]:.3f}" if k in d else "-"

            rows.append(
                f"| {n} | MH {kind} | {r['size_mb']:.2f} | {r['latency']['median_ms']:.3f} | {f(s, 'digit')} | "
                f"{f(s, 'colour')} | {f(s, 'both')} | {f(u, 'digit')} | {f(u, 'colour')} | {f(u, 'both')} |"
            )
    return rows + [""]


def markdown(results: dict[str, Any], command: str = "") -> str:
    cfg = results["config"]
    d = results["data"]
    load = results["machine"].get("load_average_start")
    lines = [
        "# Multi-head against HC and 2M on coloured digits",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"Data: {d['train']['images']} training images, {d['test']['images']} test images "
        f"(seed {cfg['seed']}; {len(d['train']['held_out_pairs'])} (digit, colour) pairs held out of training, "
        f"{d['test']['unseen_pairs_images']} test images of those pairs). Accuracy and loss below are on the "
        f"test images of the pairs seen in training. Heads: {cfg['epochs']} epochs of Adam (lr {cfg['lr']}) on "
        f"frozen features; loss weights {cfg['loss_weights']}. EfficientNet-Lite0 input {cfg['image_size']} px. "
        f"Latency: ONNX Runtime, one image, one pinned core, one thread, median of {cfg['latency_runs']} runs "
        f"on {results['machine'].get('cpu', 'this CPU')} (load average {load[0]:.1f} on "
        f"{results['machine']['cpus']} cores at the start, shared with other jobs)."
        if load
        else "",
        f"Whole run: {results['seconds']:.0f} s.",
        "",
        "## Tables I-III for our backbones",
        "",
    ]
    for n, b in results["backbones"].items():
        lines += backbone_table(n, b)
    lines += ["## Paper's ratios and ours (MH divided by 2M or HC)", ""] + ratio_table(results)
    lines += ["## Pairs never seen together in training", ""] + heldout_table(results)
    lines += ["## int8 dynamic quantisation of the multi-head model (ONNX Runtime)", ""] + int8_table(results)
    return "\n".join(lines) + "\n"


def charts(results: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    names = list(results["backbones"])
    colours = {"MH": "#1f77b4", "2M": "#ff7f0e", "HC": "#2ca02c"}
    paths = []
    # Accuracy: per category on seen pairs, and on the held-out pairs.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    groups = [(n, cat) for n in names for cat in (*data.CATEGORIES, "both")]
    x = np.arange(len(groups))
    for ax, split, title in (
        (axes[0], "seen", "pairs seen in training"),
        (axes[1], "unseen", "held-out pairs"),
    ):
        for i, a in enumerate(APPROACHES):
            vals = []
            for n, cat in groups:
                s = results["backbones"][n].get(split)
                v = 0.0 if not s else (s[a]["both"] if cat == "both" else s[a][cat]["accuracy"])
                vals.append(v)
            ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=a, color=colours[a])
        ax.set_xticks(x, [f"{n.replace('efficientnet-', '')}\n{cat}" for n, cat in groups], fontsize=8)
        ax.set_title(f"test accuracy, {title}")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(loc="upper right", fontsize=8)
    paths.append(save(fig, out / "accuracy.png", dpi=110))
    # Costs, relative to MH, per backbone (log scale: HC and 2M trained MACs differ by orders).
    keys = [k for k, _ in RATIO_ROWS]
    fig, axes = plt.subplots(1, len(keys), figsize=(15, 3.6))
    for ax, (key, label) in zip(axes, RATIO_ROWS, strict=True):
        xb = np.arange(len(names))
        for i, a in enumerate(APPROACHES):
            vals = [_cost(results["backbones"][n], a, key) for n in names]
            ax.bar(xb + (i - 1) * 0.27, vals, 0.27, label=a, color=colours[a])
        ax.set_xticks(xb, names, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(
            label + (" (ms)" if key == "latency" else " (MB)" if key == "size_mb" else ""), fontsize=9
        )
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    paths.append(save(fig, out / "costs.png", dpi=110))
    return paths


def samples_png(ds: data.ColouredDigits, path: Path, count: int = 24) -> Path:
    """A grid of generated images titled with both labels (held-out pairs in red)."""
    plt = pyplot()
    cols = 8
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5))
    unseen = ds.unseen
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < min(count, len(ds)):
            ax.imshow(ds.images[i])
            ax.set_title(
                f"{data.DIGITS[ds.digit[i]]} {data.COLOURS[ds.colour[i]]}",
                fontsize=8,
                color="red" if unseen[i] else "black",
            )
    return save(fig, path)


def write(results: dict[str, Any], out: Path, command: str = "") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results, command))
    return [out / "results.json", out / "results.md", *charts(results, out)]
