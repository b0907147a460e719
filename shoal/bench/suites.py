"""The benchmark suites behind ``shoal bench``. Each returns a flat dict of figures."""

from __future__ import annotations

import asyncio
import os
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench.loadgen import LoadGenerator, LoadResult, http_request
from shoal.local import LocalCluster
from shoal.protocol.oip import build_infer_request
from shoal.worker.cli import bundled_repo

BENCH_CPU_GATEWAY = 0  # the core the measured server side is pinned to, where pinning is asked for
BENCH_CPU_CLIENT = 1


def _pin_self(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {cpu})


def _unpin_self() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def _two_cores() -> bool:
    return hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2


def _infer_request(lc: LocalCluster, model: str, inputs: dict[str, np.ndarray]) -> bytes:
    body, hl = build_infer_request(inputs)
    headers = {"Authorization": f"Bearer {lc.api_key}", "Content-Type": "application/octet-stream"}
    if hl is not None:
        headers["Inference-Header-Content-Length"] = str(hl)
    return http_request(f"/v2/models/{model}/infer", body, headers)


def _load(
    lc: LocalCluster,
    req: bytes,
    connections: int,
    seconds: float | None = None,
    total: int | None = None,
    warmup: int = 0,
) -> LoadResult:
    gen = LoadGenerator(
        "127.0.0.1", lc.http_port, lambda i: req, connections, total=total, duration_s=seconds, warmup=warmup
    )
    res = asyncio.run(gen.run())
    bad = {k: v for k, v in res.statuses.items() if k != 200}
    if bad or res.errors:
        raise RuntimeError(f"benchmark requests failed: {bad} {res.errors[:3]}")
    return res


def _mnist_input() -> np.ndarray:
    from shoal.data.mnist import load_mnist

    images, _ = load_mnist("test")
    return ((images[:1].astype(np.float32) / 255.0 - 0.1307) / 0.3081).reshape(1, 1, 28, 28)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


# ------------------------------------------------------------------------------------ suites


def latency(workdir: Path, args: Namespace) -> dict[str, Any]:
    """One connection, one request at a time: gateway + worker against the model called in-process."""
    import onnxruntime as ort

    from shoal.modelrepo.manifest import resolve

    model_dir, manifest = resolve(bundled_repo(), "mnist-cnn")
    x = _mnist_input()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_dir / manifest.file), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    n = 3000
    for _ in range(200):
        sess.run(None, {name: x})
    inproc = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, {name: x})
        inproc.append(time.perf_counter() - t)
    out: dict[str, Any] = {}
    with LocalCluster(workdir) as lc:
        lc.start()
        lc.add_worker("mnist-cnn", extra=["--batch-delay-ms", "0"])
        lc.add_worker("echo")
        lc.wait_workers("mnist-cnn", 1)
        lc.wait_workers("echo", 1)
        res = _load(lc, _infer_request(lc, "mnist-cnn", {"image": x}), 1, total=n + 200, warmup=200)
        echo = _load(
            lc, _infer_request(lc, "echo", {"x": np.zeros((1, 16), np.float32)}), 1, total=n + 200, warmup=200
        )
    p50_in, p99_in = _percentiles(inproc)
    p50_gw, p99_gw = _percentiles(res.latencies_s)
    p50_e, p99_e = _percentiles(echo.latencies_s)
    out["mnist-cnn in-process p50/p99 ms"] = f"{p50_in:.3f} / {p99_in:.3f}"
    out["mnist-cnn via gateway p50/p99 ms"] = f"{p50_gw:.3f} / {p99_gw:.3f}"
    out["added by serving path p50 ms"] = round(p50_gw - p50_in, 3)
    out["echo via gateway p50/p99 ms"] = f"{p50_e:.3f} / {p99_e:.3f}"
    out["requests each"] = n
    return out


def throughput(workdir: Path, args: Namespace) -> dict[str, Any]:
    """Trivial model, 64 keep-alive clients; gateway and worker share ONE core, clients on the other."""
    pinned = _two_cores()
    cpu = BENCH_CPU_GATEWAY if pinned else None
    with LocalCluster(workdir) as lc:
        lc.start(cpu=cpu)
        lc.add_worker("echo", cpu=cpu)
        lc.wait_workers("echo", 1)
        if pinned:
            _pin_self(BENCH_CPU_CLIENT)
        try:
            req = _infer_request(lc, "echo", {"x": np.zeros((1, 16), np.float32)})
            _load(lc, req, args.connections, seconds=1.0)
            res = _load(lc, req, args.connections, seconds=args.seconds)
        finally:
            _unpin_self()
    p50, p99 = _percentiles(res.latencies_s)
    return {
        "requests/s (HTTP, 64 clients)": round(res.rps),
        "p50/p99 ms": f"{p50:.2f} / {p99:.2f}",
        "gateway+worker pinned to one core": pinned,
        "requests": res.count,
    }


def link(workdir: Path, args: Namespace) -> dict[str, Any]:
    """The worker link alone: a real gateway pool in this process, one echo worker, 64 in flight."""
    return asyncio.run(_link(workdir, args))


async def _link(workdir: Path, args: Namespace) -> dict[str, Any]:
    import secrets

    from shoal.gateway.pool import Pending
    from shoal.gateway.server import Gateway, GatewayConfig
    from shoal.protocol.tensors import pack_tensors

    secret = secrets.token_hex(8)
    gw = Gateway(
        GatewayConfig(http_port=0, worker_port=0, secret=secret.encode(), no_auth=True, max_queue=100_000)
    )
    await gw.start()
    lc = LocalCluster(workdir, secret=secret)
    lc.worker_port = gw.worker_port
    pinned = _two_cores()
    if pinned:
        _pin_self(BENCH_CPU_GATEWAY)
    lc.add_worker("echo", cpu=BENCH_CPU_GATEWAY if pinned else None, extra=["--capacity", "512"])
    try:
        while not gw.models.models.get("echo"):
            await asyncio.sleep(0.02)
        pool = gw.models.find("echo", None)
        while not pool.ready:
            await asyncio.sleep(0.02)
        specs, bufs = pack_tensors({"x": np.zeros((1, 16), np.float32)})
        loop = asyncio.get_running_loop()
        window = args.connections
        ids = iter(range(1, 10**9))

        async def client(deadline: float, lat: list[float]) -> int:
            n = 0
            while time.perf_counter() < deadline:
                i = next(ids)
                t = time.perf_counter()
                p = Pending(
                    i, {"id": i, "inputs": specs}, bufs, loop.create_future(), deadline=time.monotonic() + 30
                )
                pool.submit(p)
                await p.future
                lat.append(time.perf_counter() - t)
                n += 1
            return n

        await asyncio.gather(*(client(time.perf_counter() + 1.0, []) for _ in range(window)))
        lat: list[float] = []
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(client(t0 + args.seconds, lat) for _ in range(window)))
        elapsed = time.perf_counter() - t0
    finally:
        _unpin_self()
        lc.stop()
        await gw.stop()
    p50, p99 = _percentiles(lat)
    return {
        "requests/s (worker link, 64 in flight)": round(sum(counts) / elapsed),
        "p50/p99 ms": f"{p50:.2f} / {p99:.2f}",
        "gateway pool+worker pinned to one core": pinned,
    }


def batching(workdir: Path, args: Namespace) -> dict[str, Any]:
    """MNIST CNN at saturation through the cluster against the model's own batched speed."""
    import onnxruntime as ort

    from shoal.modelrepo.manifest import resolve

    model_dir, manifest = resolve(bundled_repo(), "mnist-cnn")
    mb = manifest.max_batch_size or 64
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_dir / manifest.file), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    xb = np.repeat(_mnist_input(), mb, axis=0)
    for _ in range(5):
        sess.run(None, {name: xb})
    t = time.perf_counter()
    n = 0
    while time.perf_counter() - t < max(3.0, args.seconds / 2):
        sess.run(None, {name: xb})
        n += mb
    own = n / (time.perf_counter() - t)
    pinned = _two_cores()
    with LocalCluster(workdir) as lc:
        lc.start(cpu=BENCH_CPU_CLIENT if pinned else None)
        lc.add_worker(
            "mnist-cnn", cpu=BENCH_CPU_GATEWAY if pinned else None, extra=["--capacity", str(4 * mb)]
        )
        lc.wait_workers("mnist-cnn", 1)
        if pinned:
            _pin_self(BENCH_CPU_CLIENT)
        try:
            req = _infer_request(lc, "mnist-cnn", {"image": _mnist_input()})
            _load(lc, req, 4 * mb, seconds=1.0)
            res = _load(lc, req, 4 * mb, seconds=args.seconds)
            st = lc.status()
        finally:
            _unpin_self()
    w = st["models"][0]["workers"][0]["load"]
    mean_batch = w["rows"] / max(1, w["batches"])
    return {
        "model batched in-process, images/s": round(own),
        "through the cluster, images/s": round(res.rps),
        "ratio": round(res.rps / own, 3),
        "mean batch size": round(mean_batch, 1),
        "max batch size": mb,
        "worker pinned to its own core": pinned,
    }


def transfer(workdir: Path, args: Namespace) -> dict[str, Any]:
    """3 MB requests (binary tensor extension) into a gateway; the model answers with a checksum."""
    size = 3 * 1024 * 1024
    data = np.random.default_rng(0).integers(0, 256, (1, size), dtype=np.uint8)
    with LocalCluster(workdir) as lc:
        lc.start()
        for _ in range(2):
            lc.add_worker("checksum")
        lc.wait_workers("checksum", 2)
        with lc.client() as c:
            got = int(c.infer("checksum", {"data": data})["sum"][0])
        if got != int(data.sum(dtype=np.uint64)):
            raise RuntimeError("checksum mismatch: payload corrupted in transit")
        req = _infer_request(lc, "checksum", {"data": data})
        _load(lc, req, 8, total=16)
        res = _load(lc, req, 8, seconds=args.seconds)
    p50, p99 = _percentiles(res.latencies_s)
    return {
        "MB/s (3 MB requests, 8 clients)": round(res.count * size / 1e6 / res.elapsed_s, 1),
        "requests/s": round(res.rps, 1),
        "p50/p99 ms": f"{p50:.1f} / {p99:.1f}",
    }
