"""``shoal train``: train a model of the catalogue, watch it, stop and resume it, export it to a model
repository; on several processes or machines with ``--nproc`` / ``--nnodes`` / ``--rdzv``.

``shoal train FAMILY [options]``: the family picks the options. The MNIST trainer has its own
(``shoal train mnist --help``); every other family's options are the fields of the ``Config`` at the
top of its file, turned into flags here, with the comment beside each field as its help.

Importing this module is cheap (no torch): ``shoal --help`` imports every command module.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from shoal.train.catalogue import FAMILIES, RESULTS, Family

HELP = "train paper 002's model catalogue and paper 004's MNIST models; export them to a model repository"
EXAMPLE = """\
shoal train list                                    # every family, its data set, the metric reached here
shoal train mnist --arch cnn --export models/       # ~4 epochs, 99%+, then models/mnist-cnn/<next>/
shoal train kmeans --data circles --export models/  # any family: 'shoal train FAMILY --help'
shoal train feedforward --data wine --epochs 300 --device auto
shoal train mnist --arch cnn --nproc 2 --threads 1  # two data-parallel workers (torch.distributed, gloo)
shoal train mnist --nnodes 2 --nproc 4 --rdzv 10.0.0.5:29400  # on each of two machines
shoal train pi --nproc 2                            # the book's distributed pi
tensorboard --logdir runs/                          # MNIST curves while it trains"""

MNIST_TASKS = ("mnist", "fashion-mnist")
# Families that need shoal[catalogue] too: an export through skl2onnx, or data sets in its packages.
CATALOGUE_DATA = ("kmeans", "knn", "feedforward", "energy", "bach")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "family",
        metavar="FAMILY",
        choices=["list", *FAMILIES],
        help=f"list, or one of: {', '.join(FAMILIES)}",
    )
    p.add_argument(
        "options", nargs=argparse.REMAINDER, help="the family's options: 'shoal train FAMILY --help'"
    )


# -------------------------------------------------------------------------------------- options


def add_mnist_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=("softmax", "mlp", "cnn"), default="cnn", help="model (default: cnn)")
    p.add_argument(
        "--recipe",
        choices=("shoal", "paper"),
        default="shoal",
        help="paper: paper 004 as printed (softmax, mlp; docs/training.md); default: shoal's recipe",
    )
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
    add_device_arguments(p)
    add_export_arguments(p, "when done, export to REPO/<task>-<arch>/<version>/ as ONNX")


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices and distributed training (torch.distributed, elastic launcher)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    g.add_argument(
        "--nproc", type=int, help="data-parallel worker processes on this machine, started by the elastic launcher"
    )
    g.add_argument("--nnodes", default="1", help="machines taking part: N, or MIN:MAX (default: 1)")
    g.add_argument("--rdzv", default="", help="HOST:PORT where the machines' agents meet (several machines)")
    g.add_argument(
        "--max-restarts", type=int, default=3, help="restarts of the worker group after a failure (default: 3)"
    )
    g.add_argument(
        "--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (default: each epoch)"
    )


def add_export_arguments(p: argparse.ArgumentParser, export_help: str | None) -> None:
    e = p.add_argument_group("export and record")
    if export_help:
        e.add_argument("--export", metavar="REPO", help=export_help)
        e.add_argument("--version", help="version folder to export to (default: next integer)")
        e.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    e.add_argument(
        "--record",
        nargs="?",
        const=str(RESULTS),
        metavar="FILE",
        help="store the figures reached in FILE (default: the results 'shoal train list' prints)",
    )


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^=#]*=[^#]*#\s*(.+)$")


def field_help(config: type) -> dict[str, str]:
    """The comment beside each field of a family's ``Config``, as its help text."""
    try:
        src = getattr(config, "_source", None) or inspect.getsource(config)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_FIELD_COMMENT.match, src.splitlines()) if m}


def add_config_arguments(p: argparse.ArgumentParser, fam: Family, config: type) -> None:
    helps = field_help(config)
    g = p.add_argument_group(f"{fam.name} settings (the Config at the top of {fam.module.replace('.', '/')}.py)")
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = helps.get(f.name, "")
        if f.name == "data":
            choices = ", ".join(f"{k}: {v}" for k, v in fam.data.items())
            g.add_argument(flag, choices=list(fam.data), default=default, help=f"data set ({choices})")
        elif isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            kind = type(default) if default is not None else str
            g.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")


def _source(fam: Family) -> str:
    """The text of the family's module, read without importing it (nor torch)."""
    parent, _, leaf = fam.module.rpartition(".")
    spec = importlib.util.find_spec(parent)
    assert spec is not None and spec.submodule_search_locations
    return (Path(list(spec.submodule_search_locations)[0]) / f"{leaf}.py").read_text()


def family_config(fam: Family) -> type:
    """The family's ``Config`` dataclass. Without the packages its module trains with (torch), the
    class is made from the module's source, so that ``shoal train FAMILY --help`` prints anyway."""
    try:
        return importlib.import_module(fam.module).Config
    except ImportError:
        src = _source(fam)
        node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "Config")
        code = "from __future__ import annotations\nfrom dataclasses import dataclass, field\n"
        namespace: dict[str, Any] = {}
        exec(code + ast.get_source_segment(src, node, padded=False).join(["@dataclass\n", ""]), namespace)  # noqa: S102
        config = namespace["Config"]
        config._source = ast.get_source_segment(src, node)
        return config


def family_examples(fam: Family) -> list[str]:
    """``shoal train FAMILY ...`` lines of the family module's docstring, else a plain one."""
    if fam.name in MNIST_TASKS:
        return [
            f"shoal train {fam.name} --arch cnn --export models/     # then models/{fam.name}-cnn/<next>/",
            f"shoal train {fam.name} --arch mlp --epochs 2 --train-subset 10000",
            f"shoal train {fam.name} --arch cnn --resume --export models/   # after Ctrl-C: continue, then export",
        ]
    doc = ast.get_docstring(ast.parse(_source(fam))) or ""
    lines = [line.strip() for line in doc.splitlines() if line.strip().startswith(f"shoal train {fam.name}")]
    return lines or [f"shoal train {fam.name}" + (" --export models/" if fam.export else "")]


def family_parser(fam: Family) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"shoal train {fam.name}",
        description=f"paper 002, chapter {fam.chapter}: " + "; ".join(fam.data.values())
        + ". Needs pip install 'shoal[train]'"
        + (" and 'shoal[catalogue]'" if fam.name in CATALOGUE_DATA else "")
        + ".",
        epilog="example:\n  " + "\n  ".join(family_examples(fam)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if fam.name in MNIST_TASKS:
        add_mnist_arguments(p)
        return p
    add_config_arguments(p, fam, family_config(fam))
    r = p.add_argument_group("run")
    r.add_argument("--out", default="", help="run folder: plots, checkpoint, result (default: runs/<family>-<data>)")
    r.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--no-plot", action="store_true", help="write no plots")
    if fam.torch:
        r.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
        add_device_arguments(p)
    add_export_arguments(p, "when done, publish to REPO/<model>/<version>/ as ONNX" if fam.export else None)
    return p


# -------------------------------------------------------------------------------------- running


def run(args: argparse.Namespace) -> int:
    from shoal.data.mnist import DatasetError

    if args.family == "list":
        from shoal.train.catalogue import table

        print(table())
        return 0
    fam = FAMILIES[args.family]
    try:
        opts = family_parser(fam).parse_args(args.options)
        if getattr(opts, "nproc", None) is not None and "LOCAL_RANK" not in os.environ:
            return _launch(fam, args.options, opts)
        if fam.name in MNIST_TASKS:
            return _run_mnist(fam, args.options, opts)
        return _run_family(fam, args.options, opts)
    except (DatasetError, ValueError, FileNotFoundError) as e:
        print(f"shoal train: {e}", file=sys.stderr)
        return 2


def _launch(fam: Family, options: list[str], opts: argparse.Namespace) -> int:
    """Start this very command as ``--nproc`` workers under torch's elastic agent."""
    from shoal.train import distributed

    argv = ["train", fam.name, *options]
    if "--threads" not in options:  # share this machine's cores among its workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        argv += ["--threads", str(max(1, cores // max(1, opts.nproc)))]
    return distributed.launch(argv, opts.nproc, opts.nnodes, opts.rdzv, opts.max_restarts)


# Options that say where a run's files go, not what it learns: left out of the recorded command.
_RUN_ONLY = {"--out": 1, "--record": 1, "--no-progress": 0, "--no-plot": 0, "--resume": 0}


def reproducible(options: list[str]) -> list[str]:
    """The options that decide what a run learns (and where it publishes), for its provenance."""
    return _without(options, _RUN_ONLY)


def _without(options: list[str], drop: dict[str, int]) -> list[str]:
    """``options`` less the flags in ``drop`` (flag -> how many values follow it)."""
    out, i = [], 0
    while i < len(options):
        name = options[i].split("=", 1)[0]
        if name in drop:
            takes = drop[name] if "=" not in options[i] else 0
            if name == "--record" and (i + 1 >= len(options) or options[i + 1].startswith("--")):
                takes = 0  # --record without a file
            i += 1 + takes
            continue
        out.append(options[i])
        i += 1
    return out


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _finish(fam: Family, options: list[str], opts: argparse.Namespace, trained: Any, out: Path) -> int:
    """Rank 0: print the outcome, keep it in the run folder, publish it, record it."""
    from shoal.train import catalogue

    o = trained.outcome
    command = shlex.join(["shoal", "train", fam.name, *reproducible(options)])
    print(o.line() + f" ({o.seconds:.1f} s on {o.device}); run folder {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"command": command, **dataclasses.asdict(o)}, indent=1) + "\n")
    if getattr(opts, "export", None):
        if trained.publish is None:
            raise ValueError(f"{o.model} cannot be exported")
        dest = trained.publish(opts.export, opts.version, opts.overwrite, catalogue.provenance(o, command))
        print(f"exported {dest}")
    if getattr(opts, "record", None):
        catalogue.record(o, command, Path(opts.record))
        print(f"recorded {o.model} in {opts.record}")
    return 0


def _run_family(fam: Family, options: list[str], opts: argparse.Namespace) -> int:
    from shoal.train.catalogue import Run

    mod = importlib.import_module(fam.module)
    cfg = mod.Config(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(mod.Config)})
    out = Path(opts.out or Path("runs") / f"{fam.name}-{getattr(cfg, 'data', fam.name)}")
    run_opts = Run(
        out_dir=str(out),
        device=getattr(opts, "device", "cpu"),
        threads=opts.threads,
        progress=not opts.no_progress and sys.stderr.isatty(),
        plot=not opts.no_plot,
        resume=getattr(opts, "resume", False),
        checkpoint_every=getattr(opts, "checkpoint_every", 0),
    )
    trained = mod.train(cfg, run_opts)
    if not _is_main():
        return 0
    return _finish(fam, options, opts, trained, out)


def _run_mnist(fam: Family, options: list[str], opts: argparse.Namespace) -> int:
    # torch is imported here, not at module level.
    from shoal.train.catalogue import Outcome
    from shoal.train.mnist import TrainConfig, provenance, train

    cfg = TrainConfig(
        dataset=fam.name,
        arch=opts.arch,
        activation=opts.activation,
        recipe=opts.recipe,
        dropout=opts.dropout,
        optimizer=opts.optimizer,
        lr=opts.lr,
        batch_size=opts.batch_size,
        epochs=opts.epochs,
        target_train_acc=opts.target_train_acc,
        seed=opts.seed,
        train_subset=opts.train_subset,
        test_subset=opts.test_subset,
        max_steps=opts.max_steps,
        out_dir=opts.out,
        data_dir=opts.data_dir,
        download=opts.download,
        threads=opts.threads,
        device=opts.device,
        checkpoint_every=opts.checkpoint_every,
        progress=not opts.no_progress and sys.stderr.isatty(),
        tensorboard=not opts.no_tensorboard,
        plot=not opts.no_plot,
        resume=opts.resume,
    )
    result = train(cfg)
    if not _is_main():
        return 0
    out = result.config.out_dir
    print(
        f"test accuracy {result.test_acc:.4f} (loss {result.test_loss:.4f}) after {result.state.epoch} epochs, "
        f"{result.state.train_seconds:.1f} s of training on {result.device}"
        + (f" with {result.workers} workers" if result.workers > 1 else "")
        + f"; run folder {out}"
    )
    if not result.finished:
        # Nothing is exported from a run that stopped early: say how to go on, and fail when it was Ctrl-C.
        again = _without(options, {"--resume": 0, "--max-steps": 1}) + ["--resume"]
        if not opts.export:
            again += ["--export", "models/"]
        print(
            f"shoal train: stopped at epoch {result.state.epoch}, step {result.state.step_in_epoch}, before the "
            f"last epoch: nothing exported. Continue (and export when it ends) with: "
            + shlex.join(["shoal", "train", fam.name, *again]),
            file=sys.stderr,
        )
        return 130 if result.interrupted else 0
    if opts.export:
        from shoal.train.export import export_to_repo

        if result.config.test_subset:
            print("shoal train: export needs the full test set (drop --test-subset)", file=sys.stderr)
            return 2
        export_args = f" --export {opts.export}" + (f" --version {opts.version}" if opts.version else "")
        dest, parity = export_to_repo(
            result.model,
            opts.export,
            result.config.dataset,
            result.config.arch,
            provenance(result, export_args),
            version=opts.version,
            overwrite=opts.overwrite,
            data_dir=result.config.data_dir,
        )
        print(
            f"exported {dest} (ONNX matches PyTorch on {parity.images} test images, "
            f"max |diff| {parity.max_abs_diff:.1e})"
        )
    if opts.record:
        from shoal.train import catalogue

        hist = result.state.history
        samples = (result.config.train_subset or 60000) * result.state.epoch
        outcome = Outcome(
            family=fam.name,
            data=fam.name,
            model=f"{fam.name}-{result.config.arch}",
            dataset=next(iter(fam.data.values())),
            metric="test accuracy",
            value=result.test_acc,
            details={
                "test_loss": round(result.test_loss, 6),
                "epochs": result.state.epoch,
                "workers": result.workers,
                "samples_per_s": round(samples / max(result.state.train_seconds, 1e-9), 1),
                "history": hist,
            },
            data_sha256=result.data_checksums,
            seconds=result.state.train_seconds,
            device=result.device,
        )
        catalogue.record(outcome, result.config.command(), Path(opts.record))
        print(f"recorded {outcome.model} in {opts.record}")
    return 0
