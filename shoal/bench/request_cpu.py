"""The ``request-cpu`` suite: what one inference request costs the gateway and the worker in CPU
time, the figure that contention on a shared machine disturbs least (requests per second swing with
whatever else runs; CPU time per request much less). A gateway and an echo worker, small JSON
requests over 16 keep-alive connections, CPU from ``/proc/<pid>/stat`` around the measured requests.

With ``--baseline DIR`` the gateway and worker of that shoal source tree (a git worktree of an older
commit) are measured too, six runs of each in ABBA order, so both see the same machine and minutes:
how the request path's cost changed (the per-model statistics of issue 24 were measured this way).
"""

from __future__ import annotations

import asyncio
import json
import statistics
from argparse import Namespace
from pathlib import Path
from typing import Any

from shoal.bench.loadgen import LoadGenerator, http_request
from shoal.bench.process import cpu_seconds, percentiles
from shoal.local import LocalCluster

CONNECTIONS = 16
WARMUP = 3000


def measure(workdir: Path, requests: int, source: Path | None = None) -> dict[str, float]:
    """Gateway and worker CPU microseconds per request, and requests per second, of one run."""
    lc = LocalCluster(workdir, name="cpu", source=source).start()
    try:
        lc.add_worker("echo")
        lc.wait_workers("echo", 1)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        headers = {"Authorization": f"Bearer {lc.api_key}", "Content-Type": "application/json"}
        req = http_request("/v2/models/echo/infer", json.dumps(body).encode(), headers)
        asyncio.run(LoadGenerator("127.0.0.1", lc.http_port, lambda i: req, CONNECTIONS, total=WARMUP).run())
        gw, wk = lc.gateway_pids[0], lc.workers[0].pid
        g0, w0 = cpu_seconds(gw), cpu_seconds(wk)
        r = asyncio.run(LoadGenerator("127.0.0.1", lc.http_port, lambda i: req, CONNECTIONS, total=requests).run())
        g1, w1 = cpu_seconds(gw), cpu_seconds(wk)
        ok = r.statuses.get(200, 0)
        if ok != requests:
            raise RuntimeError(f"{requests - ok} of {requests} requests failed: {r.statuses} {r.errors[:3]}")
        return {
            "gateway_us": (g1 - g0) / ok * 1e6,
            "worker_us": (w1 - w0) / ok * 1e6,
            "rps": ok / max(1e-9, r.ended - r.started) if r.ended else 0.0,
            "p99_ms": percentiles(r.latencies_s)[1] if r.latencies_s else 0.0,
        }
    finally:
        lc.stop()


def request_cpu(workdir: Path, args: Namespace) -> dict[str, Any]:
    baseline = Path(args.baseline).resolve() if getattr(args, "baseline", None) else None
    requests = 30_000
    runs: dict[str, list[dict[str, float]]] = {"this": [], "baseline": []}
    # With a baseline: six runs of each in ABBA order (this, baseline, baseline, this, ...), so that
    # a machine drifting during the suite weighs on both trees alike.
    order = ["this", "baseline", "baseline", "this"] * 3 if baseline is not None else ["this"] * 3
    for i, side in enumerate(order):
        source = baseline if side == "baseline" else None
        runs[side].append(measure(workdir / f"{side}-{i}", requests, source))
    out: dict[str, Any] = {}
    for side, rs in runs.items():
        if not rs:
            continue
        name = "this tree" if side == "this" else baseline.name  # type: ignore[union-attr]
        g = [r["gateway_us"] for r in rs]
        w = [r["worker_us"] for r in rs]
        out[f"{name}: gateway CPU us/request, median (runs)"] = (
            f"{statistics.median(g):.1f} ({' / '.join(f'{x:.0f}' for x in g)})"
        )
        out[f"{name}: worker CPU us/request, median (runs)"] = (
            f"{statistics.median(w):.1f} ({' / '.join(f'{x:.0f}' for x in w)})"
        )
        rps, p99 = [r["rps"] for r in rs], [r["p99_ms"] for r in rs]
        out[f"{name}: requests/s and p99 ms, medians"] = f"{statistics.median(rps):.0f} / {statistics.median(p99):.1f}"
    out["requests per run"] = requests
    out.update(stats_cost())
    return out


def stats_cost() -> dict[str, str]:
    """What the gateway's per-model statistics add to a request, in process: the minimum over many
    repeats (the least disturbed by other processes), less an empty call's."""
    import timeit

    from shoal.gateway.stats import ModelStats

    def best(f: Any) -> float:
        return min(timeit.repeat(f, number=20_000, repeat=25)) / 20_000 * 1e6

    s = ModelStats()
    empty = best(lambda: None)
    result = best(lambda: s.result(1, 0.0001, 8, 0.25, 0.05, 0.01, 0.005)) - empty
    response = best(lambda: s.response(True, 0.001)) - empty
    return {"statistics per request, in process": f"{result:.2f} us (a result) + {response:.2f} us (the answer)"}
