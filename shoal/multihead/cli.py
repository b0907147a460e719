"""``shoal multihead``: paper 001's comparison (multi-head against HC and 2M) on coloured digits, the
held-out pairs, int8, and export of the multi-head model to a model repository.

Importing this module is cheap (no torch, no matplotlib): ``shoal --help`` imports every command module.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

HELP = "multi-head classifiers (paper 001): MH against HC and 2M on coloured digits, tables, charts, export"
EXAMPLE = """\
shoal multihead                                        # both backbones, ~15 min on 2 cores; runs/multihead/
shoal multihead --backbones smallcnn --export models/  # a minute or two; then models/coloured-digits-smallcnn/<next>/
shoal multihead --holdout 0 --loss-weights digit=2 colour=1
shoal infer --url http://127.0.0.1:8000 --token devkey --model coloured-digits-smallcnn digit.png"""

BACKBONES = ("smallcnn", "efficientnet-lite0")


def _weights(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or k not in ("digit", "colour"):
            raise argparse.ArgumentTypeError(f"loss weight {item!r}: write digit=W or colour=W")
        out[k] = float(v)
    return {"digit": out.get("digit", 1.0), "colour": out.get("colour", 1.0)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbones",
        nargs="+",
        choices=BACKBONES,
        default=list(BACKBONES),
        help="frozen backbones to compare (default: both)",
    )
    d = p.add_argument_group("data (coloured digits, generated from MNIST; docs/multihead.md)")
    d.add_argument("--train-images", type=int, default=10_000, help="training images (default: 10000)")
    d.add_argument("--test-images", type=int, default=5000, help="test images (default: 5000)")
    d.add_argument(
        "--holdout", type=int, default=10, help="(digit, colour) pairs kept out of training (default: 10)"
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default: 0)")
    d.add_argument("--data-dir", help="folder with the MNIST files (also: SHOAL_DATA_DIR)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=30, help="epochs of the heads (default: 30)")
    t.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate of the heads (default: 0.003)")
    t.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    t.add_argument(
        "--loss-weights",
        nargs="+",
        default=["digit=1", "colour=1"],
        metavar="CAT=W",
        help="weights of the multi-head's summed losses (default: digit=1 colour=1)",
    )
    t.add_argument(
        "--image-size",
        type=int,
        default=128,
        help="EfficientNet-Lite0 input in pixels, upsampled from 28 (default: 128; ImageNet used 224)",
    )
    t.add_argument(
        "--pretrain-source",
        choices=("fashion-mnist", "mnist"),
        default="mnist",
        help="source task of the small CNN, in random hues: MNIST digits the target set never uses (default), or garments",
    )
    t.add_argument("--pretrain-images", type=int, default=8000, help="source images (default: 8000)")
    t.add_argument("--pretrain-epochs", type=int, default=2, help="source epochs (default: 2)")
    t.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default: 2)")
    m = p.add_argument_group("measurement and output")
    m.add_argument("--latency-runs", type=int, default=200, help="timed runs per model (default: 200)")
    m.add_argument(
        "--int8-eval-images", type=int, default=1000, help="test images for fp32/int8 in ONNX Runtime"
    )
    m.add_argument("--out", default="runs/multihead", help="results folder (default: runs/multihead)")
    m.add_argument(
        "--cache",
        default="",
        help="feature cache (default: $SHOAL_CACHE_DIR/multihead or ~/.cache/shoal/multihead)",
    )
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    e = p.add_argument_group("export")
    e.add_argument(
        "--export",
        metavar="REPO",
        help="export each backbone's multi-head model to REPO/coloured-digits-<backbone>/",
    )
    e.add_argument(
        "--export-split",
        metavar="REPO",
        help="also export each multi-head model cut in two for split placement (docs/edge.md): "
        "REPO/coloured-digits-<backbone>-backbone/ for devices, -heads/ for a cluster",
    )
    e.add_argument("--version", help="version folder to export to (default: next integer)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing version folder")


def run(args: argparse.Namespace) -> int:
    from shoal.data.mnist import DatasetError
    from shoal.modelrepo import ManifestError

    try:
        weights = _weights(args.loss_weights)
    except argparse.ArgumentTypeError as e:
        print(f"shoal multihead: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, weights)
    except (DatasetError, ManifestError, ValueError, FileNotFoundError) as e:
        print(f"shoal multihead: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # BackboneUnavailable and ONNX parity failures say what to do
        print(f"shoal multihead: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, weights: dict[str, float]) -> int:
    # torch and matplotlib are imported here, not at module level.
    from pathlib import Path

    from shoal.multihead import compare, data, report

    cfg = compare.Config(
        backbones=tuple(dict.fromkeys(args.backbones)),
        train_images=args.train_images,
        test_images=args.test_images,
        holdout=args.holdout,
        seed=args.seed,
        image_size=args.image_size,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        loss_weights=weights,
        pretrain_source=args.pretrain_source,
        pretrain_images=args.pretrain_images,
        pretrain_epochs=args.pretrain_epochs,
        latency_runs=args.latency_runs,
        int8_eval_images=args.int8_eval_images,
        threads=args.threads,
        cache_dir=args.cache,
        out_dir=args.out,
        data_dir=args.data_dir,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    command = "shoal multihead " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["multihead"] else ""
    t0 = time.perf_counter()
    results, models = compare.run(cfg)
    out = Path(cfg.out_dir)
    test = data.generate("test", cfg.test_images, cfg.seed, cfg.holdout, cfg.data_dir)
    report.samples_png(test, out / "samples.png")
    written = report.write(results, out, command)
    print(
        f"wrote {', '.join(str(p) for p in [*written, out / 'samples.png'])} in {time.perf_counter() - t0:.0f} s"
    )
    if args.export or args.export_split:
        from shoal.multihead.export import export_to_repo
        from shoal.multihead.split import export_split

        train_sha = results["data"]["train"]["sha256"]
        for name, trained in models.items():
            b = results["backbones"][name]
            prov = {
                "command": command or "shoal multihead",
                "data": {"generator": "shoal.multihead.data", "seed": cfg.seed, "train_sha256": train_sha},
                "backbone": name,
                "test_accuracy": {k: b["seen"]["MH"][k]["accuracy"] for k in data.CATEGORIES},
                "held_out_pairs_both_right": b.get("unseen", {}).get("MH", {}).get("both"),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            x = compare.to_input(test.images[:256])
            if args.export:
                dest = export_to_repo(trained.mh, args.export, name, prov, x, args.version, args.overwrite)
                print(f"exported {dest} (outputs digit and colour; ONNX matches PyTorch on {len(x)} test images)")
            if args.export_split:
                dev, clu = export_split(trained.mh, args.export_split, name, prov, x, args.version, args.overwrite)
                print(f"exported {dev} (device: backbone) and {clu} (cluster: heads)")
    return 0
