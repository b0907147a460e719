"""Data-parallel training across processes and machines on ``torch.distributed``.

``shoal train FAMILY --nproc N`` starts the same command again as N worker processes through torch's
elastic launcher (``torch.distributed.launcher``, what ``torchrun`` runs): an elastic agent per
machine, a c10d rendezvous where the agents meet, workers numbered 0..world-1, and, when a worker
dies, every worker of the group stopped and started again (up to ``--max-restarts`` times), each one
resuming from the last checkpoint. Several machines: run the same command on each with
``--nnodes M --rdzv HOST:PORT`` (the rendezvous address of one of them; ``--nnodes MIN:MAX`` lets
machines join and leave).

A worker finds its place in the environment the launcher sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``, ``TORCHELASTIC_RESTART_COUNT``), so running a
``shoal train`` command under ``torchrun`` directly works the same way. Gradients are averaged by
``DistributedDataParallel`` over gloo on CPUs and NCCL on GPUs. Rank 0 alone writes checkpoints,
logs, plots and the export.

On one machine (no ``--rdzv``) everything stays on loopback: the rendezvous store listens on
127.0.0.1 on a free port, the workers' address is 127.0.0.1 and gloo is bound to the loopback
interface.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from shoal.devices import torch_device


@dataclass(frozen=True)
class Context:
    """Where this process stands in a (possibly one-process) training run."""

    rank: int
    world: int
    local_rank: int
    restart: int  # how many times the elastic agent has restarted the worker group
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def context(device: str = "cpu") -> Context:
    """This process's rank and device; joins the process group when started by the launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dev = torch_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local)  # one GPU per local worker
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # The agent keeps one store across restarts: the workers of a restarted group would read
            # the addresses their dead predecessors left there. Each attempt gets its own keys.
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False
            )
            prefixed = dist.PrefixStore(f"shoal/attempt_{restart}", store)
            dist.init_process_group(backend=backend, store=prefixed, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend=backend)
    return Context(rank, world, local, restart, dev)


def describe(ctx: Context, threads: int) -> str:
    """What this run computes on, in words (printed at the start, kept in the provenance)."""
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        where = f"{ctx.device} ({p.name}, {p.total_memory / 2**30:.0f} GiB)"
    else:
        from shoal.devices import cpu_info

        where = f"cpu ({cpu_info()['model']}, {threads} thread{'s' if threads != 1 else ''})"
    if ctx.distributed:
        backend = dist.get_backend() if dist.is_initialized() else "?"
        where += f", {ctx.world} data-parallel workers over {backend}"
    return where


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The model as the training loop calls it: DistributedDataParallel when there are several workers."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def shard(batch: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This worker's part of a global batch of indices: every world-th one, starting at its rank. The
    global batch is the one a single process would take, so N workers average the same gradient."""
    return batch[ctx.rank :: ctx.world] if ctx.distributed else batch


def all_sum(values: list[float], ctx: Context) -> list[float]:
    """Element-wise sum over the workers (loss and accuracy counts of each worker's shard)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return [float(v) for v in t]


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def close(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def parse_nnodes(spec: str) -> tuple[int, int]:
    """``--nnodes``: ``N`` or ``MIN:MAX`` (an elastic range of machines)."""
    lo, _, hi = spec.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"--nnodes {spec!r}: give N or MIN:MAX") from None
    if not 1 <= a <= b:
        raise ValueError(f"--nnodes {spec!r}: need 1 <= MIN <= MAX")
    return a, b


def launch(
    argv: list[str],
    nproc: int,
    nnodes: str = "1",
    rdzv: str = "",
    max_restarts: int = 3,
    run_id: str = "",
) -> int:
    """Run ``python -m shoal ARGV`` as ``nproc`` workers on this machine under an elastic agent.
    Returns 0 when every worker finished, 1 when the group failed after its restarts."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError("--nproc must be at least 1")
    lo, hi = parse_nnodes(nnodes)
    local = not rdzv
    if local and hi > 1:
        raise ValueError("several machines need --rdzv HOST:PORT (where their agents meet)")
    if local:
        # Loopback only: the store on a free port of 127.0.0.1, workers told 127.0.0.1, gloo on lo.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    config = LaunchConfig(
        min_nodes=lo,
        max_nodes=hi,
        nproc_per_node=nproc,
        run_id=run_id or (uuid.uuid4().hex[:12] if local else "shoal"),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0" if local else rdzv,
        rdzv_configs={"is_host": True} if local else {},
        max_restarts=max_restarts,
        monitor_interval=0.2,
        start_method="spawn",
        local_addr="127.0.0.1" if local else None,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "shoal", *argv)
    except ChildFailedError as e:
        print(f"shoal train: distributed run failed after {max_restarts} restart(s):\n{e}", file=sys.stderr)
        return 1
    return 0
