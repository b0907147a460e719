"""The ``serving-cost`` suite: what serving costs per request where the model is fast, the figures
issue 26 set targets for, each measured as a user would meet them: gateway and workers pinned to ONE
core, 64 keep-alive connections from the other.

Per workload (the trivial model with JSON tensors and with binary ones; the MNIST CNN with binary
images), requests per second and the CPU time per request of the gateway and of the worker (from
``/proc/<pid>/stat`` around the measured seconds); for the CNN, also the model's own batched CPU
time per image in process (batch 32, one thread, same core), so that what serving adds to a request
is that difference. And one connection's p50 on the trivial model.

With ``--baseline DIR`` (a git worktree of an older commit) that tree's gateway and workers are
measured too, in ABBA order (this, baseline, baseline, this, ...), so both see the same minutes of
the machine; each figure is the median of its tree's runs, and ratios are of medians.

Then a sweep of the trivial model over 1 to 64 connections (each tree once): what a request costs the
gateway at the rate it is offered, since an event-loop turn's fixed costs are shared by the requests
it handles. A plot of both (``serving-cost.png`` in the suite's folder).
"""

from __future__ import annotations

import statistics
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench.loadgen import http_request
from shoal.bench.process import (
    CPU_CLIENT,
    CPU_SERVER,
    cpu_seconds,
    percentiles,
    pin_self,
    two_cores,
    unpin_self,
)
from shoal.bench.serving import infer_request, mnist_input, run_load
from shoal.bundled import bundled_repo
from shoal.local import LocalCluster

CONNECTIONS = 64
ONE_CONNECTION = 2000  # requests at one connection, for the p50
WORKLOADS = ("echo JSON", "echo binary", "mnist-cnn binary")
SWEEP = (1, 2, 4, 8, 16, 64)  # connections


def _json_request(lc: LocalCluster, x: np.ndarray) -> bytes:
    import orjson

    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    )
    headers = {"Authorization": f"Bearer {lc.api_key}", "Content-Type": "application/json"}
    return http_request("/v2/models/echo/infer", body, headers)


def measure(workdir: Path, seconds: float, source: Path | None = None) -> dict[str, dict[str, float]]:
    """One run of one tree: per workload, requests/s and gateway and worker CPU µs per request;
    ``one connection`` its p50 (ms)."""
    pinned = two_cores()
    cpu = CPU_SERVER if pinned else None
    out: dict[str, dict[str, float]] = {}
    lc = LocalCluster(workdir, name="cost", source=source).start(cpu=cpu)
    try:
        echo = lc.add_worker("echo", cpu=cpu)
        cnn = lc.add_worker("mnist-cnn", cpu=cpu)
        lc.wait_workers("echo", 1)
        lc.wait_workers("mnist-cnn", 1)
        x = np.zeros((1, 16), np.float32)
        requests = {
            "echo JSON": (_json_request(lc, x), echo.pid),
            "echo binary": (infer_request(lc, "echo", {"x": x}), echo.pid),
            "mnist-cnn binary": (infer_request(lc, "mnist-cnn", {"image": mnist_input()}), cnn.pid),
        }
        gw = lc.gateway_pids[0]
        if pinned:
            pin_self(CPU_CLIENT)
        try:
            for name, (req, worker) in requests.items():
                run_load(lc, req, CONNECTIONS, seconds=1.0)  # warm: connections, caches, batch sizes
                g0, w0 = cpu_seconds(gw), cpu_seconds(worker)
                res = run_load(lc, req, CONNECTIONS, seconds=seconds)
                g1, w1 = cpu_seconds(gw), cpu_seconds(worker)
                n = max(1, res.count)
                out[name] = {
                    "rps": res.steady_rps(),
                    "gateway_us": (g1 - g0) / n * 1e6,
                    "worker_us": (w1 - w0) / n * 1e6,
                }
            one = run_load(lc, requests["echo JSON"][0], 1, total=ONE_CONNECTION + 200, warmup=200)
            out["one connection"] = {"p50_ms": percentiles(one.latencies_s)[0]}
        finally:
            unpin_self()
    finally:
        lc.stop()
    return out


def sweep(workdir: Path, source: Path | None = None) -> list[dict[str, float]]:
    """The trivial model (binary) at each number of connections in ``SWEEP``: requests/s and the
    gateway's and the worker's CPU µs per request."""
    pinned = two_cores()
    cpu = CPU_SERVER if pinned else None
    rows = []
    lc = LocalCluster(workdir, name="sweep", source=source).start(cpu=cpu)
    try:
        echo = lc.add_worker("echo", cpu=cpu)
        lc.wait_workers("echo", 1)
        req = infer_request(lc, "echo", {"x": np.zeros((1, 16), np.float32)})
        gw = lc.gateway_pids[0]
        if pinned:
            pin_self(CPU_CLIENT)
        try:
            for n in SWEEP:
                run_load(lc, req, n, seconds=0.5)
                g0, w0 = cpu_seconds(gw), cpu_seconds(echo.pid)
                res = run_load(lc, req, n, seconds=2.0)
                g1, w1 = cpu_seconds(gw), cpu_seconds(echo.pid)
                k = max(1, res.count)
                rows.append(
                    {"connections": n, "rps": res.rps, "gateway_us": (g1 - g0) / k * 1e6, "worker_us": (w1 - w0) / k * 1e6}
                )
        finally:
            unpin_self()
    finally:
        lc.stop()
    return rows


def plot(path: Path, medians: dict[str, dict[str, dict[str, float]]], sweeps: dict[str, list[dict[str, float]]],
         names: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sides = list(medians)
    width = 0.8 / len(sides)
    for k, side in enumerate(sides):
        xs = np.arange(len(WORKLOADS)) + k * width
        g = [medians[side][w]["gateway_us"] for w in WORKLOADS]
        wk = [medians[side][w]["worker_us"] for w in WORKLOADS]
        left.bar(xs, g, width, label=f"{names[side]}: gateway", color=f"C{2 * k}")
        left.bar(xs, wk, width, bottom=g, label=f"{names[side]}: worker", color=f"C{2 * k + 1}")
    left.set_xticks(np.arange(len(WORKLOADS)) + width * (len(sides) - 1) / 2, WORKLOADS)
    left.set_ylabel("CPU µs per request (64 connections, one core)")
    left.legend(fontsize=8)
    left.set_title("serving CPU per request (the CNN's bar holds its model too)", fontsize=9)
    for k, side in enumerate(sweeps):
        rows = sweeps[side]
        right.plot([r["connections"] for r in rows], [r["gateway_us"] for r in rows], "o-", color=f"C{2 * k}",
                   label=names[side])
    right.set_xscale("log", base=2)
    right.set_xlabel("connections")
    right.set_ylabel("gateway CPU µs per request")
    right.set_title("the trivial model: a request's cost at the rate offered", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_cpu_per_image_us(batch: int = 32, seconds: float = 2.0) -> float:
    """The MNIST CNN's own CPU time per image, batched in process (one thread, the server's core)."""
    import onnxruntime as ort

    from shoal.modelrepo.manifest import resolve

    model_dir, manifest = resolve(bundled_repo(), "mnist-cnn")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_dir / manifest.file), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    xb = np.repeat(mnist_input(), batch, axis=0)
    if two_cores():
        pin_self(CPU_SERVER)
    try:
        for _ in range(5):
            sess.run(None, {name: xb})
        t, c, n = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - t < seconds:
            sess.run(None, {name: xb})
            n += batch
        return (time.process_time() - c) / n * 1e6
    finally:
        unpin_self()


def serving_cost(workdir: Path, args: Namespace) -> dict[str, Any]:
    baseline = Path(args.baseline).resolve() if getattr(args, "baseline", None) else None
    seconds = max(2.0, args.seconds / 3)
    order = ["this", "baseline", "baseline", "this"] * 2 if baseline is not None else ["this"] * 3
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"this": [], "baseline": []}
    model_us: list[float] = []
    for i, side in enumerate(order):
        runs[side].append(measure(workdir / f"{side}-{i}", seconds, baseline if side == "baseline" else None))
        if i % 2 == 0:
            model_us.append(model_cpu_per_image_us())
    per_image = statistics.median(model_us)
    out: dict[str, Any] = {"MNIST CNN alone, CPU us per image (batch 32, median)": round(per_image, 1)}
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for side, rs in runs.items():
        if not rs:
            continue
        label = "this tree" if side == "this" else baseline.name  # type: ignore[union-attr]
        m = medians[side] = {
            w: {k: statistics.median(r[w][k] for r in rs) for k in rs[0][w]} for w in (*WORKLOADS, "one connection")
        }
        for w in WORKLOADS:
            total = m[w]["gateway_us"] + m[w]["worker_us"]
            added = f", serving adds {total - per_image:.0f}" if w.startswith("mnist") else ""
            out[f"{label}: {w}: requests/s; CPU us/request gateway + worker = total"] = (
                f"{m[w]['rps']:.0f}; {m[w]['gateway_us']:.1f} + {m[w]['worker_us']:.1f} = {total:.1f}{added}"
            )
        out[f"{label}: binary / JSON requests/s (echo)"] = round(m["echo binary"]["rps"] / m["echo JSON"]["rps"], 3)
        out[f"{label}: one connection p50 ms (echo JSON)"] = round(m["one connection"]["p50_ms"], 3)
    if baseline is not None:
        this, base = medians["this"], medians["baseline"]
        for w in WORKLOADS:
            out[f"this / {baseline.name}: {w}: requests/s, CPU per request"] = (
                f"{this[w]['rps'] / base[w]['rps']:.3f}, "
                f"{(this[w]['gateway_us'] + this[w]['worker_us']) / (base[w]['gateway_us'] + base[w]['worker_us']):.3f}"
            )
    names = {"this": "this tree", "baseline": baseline.name if baseline is not None else ""}
    sweeps = {"this": sweep(workdir / "sweep-this")}
    if baseline is not None:
        sweeps["baseline"] = sweep(workdir / "sweep-baseline", baseline)
    for side, rows in sweeps.items():
        out[f"{names[side]}: gateway CPU us/request at 1/2/4/8/16/64 connections (echo binary)"] = " / ".join(
            f"{r['gateway_us']:.0f}" for r in rows
        )
        out[f"{names[side]}: requests/s at the same"] = " / ".join(f"{r['rps']:.0f}" for r in rows)
    png = workdir / "serving-cost.png"
    plot(png, medians, sweeps, names)
    out["plot"] = str(png)
    out["runs"] = f"{len(order)} ({'ABBA' if baseline else 'this tree only'}), {seconds:.0f} s per workload"
    out["pinned: servers on one core, clients on the other"] = two_cores()
    return out
