"""Suites that measure the serving path: one connection's latency against the model in-process,
throughput at many connections, the worker link alone, dynamic batching, large transfers, a
worker's start, many connections held at once, a pipeline. Each starts its own gateway and workers
as real processes and returns a flat dict of figures."""

from __future__ import annotations

import asyncio
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench.loadgen import LoadGenerator, LoadResult, http_request
from shoal.bench.process import (
    CPU_CLIENT,
    CPU_SERVER,
    cpu_seconds,
    percentiles,
    pin_self,
    rss_kb,
    two_cores,
    unpin_self,
)
from shoal.bundled import bundled_repo
from shoal.local import LocalCluster
from shoal.protocol.oip import build_infer_request


def infer_request(lc: LocalCluster, model: str, inputs: dict[str, np.ndarray]) -> bytes:
    """A whole HTTP request (bytes) inferring ``inputs`` on the cluster's model, with its key."""
    body, hl = build_infer_request(inputs)
    headers = {"Authorization": f"Bearer {lc.api_key}", "Content-Type": "application/octet-stream"}
    if hl is not None:
        headers["Inference-Header-Content-Length"] = str(hl)
    return http_request(f"/v2/models/{model}/infer", body, headers)


def run_load(
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


def mnist_input() -> np.ndarray:
    from shoal.data.mnist import load_mnist

    images, _ = load_mnist("test")
    return ((images[:1].astype(np.float32) / 255.0 - 0.1307) / 0.3081).reshape(1, 1, 28, 28)


# ------------------------------------------------------------------------------------ suites


def latency(workdir: Path, args: Namespace) -> dict[str, Any]:
    """One connection, one request at a time: gateway + worker against the model called in-process."""
    import onnxruntime as ort

    from shoal.modelrepo.manifest import resolve

    model_dir, manifest = resolve(bundled_repo(), "mnist-cnn")
    x = mnist_input()
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
        # Batching on, as served (max batch 32, a 3 ms window): an idle model must not wait it out.
        lc.add_worker("mnist-cnn", extra=["--max-batch-size", "32", "--batch-delay-ms", "3"])
        lc.add_worker("echo")
        lc.wait_workers("mnist-cnn", 1)
        lc.wait_workers("echo", 1)
        res = run_load(lc, infer_request(lc, "mnist-cnn", {"image": x}), 1, total=n + 200, warmup=200)
        echo = run_load(
            lc, infer_request(lc, "echo", {"x": np.zeros((1, 16), np.float32)}), 1, total=n + 200, warmup=200
        )
    p50_in, p99_in = percentiles(inproc)
    p50_gw, p99_gw = percentiles(res.latencies_s)
    p50_e, p99_e = percentiles(echo.latencies_s)
    out["mnist-cnn in-process p50/p99 ms"] = f"{p50_in:.3f} / {p99_in:.3f}"
    out["mnist-cnn via gateway p50/p99 ms"] = f"{p50_gw:.3f} / {p99_gw:.3f}"
    out["added by serving path p50 ms"] = round(p50_gw - p50_in, 3)
    out["echo via gateway p50/p99 ms"] = f"{p50_e:.3f} / {p99_e:.3f}"
    out["requests each"] = n
    return out


def throughput(workdir: Path, args: Namespace) -> dict[str, Any]:
    """Trivial model, 64 keep-alive clients; gateway and worker share ONE core, clients on the other."""
    pinned = two_cores()
    cpu = CPU_SERVER if pinned else None
    with LocalCluster(workdir) as lc:
        lc.start(cpu=cpu)
        lc.add_worker("echo", cpu=cpu)
        lc.wait_workers("echo", 1)
        if pinned:
            pin_self(CPU_CLIENT)
        try:
            req = infer_request(lc, "echo", {"x": np.zeros((1, 16), np.float32)})
            run_load(lc, req, args.connections, seconds=1.0)
            res = run_load(lc, req, args.connections, seconds=args.seconds)
        finally:
            unpin_self()
    p50, p99 = percentiles(res.latencies_s)
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
    from shoal.protocol.link_messages import Request
    from shoal.protocol.tensors import pack_tensors

    secret = secrets.token_hex(8)
    gw = Gateway(
        GatewayConfig(http_port=0, worker_port=0, secret=secret.encode(), no_auth=True, max_queue=100_000)
    )
    await gw.start()
    lc = LocalCluster(workdir, secret=secret)
    lc.worker_port = gw.worker_port
    pinned = two_cores()
    if pinned:
        pin_self(CPU_SERVER)
    lc.add_worker("echo", cpu=CPU_SERVER if pinned else None, extra=["--capacity", "512"])
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
                p = Pending.of(Request(i, specs), bufs, loop.create_future(), time.monotonic() + 30, 1)
                gw.dispatcher.submit(pool, p, time.monotonic())
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
        unpin_self()
        lc.stop()
        await gw.stop()
    p50, p99 = percentiles(lat)
    return {
        "requests/s (worker link, 64 in flight)": round(sum(counts) / elapsed),
        "p50/p99 ms": f"{p50:.2f} / {p99:.2f}",
        "gateway pool+worker pinned to one core": pinned,
    }


def batching(workdir: Path, args: Namespace) -> dict[str, Any]:
    """MNIST CNN at saturation through the cluster against the model's own batched speed in-process.

    The two are measured in alternating rounds on the same core (the worker's), so a change in
    whatever else the machine does affects both alike; the ratio is of the medians. The cluster's
    rate is its steady rate (``LoadResult.steady_rps``): a round's opening of 256 connections and
    its drain at the end are not the model's speed.
    """
    import onnxruntime as ort

    from shoal.modelrepo.manifest import resolve

    model_dir, manifest = resolve(bundled_repo(), "mnist-cnn")
    mb = manifest.max_batch_size or 64
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_dir / manifest.file), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    xb = np.repeat(mnist_input(), mb, axis=0)
    pinned = two_cores()
    rounds = 6  # alternating rounds per side; the ratio is of the medians
    round_s = max(1.5, args.seconds / 4)

    def own_speed() -> tuple[float, float]:
        """Images per second of wall time and per second of this process's CPU time."""
        if pinned:
            pin_self(CPU_SERVER)
        t = time.perf_counter()
        c = time.process_time()
        n = 0
        while time.perf_counter() - t < round_s:
            sess.run(None, {name: xb})
            n += mb
        return n / (time.perf_counter() - t), n / (time.process_time() - c)

    own_runs: list[float] = []
    cluster_runs: list[float] = []
    own_cpu: list[float] = []
    cluster_cpu: list[float] = []
    with LocalCluster(workdir) as lc:
        lc.start(cpu=CPU_CLIENT if pinned else None)
        # Served as configured by default: the worker holds twice its batch (one running, one
        # waiting), the gateway queues the rest.
        lc.add_worker("mnist-cnn", cpu=CPU_SERVER if pinned else None)
        lc.wait_workers("mnist-cnn", 1)
        req = infer_request(lc, "mnist-cnn", {"image": mnist_input()})
        try:
            for _ in range(3):
                sess.run(None, {name: xb})
            if pinned:
                pin_self(CPU_CLIENT)
            run_load(lc, req, 4 * mb, seconds=1.0)
            worker = lc.workers[0].pid
            for _ in range(rounds):
                wall, cpu = own_speed()
                own_runs.append(wall)
                own_cpu.append(cpu)
                if pinned:
                    pin_self(CPU_CLIENT)
                c0 = cpu_seconds(worker)
                res = run_load(lc, req, 4 * mb, seconds=round_s)
                cluster_runs.append(res.steady_rps())
                cluster_cpu.append(res.count / max(1e-9, cpu_seconds(worker) - c0))
            st = lc.status()
        finally:
            unpin_self()
    w = st["models"][0]["workers"][0]["load"]
    own = float(np.median(own_runs))
    through = float(np.median(cluster_runs))
    return {
        f"model batched in-process, images/s (median of {rounds})": round(own),
        f"through the cluster, images/s (median of {rounds})": round(through),
        "ratio": round(through / own, 3),
        # CPU time is less disturbed by other jobs than wall time: images per CPU-second of the
        # worker process (all its threads) against those of the model alone.
        "ratio by CPU time (worker process / model alone)": round(
            float(np.median(cluster_cpu)) / float(np.median(own_cpu)), 3
        ),
        "mean batch size": round(w["rows"] / max(1, w["batches"]), 1),
        "max batch size": mb,
        "worker and in-process runs on the same core": pinned,
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
        req = infer_request(lc, "checksum", {"data": data})
        run_load(lc, req, 8, total=16)
        res = run_load(lc, req, 8, seconds=args.seconds)
    p50, p99 = percentiles(res.latencies_s)
    return {
        "MB/s (3 MB requests, 8 clients)": round(res.count * size / 1e6 / res.elapsed_s, 1),
        "requests/s": round(res.rps, 1),
        "p50/p99 ms": f"{p50:.1f} / {p99:.1f}",
    }


def connections(workdir: Path, args: Namespace) -> dict[str, Any]:
    """Open many connections to one gateway, hold them all, then send one request on each."""
    from shoal.gateway.server import raise_fd_limit

    limit = raise_fd_limit()
    want = min(args.hold, max(100, limit - 2000))  # keep descriptors for everything else
    # Every request arrives at once: let the queue hold them all, so each is answered with its result.
    with LocalCluster(workdir, gateway_args=["--max-queue", str(want + 100)]) as lc:
        lc.start()
        lc.add_worker("echo")
        lc.wait_workers("echo", 1)
        rss0 = rss_kb(lc.gateway.pid)
        req = infer_request(lc, "echo", {"x": np.zeros((1, 4), np.float32)})
        result = asyncio.run(_hold_and_answer(lc.http_port, want, req))
        rss1 = rss_kb(lc.gateway.pid)
        status = lc.status()
    return {
        "connections held at once": result["opened"],
        "answered 200 (one request each, all at once)": result["answered"],
        "all outcomes": result["codes"],
        "seconds to open all": round(result["open_s"], 2),
        "seconds to answer all": round(result["answer_s"], 2),
        "gateway memory growth, MB": round((rss1 - rss0) / 1024, 1),
        "gateway still serving": bool(status["models"]),
    }


async def _hold_and_answer(port: int, n: int, req: bytes) -> dict[str, Any]:
    t0 = time.perf_counter()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    sem = asyncio.Semaphore(256)

    async def open_one() -> None:
        async with sem:
            conns.append(await asyncio.open_connection("127.0.0.1", port))

    await asyncio.gather(*(open_one() for _ in range(n)))
    t1 = time.perf_counter()

    async def ask(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(req)
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        cl = int(head.lower().split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
        await r.readexactly(cl)
        return head[9:12].decode()

    answers = await asyncio.gather(*(ask(r, w) for r, w in conns), return_exceptions=True)
    t2 = time.perf_counter()
    for _, w in conns:
        w.close()
    codes: dict[str, int] = {}
    for a in answers:
        k = a if isinstance(a, str) else type(a).__name__
        codes[k] = codes.get(k, 0) + 1
    return {
        "opened": len(conns),
        "answered": codes.get("200", 0),
        "codes": codes,
        "open_s": t1 - t0,
        "answer_s": t2 - t1,
    }


def startup(workdir: Path, args: Namespace) -> dict[str, Any]:
    """Seconds from starting a worker process to its first answered request (MNIST CNN, ONNX)."""
    from shoal.client.http import OipHttpClient

    out = {}
    with LocalCluster(workdir, gateway_args=["--max-queue", "64"]) as lc:
        lc.start()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            w = lc.add_worker("mnist-cnn")
            with OipHttpClient(lc.url, lc.api_key, timeout=30) as c:
                while True:
                    try:
                        c.infer("mnist-cnn", {"image": mnist_input()})
                        break
                    except Exception:  # not joined yet: 404 until its first registration
                        time.sleep(0.005)
            times.append(time.perf_counter() - t)
            w.stop()
            lc.workers.remove(w)
        out["first answer after worker start, s (3 runs)"] = " / ".join(f"{x:.2f}" for x in times)
    return out


def pipeline(workdir: Path, args: Namespace) -> dict[str, Any]:
    """The read-digits pipeline on generated multi-digit images: exact-number accuracy and latency."""
    import yaml

    from shoal.data.mnist import load_mnist
    from shoal.examples.read_digits import MODELS, PIPELINE, make_number_image

    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"pipelines": PIPELINE}))
    images, labels = load_mnist("test")
    rng = np.random.default_rng(2026)
    n = args.pipeline_images
    samples = [make_number_image(rng, images, labels) for _ in range(n)]
    right = digits_right = digits_total = 0
    lat = []
    with LocalCluster(workdir, gateway_args=["--config", str(cfg)]) as lc:
        lc.start()
        for m in MODELS:
            lc.add_worker(m)
        for m in MODELS:
            lc.wait_workers(m, 1)
        with lc.client() as c:
            for png, number, _ in samples:
                t = time.perf_counter()
                out = c.infer_raw("read-digits", png)
                lat.append(time.perf_counter() - t)
                got = out["number"].reshape(-1)[0]
                got = got.decode() if isinstance(got, bytes) else str(got)
                right += got == number
                digits_total += len(number)
                digits_right += (
                    sum(a == b for a, b in zip(got, number, strict=False)) if len(got) == len(number) else 0
                )
    p50, p99 = percentiles(lat)
    return {
        "images (2-5 digits each)": n,
        "numbers read exactly": f"{right}/{n} = {right / n:.3f}",
        "digits right (numbers of the right length)": f"{digits_right}/{digits_total} = {digits_right / digits_total:.3f}",
        "latency p50/p99 ms (one at a time)": f"{p50:.1f} / {p99:.1f}",
    }
