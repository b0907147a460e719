"""The storage suite: the throughput run with result storage off and on."""

from __future__ import annotations

import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench.process import (
    CPU_CLIENT,
    CPU_SERVER,
    cpu_seconds,
    percentiles,
    pin_self,
    two_cores,
    unpin_self,
)
from shoal.bench.serving import infer_request, run_load
from shoal.local import LocalCluster


def _metric(lc: LocalCluster, name: str) -> float | None:
    with lc.client(5.0) as c:
        _, _, text = c.request("GET", "/metrics")
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def storage(workdir: Path, args: Namespace) -> dict[str, Any]:
    """The throughput run with result storage off and on (SQLite, files in the work folder),
    alternating twice; gateway CPU per request from /proc, and the latency at one connection."""
    pinned = two_cores()
    cpu = CPU_SERVER if pinned else None
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    stored = dropped = 0.0
    for i in range(2):
        for on in (False, True):
            d = workdir / f"{'on' if on else 'off'}-{i}"
            store = ["--store-results", f"sqlite:///{d / 'results.db'}", "--results-dir", str(d / "results")]
            with LocalCluster(d, gateway_args=store if on else []) as lc:
                lc.start(cpu=cpu)
                lc.add_worker("echo", cpu=cpu)
                lc.wait_workers("echo", 1)
                assert lc.gateway is not None
                req = infer_request(lc, "echo", {"x": np.zeros((1, 16), np.float32)})
                if pinned:
                    pin_self(CPU_CLIENT)
                try:
                    run_load(lc, req, args.connections, seconds=1.0)
                    c0 = cpu_seconds(lc.gateway.pid)
                    res = run_load(lc, req, args.connections, seconds=args.seconds)
                    c1 = cpu_seconds(lc.gateway.pid)
                    one = run_load(lc, req, 1, total=2200, warmup=200)
                finally:
                    unpin_self()
                if on:
                    time.sleep(0.5)  # the last batch
                    stored += _metric(lc, "shoal_results_stored_total") or 0.0
                    dropped += _metric(lc, "shoal_results_dropped_total") or 0.0
            runs[on].append(
                {
                    "rps": res.rps,
                    "cpu_us": (c1 - c0) / max(1, res.count) * 1e6,
                    "p50_1": percentiles(one.latencies_s)[0],
                }
            )

    def fig(on: bool, key: str, fmt: str) -> str:
        return " / ".join(format(r[key], fmt) for r in runs[on])

    off_cpu = sum(r["cpu_us"] for r in runs[False]) / 2
    on_cpu = sum(r["cpu_us"] for r in runs[True]) / 2
    return {
        "requests/s, storage off (two runs)": fig(False, "rps", ".0f"),
        "requests/s, storage on (two runs)": fig(True, "rps", ".0f"),
        "gateway CPU us/request, off": fig(False, "cpu_us", ".1f"),
        "gateway CPU us/request, on": fig(True, "cpu_us", ".1f"),
        "storage CPU us/request (mean on - off)": round(on_cpu - off_cpu, 1),
        "p50 ms at one connection, off": fig(False, "p50_1", ".3f"),
        "p50 ms at one connection, on": fig(True, "p50_1", ".3f"),
        "stored / dropped (storage on)": f"{stored:.0f} / {dropped:.0f}",
        "gateway+worker pinned to one core": pinned,
    }
