"""The training loop the catalogue's torch families share: mini-batches from a per-epoch shuffle,
progress, a test evaluation per epoch, checkpoints, and data parallelism when the elastic launcher
started several workers (``shoal.train.distributed``).

A family file starts its run with :func:`begin`, builds its data, its model and its loss, then calls
:meth:`Trainer.fit`; the :class:`Trainer` then draws its figures and writes its outcome. The loop is
the same on one process and on N: the global batch is the one a single process would take, each
worker runs its share of it, and DistributedDataParallel averages the gradients, so N workers take
the same steps as one (up to the order of float additions). Rank 0 alone prints and writes the
checkpoint; after an elastic restart every worker reads it back and carries on from its step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from shoal.train import distributed
from shoal.train.catalogue import Run, Session
from shoal.train.distributed import Context
from shoal.train.figures import pyplot, save

CHECKPOINT_FORMAT = "shoal.train.loop/1"


class Batches(Protocol):
    """A data set the loop can index: ``len()`` examples, ``take(indices) -> (inputs, targets)``."""

    def __len__(self) -> int: ...

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Tensors:
    """Examples held as two tensors, first dimension the example."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]


@dataclass
class Fit:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"  # adam | sgd | momentum
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint: Path | None = None  # rank 0 writes it after every epoch (and every checkpoint_every steps)
    checkpoint_every: int = 0
    resume: bool = False  # carry on from the checkpoint when there is one (always after an elastic restart)
    progress: bool = True
    desc: str = "train"


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0  # in training steps, this invocation and the ones it resumed
    samples: int = 0  # training examples seen by all workers together
    resumed_from: int | None = None  # the global step a restart carried on from

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def start(run: Run, seed: int) -> Context:
    """The start of any torch run: threads, seed, device, workers."""
    torch.set_num_threads(max(1, run.threads))
    torch.manual_seed(seed)  # every worker builds the same initial weights
    return distributed.context(run.device)


@dataclass
class Trainer(Session):
    """A torch family's :class:`Session`: the workers' context and the loop's settings."""

    ctx: Context = field(kw_only=True)
    settings: Fit = field(kw_only=True)

    def fit(
        self,
        model: nn.Module,
        train: Batches,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        evaluate: Callable[[nn.Module], dict[str, float]],
        log: Callable[[str], None] = print,
    ) -> History:
        """:func:`fit`, timed; the model is left on the CPU, where it is drawn and exported."""
        with self.timed():
            hist = fit(model, train, loss_fn, evaluate, self.settings, self.ctx, log)
        model.cpu()
        return hist


def begin(run: Run, family: str, config: Any, desc: str = "") -> Trainer:
    """Start a torch family's run (:func:`start`: call it before building the model, whose weights it
    seeds) with the loop's settings: the hyperparameters the family's ``Config`` has (epochs, batch
    size, learning rate, optimizer, weight decay, seed), checkpoints and progress as the run says;
    ``desc`` labels the progress bar ("FAMILY DATA" by default)."""
    ctx = start(run, config.seed)
    names = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "seed")
    hyper = {k: getattr(config, k) for k in names if hasattr(config, k)}
    settings = Fit(
        **hyper,
        checkpoint=Path(run.out_dir) / "checkpoint.pt",
        checkpoint_every=run.checkpoint_every,
        resume=run.resume,
        progress=run.progress,
        desc=desc or f"{family} {config.data}",
    )
    return Trainer(run, family, config.data, str(ctx.device), ctx.main, ctx=ctx, settings=settings)


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}' (known: adam, sgd, momentum)")


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    # Its own generator per epoch: a restart needs no shuffling state beyond (seed, epoch).
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(), **state}, tmp)
    os.replace(tmp, path)  # a worker killed while saving never leaves half a checkpoint


def fit(
    model: nn.Module,
    train: Batches,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    evaluate: Callable[[nn.Module], dict[str, float]],
    cfg: Fit,
    ctx: Context,
    log: Callable[[str], None] = print,
) -> History:
    """Train ``model`` in place on ``ctx.device``; ``evaluate(model)`` gives the test figures after
    each epoch (run by every worker on the unwrapped model, so each holds the same numbers)."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs per worker; DDP copies rank 0's weights
    model.to(ctx.device)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    hist = History()
    epoch, step_in_epoch = 0, 0
    if cfg.checkpoint is not None and cfg.checkpoint.is_file() and (cfg.resume or ctx.restart > 0):
        ck = torch.load(cfg.checkpoint, map_location=ctx.device, weights_only=False)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{cfg.checkpoint}: not a shoal training checkpoint")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        epoch, step_in_epoch = ck["epoch"], ck["step_in_epoch"]
        hist = History(**{**ck["history"], "resumed_from": ck["history"]["steps"]})
        if ctx.main:
            log(f"resumed {cfg.checkpoint} at epoch {epoch}, step {step_in_epoch} (restart {ctx.restart})")
    net = distributed.wrap(model, ctx)
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)

    def checkpoint() -> None:
        if ctx.main and cfg.checkpoint is not None:
            state = {"epoch": epoch, "step_in_epoch": step_in_epoch, "history": asdict(hist), "fit": asdict(cfg)}
            _save(cfg.checkpoint, model, opt, state)

    while epoch < cfg.epochs:
        order = epoch_order(cfg.seed, epoch, n)
        net.train()
        bar = tqdm(
            total=steps_per_epoch,
            initial=step_in_epoch,
            desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and ctx.main),
            leave=False,
            dynamic_ncols=True,
        )
        sums = [0.0, 0.0]  # loss x examples, examples (this worker's shard)
        t0 = time.perf_counter()
        for i in range(step_in_epoch, steps_per_epoch):
            idx = distributed.shard(order[i * cfg.batch_size : (i + 1) * cfg.batch_size], ctx)
            xb, yb = (t.to(ctx.device, non_blocking=True) for t in train.take(idx))
            loss = loss_fn(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums[0] += float(loss.detach()) * len(idx)
            sums[1] += len(idx)
            step_in_epoch = i + 1
            hist.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums[0] / max(sums[1], 1):.4g}")
            if cfg.checkpoint_every and hist.steps % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                hist.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint()
        bar.close()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        hist.seconds += time.perf_counter() - t0
        loss_sum, seen = distributed.all_sum(sums, ctx)
        hist.samples += int(seen)
        figures = evaluate(model)
        epoch, step_in_epoch = epoch + 1, 0
        hist.epochs.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1), **figures})
        if ctx.main and (epoch % max(1, cfg.epochs // 20) == 0 or epoch == cfg.epochs):
            shown = "  ".join(f"{k} {v:.4g}" for k, v in hist.epochs[-1].items() if k != "epoch")
            log(f"epoch {epoch:3d}/{cfg.epochs}  {shown}  ({hist.seconds:.1f} s)")
        checkpoint()
    distributed.barrier(ctx)
    model.eval()
    return hist


def plot_history(hist: History, path: Path, title: str, keys: list[str] | None = None) -> Path:
    """Training loss and each test figure against epochs, one panel per figure."""
    plt = pyplot()
    keys = keys or [k for k in hist.epochs[0] if k != "epoch"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    ep = [h["epoch"] for h in hist.epochs]
    for ax, k in zip(axes[0], keys, strict=True):
        ax.plot(ep, [h[k] for h in hist.epochs], "o-" if len(ep) < 40 else "-")
        ax.set_xlabel("epoch")
        ax.set_title(k.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save(fig, path)
