"""The ``profile`` suite: where each microsecond of a request goes, in the gateway and in the worker
separately. The throughput load (echo, or the MNIST CNN with ``--profile-model mnist-cnn``; 64 keep-alive connections, gateway and worker on one core, the
load generator on the other) runs while py-spy samples each process; the samples are summed per
function (self time: the function's own lines and the C calls they make) and scaled by each process's
CPU time per request, so each row reads as microseconds of one request. Needs py-spy (shoal[dev]).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from argparse import Namespace
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench.process import CPU_CLIENT, CPU_SERVER, cpu_seconds, pin_self, two_cores, unpin_self
from shoal.bench.serving import infer_request, mnist_input, run_load
from shoal.local import LocalCluster

RATE_HZ = 250
TOP = 15
_FRAME = re.compile(r"(.*) \((.*?):\d+\)$")


def self_time(raw: str) -> tuple[Counter[str], int]:
    """Samples per function from py-spy's raw (collapsed) output, by the innermost frame, and the
    total number of samples."""
    per: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        leaf = stack.rsplit(";", 1)[-1]
        m = _FRAME.match(leaf)
        per[f"{m.group(1)} ({Path(m.group(2)).name})" if m else leaf] += int(n)
    return per, total


def profile(workdir: Path, args: Namespace) -> dict[str, Any]:
    beside = Path(sys.executable).parent / "py-spy"  # installed in this environment
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy, or shoal[dev])"}
    pinned = two_cores()
    cpu = CPU_SERVER if pinned else None
    seconds = max(4.0, args.seconds)
    with LocalCluster(workdir) as lc:
        lc.start(cpu=cpu)
        model = getattr(args, "profile_model", "echo")
        worker = lc.add_worker(model, cpu=cpu)
        lc.wait_workers(model, 1)
        if model == "mnist-cnn":
            req = infer_request(lc, model, {"image": mnist_input()})
        else:
            req = infer_request(lc, "echo", {"x": np.zeros((1, 16), np.float32)})
        procs = {"gateway": lc.gateway.pid, "worker": worker.pid}
        if pinned:
            pin_self(CPU_CLIENT)
        try:
            run_load(lc, req, 64, seconds=2.0)
            c0 = {k: cpu_seconds(p) for k, p in procs.items()}
            spies = {
                k: subprocess.Popen(
                    [spy, "record", "-p", str(p), "-d", str(int(seconds)), "-r", str(RATE_HZ), "-f", "raw",
                     "-o", str(workdir / f"{k}.txt"), "--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for k, p in procs.items()
            }
            r = run_load(lc, req, 64, seconds=seconds)
            c1 = {k: cpu_seconds(p) for k, p in procs.items()}
            for s in spies.values():
                s.wait(timeout=60)
        finally:
            unpin_self()
    out: dict[str, Any] = {"requests/s under the profiler": round(r.rps)}
    for k in procs:
        us = (c1[k] - c0[k]) / max(1, r.count) * 1e6
        path = workdir / f"{k}.txt"
        if not path.exists():
            out[k] = "py-spy wrote nothing (is ptrace allowed?)"
            continue
        per, total = self_time(path.read_text())
        out[f"{k}: CPU us per request"] = round(us, 1)
        out[f"{k}: top functions, us per request (self time)"] = {
            name: round(us * n / total, 1) for name, n in per.most_common(TOP)
        }
    return out
