"""``shoal train``: train a model, watch it, stop and resume it, export it to a model repository.

Importing this module is cheap (no torch): ``shoal --help`` imports every command module.
"""

from __future__ import annotations

import argparse
import sys

HELP = "train the MNIST softmax / MLP / CNN models, with checkpoints, plots and export to a model repository"
EXAMPLE = """\
shoal train mnist --arch cnn --export models/          # ~4 epochs, 99%+, then models/mnist-cnn/<next>/
shoal train mnist --arch mlp --activation relu --epochs 10 --lr 0.001
shoal train mnist --arch softmax --optimizer sgd --lr 0.1 --target-train-acc 0.92
shoal train mnist --arch cnn --resume                   # continue runs/mnist-cnn/checkpoint.pt
tensorboard --logdir runs/                              # curves while it trains"""

TASKS = ("mnist", "fashion-mnist")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=TASKS, help="dataset to train on")
    p.add_argument("--arch", choices=("softmax", "mlp", "cnn"), default="cnn", help="model (default: cnn)")
    p.add_argument(
        "--activation",
        choices=("sigmoid", "relu"),
        default="sigmoid",
        help="MLP hidden units (default: sigmoid)",
    )
    p.add_argument(
        "--dropout", type=float, default=0.5, help="CNN dropout before the last layer (default: 0.5)"
    )
    g = p.add_argument_group("optimisation (defaults depend on --arch; see docs/training.md)")
    g.add_argument(
        "--optimizer", choices=("sgd", "momentum", "adam"), help="sgd is the paper's gradient descent"
    )
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--batch-size", type=int, help="images per step")
    g.add_argument("--epochs", type=int, help="passes over the training set")
    g.add_argument(
        "--target-train-acc",
        type=float,
        help="early stop after the first epoch whose training accuracy reaches it",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and dropout (default: 0)")
    r = p.add_argument_group("run")
    r.add_argument(
        "--out", default="", help="run folder: checkpoint, plot, TensorBoard (default: runs/<task>-<arch>)"
    )
    r.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    r.add_argument("--max-steps", type=int, default=0, help="stop (with a checkpoint) after N steps in all")
    r.add_argument(
        "--train-subset", type=int, default=0, help="train on the first N images only (quick runs)"
    )
    r.add_argument("--test-subset", type=int, default=0, help="evaluate on the first N test images only")
    r.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard event files")
    r.add_argument("--no-plot", action="store_true", help="write no curves.png")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="folder with the original IDX files (also: SHOAL_DATA_DIR)")
    d.add_argument("--download", action="store_true", help="download the original files if not found locally")
    e = p.add_argument_group("export")
    e.add_argument(
        "--export", metavar="REPO", help="when done, export to REPO/<task>-<arch>/<version>/ as ONNX"
    )
    e.add_argument("--version", help="version folder to export to (default: next integer)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing version folder")


def run(args: argparse.Namespace) -> int:
    from shoal.data.mnist import DatasetError

    try:
        return _run(args)
    except (DatasetError, ValueError, FileNotFoundError) as e:
        print(f"shoal train: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    # torch is imported here, not at module level.
    from shoal.train.mnist import TrainConfig, provenance, train

    cfg = TrainConfig(
        dataset=args.task,
        arch=args.arch,
        activation=args.activation,
        dropout=args.dropout,
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        target_train_acc=args.target_train_acc,
        seed=args.seed,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        max_steps=args.max_steps,
        out_dir=args.out,
        data_dir=args.data_dir,
        download=args.download,
        threads=args.threads,
        progress=not args.no_progress and sys.stderr.isatty(),
        tensorboard=not args.no_tensorboard,
        plot=not args.no_plot,
        resume=args.resume,
    )
    result = train(cfg)
    out = result.config.out_dir
    print(
        f"test accuracy {result.test_acc:.4f} (loss {result.test_loss:.4f}) after {result.state.epoch} epochs, "
        f"{result.state.train_seconds:.1f} s of training; run folder {out}"
    )
    if not result.finished:
        return 0
    if args.export:
        from shoal.train.export import export_to_repo

        if result.config.test_subset:
            print("shoal train: export needs the full test set (drop --test-subset)", file=sys.stderr)
            return 2
        export_args = f" --export {args.export}" + (f" --version {args.version}" if args.version else "")
        dest, parity = export_to_repo(
            result.model,
            args.export,
            result.config.dataset,
            result.config.arch,
            provenance(result, export_args),
            version=args.version,
            overwrite=args.overwrite,
            data_dir=result.config.data_dir,
        )
        print(
            f"exported {dest} (ONNX matches PyTorch on {parity.images} test images, "
            f"max |diff| {parity.max_abs_diff:.1e})"
        )
    return 0
