"""Paper 002, chapter 9: pi computed by a cluster of workers, the smallest example of work split
over machines.

    shoal train pi                      # one process
    shoal train pi --nproc 2            # two workers on this machine (torch.distributed, gloo)
    shoal train pi --nnodes 2 --nproc 4 --rdzv HOST:PORT    # on each of two machines

pi is the integral of 4 / (1 + x^2) over [0, 1]. The interval is cut into ``intervals`` pieces; worker
r of w takes pieces r, r + w, r + 2w, ... and sums the midpoint rule over them; one all-reduce adds
the workers' sums. Each worker reports its share and its time; the result and its error are
printed by rank 0. Nothing is exported: the answer is a number.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from shoal.train import distributed
from shoal.train.catalogue import Outcome, Run, Trained
from shoal.train.loop import start


@dataclass
class Config:
    data: str = "integral"  # the midpoint rule on 4 / (1 + x^2) (the only choice)
    intervals: int = 50_000_000  # pieces of [0, 1], shared among the workers
    chunk: int = 2_000_000  # pieces summed at once (bounds each worker's memory)


def partial_sum(intervals: int, rank: int, world: int, chunk: int) -> float:
    """This worker's part of the midpoint rule: pieces rank, rank + world, ..., in float64."""
    h = 1.0 / intervals
    total = 0.0
    step = chunk * world
    for first in range(rank, intervals, step):
        i = torch.arange(first, min(first + step, intervals), world, dtype=torch.float64)
        x = (i + 0.5) * h
        total += float((4.0 / (1.0 + x * x)).sum()) * h
    return total


def train(cfg: Config, run: Run, log=print) -> Trained:  # noqa: ANN001
    if cfg.intervals < 1 or cfg.chunk < 1:
        raise ValueError("pi: --intervals and --chunk must be positive")
    ctx = start(run, 0)
    distributed.barrier(ctx)
    t0 = time.perf_counter()
    mine = partial_sum(cfg.intervals, ctx.rank, ctx.world, cfg.chunk)
    own_seconds = time.perf_counter() - t0
    print(f"worker {ctx.rank} of {ctx.world}: partial sum {mine:.12f} in {own_seconds:.2f} s", flush=True)
    (pi,) = distributed.all_sum([mine], ctx)
    seconds = time.perf_counter() - t0
    error = abs(pi - math.pi)
    if ctx.main:
        log(f"pi = {pi:.15f} from {cfg.intervals:,} intervals on {ctx.world} worker(s): error {error:.2e}, {seconds:.2f} s")
    outcome = Outcome(
        family="pi",
        data=cfg.data,
        model=f"pi-{ctx.world}-workers",
        dataset=f"midpoint rule, {cfg.intervals:,} intervals",
        metric="absolute error",
        value=error,
        details={
            "pi": pi,
            "workers": ctx.world,
            "intervals_per_s": round(cfg.intervals / seconds, 1),
        },
        seconds=seconds,
        device=distributed.describe(ctx, run.threads),
    )
    distributed.close(ctx)
    return Trained(outcome, None)
