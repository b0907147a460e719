"""``shoal fuse``: cooperative learning by weight averaging (paper 003) on the in-process runner."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HELP = "Train peers that average weights (paper 003): one experiment or a sweep, with tables and plots."
EXAMPLE = """shoal fuse --dataset mnist --split one-class --epochs 30 --seeds 3 --out runs/fuse-mnist
shoal fuse --dataset mnist --split one-class --fuse-every 10steps 1epoch --update sequential simultaneous \
    --hypercube-edges twice once --epochs 20 --seeds 3 --out runs/one-class-grid
shoal fuse --dataset vowel --split random --sweep rate --epochs 200 --out runs/fuse-vowel-rate
shoal fuse --dataset vowel --split random --sweep every --everys 1 2 5 10 20 50 100 --out runs/fuse-vowel-every
shoal fuse --dataset vowel --split random --bench-engines 3    # speed-up of the batched engine over a loop
# peers on separate machines (Flower, TLS, enrolled sites): shoal federation --help"""

RATE_SWEEP = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
EVERY_SWEEP = [1, 2, 5, 10, 20, 50, 100]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from shoal.fusion.algorithm import UPDATES
    from shoal.fusion.datasets import DATASETS, SPLITS
    from shoal.fusion.topology import HYPERCUBE_EDGES

    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    p.add_argument("--split", choices=SPLITS, default="one-class", help="how peers' shards are drawn")
    p.add_argument("--peers", type=int, default=None, help="default: one per class (one-class), else 8")
    p.add_argument(
        "--topologies",
        nargs="+",
        default=["ring", "random", "hypercube"],
        help="ring, random, hypercube (the paper's), average (a reference: all peers to their mean)",
    )
    p.add_argument("--rate", type=float, default=0.55, help="fusion rate F (paper: 0.55)")
    p.add_argument(
        "--fuse-every",
        nargs="+",
        default=None,
        metavar="INTERVAL",
        help="fusion interval(s): optimizer steps or epochs of local training per round, e.g. 10steps 1epoch",
    )
    p.add_argument("--every", type=int, default=1, help="fusion frequency K: fuse every K epochs")
    p.add_argument(
        "--update",
        nargs="+",
        choices=UPDATES,
        default=["sequential"],
        help="Algorithm 1's order: sequential (as printed, B moves toward the new A) or simultaneous",
    )
    p.add_argument(
        "--hypercube-edges",
        nargs="+",
        choices=HYPERCUBE_EDGES,
        default=["twice"],
        help="Algorithm 4's reading: every edge twice per stage (as printed) or once",
    )
    p.add_argument("--sweep", choices=["none", "rate", "every"], default="none")
    p.add_argument("--rates", type=float, nargs="+", default=RATE_SWEEP, help="values for --sweep rate")
    p.add_argument("--everys", type=int, nargs="+", default=EVERY_SWEEP, help="values for --sweep every")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1) for the intervals")
    p.add_argument("--lr", type=float, default=None, help="default: the paper's rate for the data set")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="default: the paper's hidden sizes")
    p.add_argument("--batch", type=int, default=None, help="examples per SGD step (1 for UCI, 10 for MNIST)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for --split dirichlet")
    p.add_argument("--no-shared-init", action="store_true", help="give every peer its own initial weights")
    p.add_argument("--no-baselines", action="store_true", help="skip the all-data and single-shard runs")
    p.add_argument("--engine", choices=["batched", "loop"], default="batched")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--bench-engines", type=int, default=0, metavar="EPOCHS", help="time both engines instead")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/fuse"),
        help="folder for results.json, table.md, PNGs and cells/ (finished parts: rerun to continue)",
    )
    p.add_argument("--no-progress", action="store_true")


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    def make(name: str, epochs: int) -> Any:
        bar = tqdm(total=epochs, desc=name, unit="epoch", dynamic_ncols=True)

        def on_epoch(epoch: int, errors: Any) -> None:
            bar.update(1)
            bar.set_postfix(mean_err=f"{errors.mean():.4f}")
            if epoch == epochs:
                bar.close()

        return on_epoch

    return make


def bench_engines(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per epoch of the batched engine and the per-peer loop on the same groups."""
    from shoal.fusion import datasets, runner
    from shoal.fusion.experiment import Config

    cfg = Config(
        dataset=args.dataset,
        split=args.split,
        peers=args.peers,
        lr=args.lr,
        hidden=args.hidden,
        batch=args.batch,
    ).resolved()
    data = datasets.load(args.dataset)
    shards = datasets.shard(data.y_train, cfg.split, cfg.peers or 8, seed=0, alpha=args.alpha)
    every = (args.fuse_every or [args.every])[0]
    groups = [
        runner.Group(
            t, shards, 0, args.rate, every, update=args.update[0], hypercube_edges=args.hypercube_edges[0]
        )
        for t in args.topologies
    ]
    out: dict[str, Any] = {
        "dataset": args.dataset,
        "batch": cfg.batch,
        "peers": sum(len(g.shards) for g in groups),
        "epochs": args.bench_engines,
    }
    for engine in ("batched", "loop"):
        tr = runner.run(
            data, groups, cfg.hidden or [], cfg.lr or 0.0, args.bench_engines, cfg.batch or 1, engine=engine
        )
        out[f"{engine}_s_per_epoch"] = tr.seconds / args.bench_engines
    out["speedup"] = out["loop_s_per_epoch"] / out["batched_s_per_epoch"]
    return out


def config_from_args(args: argparse.Namespace) -> Any:
    from shoal.fusion.experiment import Config

    if args.sweep == "every":
        intervals = [f"{k}epochs" for k in args.everys]
    elif args.fuse_every:
        intervals = list(args.fuse_every)
    else:
        intervals = [f"{args.every}epochs"]
    return Config(
        dataset=args.dataset,
        split=args.split,
        peers=args.peers,
        topologies=args.topologies,
        rates=args.rates if args.sweep == "rate" else [args.rate],
        intervals=intervals,
        updates=list(args.update),
        hypercube_edges=list(args.hypercube_edges),
        seeds=list(range(args.seeds)),
        epochs=args.epochs,
        lr=args.lr,
        hidden=args.hidden,
        batch=args.batch,
        shared_init=not args.no_shared_init,
        alpha=args.alpha,
        baselines=not args.no_baselines,
        engine=args.engine,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from shoal.fusion import datasets
    from shoal.fusion.experiment import markdown_grid, markdown_table, run_experiment
    from shoal.fusion.plots import plot_curves, plot_grid, plot_sweep

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.bench_engines:
        res = bench_engines(args)
        (args.out / "bench.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res))
        return 0
    try:
        cfg = config_from_args(args).resolved()
        datasets.load(cfg.dataset)  # its package or files missing: said now, in one line
    except (ValueError, FileNotFoundError) as e:
        print(f"shoal fuse: {e}", file=sys.stderr)
        return 2
    result = run_experiment(
        cfg,
        _progress(not args.no_progress and os.isatty(2)),
        out=args.out,
        log=lambda m: print(m, file=sys.stderr),
    )
    result["command"] = "shoal " + " ".join(sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps(result))
    table = markdown_table(result)
    (args.out / "table.md").write_text(table)
    if args.sweep != "none":
        plot_sweep(result, args.sweep, args.out / f"sweep_{args.sweep}.png")
    elif len(cfg.intervals) > 1 or len(cfg.updates) > 1 or len(cfg.hypercube_edges) > 1:
        fig2 = (
            (3.0, "paper 003 Fig. 2: about 3%")
            if (cfg.dataset, cfg.split) == ("mnist", "one-class")
            else None
        )
        plot_grid(result, args.out / "curves.png", fig2)
        marks = [e for e in (5, 10, 20) if e < cfg.epochs]
        (args.out / "grid.md").write_text(markdown_grid(result, marks))
    else:
        plot_curves(result, args.out / "curves.png")
    print(table)
    print(f"wrote {args.out}/results.json, table.md and plots ({result['seconds']:.1f} s)")
    return 0
