"""The ``grpc`` suite: the gateway's gRPC front against its HTTP binary extension, side by side in one
run, on the same cores: a trivial model (echo) at 64 requests in flight, and one request at a time.

Both load generators are lean, so the gateway is what is measured: HTTP sends prebuilt request bytes
over 64 keep-alive connections (``loadgen.py``); gRPC sends a prebuilt, already serialised
``ModelInferRequest`` as 64 concurrent calls on one channel (HTTP/2 multiplexes them), through
grpcio's asyncio client with identity (de)serialisers. Gateway and worker share one core, the load
generator has the other, as in the ``throughput`` suite.
"""

from __future__ import annotations

import asyncio
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

METHOD = "/inference.GRPCInferenceService/ModelInfer"
IN_FLIGHT = 64


def grpc_request(x: np.ndarray) -> bytes:
    """A serialised ``ModelInferRequest`` for the echo model, its tensor as raw contents."""
    from shoal.protocol.oip_grpc import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="echo")
    t = req.inputs.add()
    t.name, t.datatype = "x", "FP32"
    t.shape.extend(x.shape)
    req.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    return bytes(req.SerializeToString())


async def _grpc_load(
    address: str,
    key: str,
    body: bytes,
    in_flight: int,
    seconds: float | None,
    total: int | None,
    method: str = METHOD,
) -> tuple[int, float, list[float]]:
    """(answers, seconds, latencies) of ``in_flight`` concurrent calls for ``seconds`` or ``total``."""
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        meta = (("authorization", f"Bearer {key}"),)
        for _ in range(50):  # warm the channel and the worker
            await call(body, metadata=meta)
        lat: list[float] = []
        t0 = time.perf_counter()
        end = t0 + seconds if seconds is not None else float("inf")
        left = [total if total is not None else 1 << 60]

        async def caller() -> None:
            while time.perf_counter() < end and left[0] > 0:
                left[0] -= 1
                t = time.perf_counter()
                await call(body, metadata=meta)
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*(caller() for _ in range(in_flight)))
        return len(lat), time.perf_counter() - t0, lat


def grpc(workdir: Path, args: Namespace) -> dict[str, Any]:
    pinned = two_cores()
    cpu = CPU_SERVER if pinned else None
    x = np.zeros((1, 16), np.float32)
    with LocalCluster(workdir) as lc:
        lc.start(cpu=cpu)
        if not lc.grpc_port:
            return {"skipped": "the gateway serves no gRPC here (pip install 'shoal[grpc]')"}
        lc.add_worker("echo", cpu=cpu)
        lc.wait_workers("echo", 1)
        http_req = infer_request(lc, "echo", {"x": x})
        body = grpc_request(x)
        address = f"127.0.0.1:{lc.grpc_port}"
        if pinned:
            pin_self(CPU_CLIENT)
        try:
            rounds: dict[str, list[float]] = {"http": [], "grpc": []}
            cpu_us: dict[str, list[float]] = {"http": [], "grpc": []}
            pids = [lc.gateway.pid, *(w.pid for w in lc.workers)]
            for _ in range(2):  # alternating, so drift weighs on both alike
                run_load(lc, http_req, IN_FLIGHT, seconds=1.0)
                c0 = sum(cpu_seconds(p) for p in pids)
                r = run_load(lc, http_req, IN_FLIGHT, seconds=args.seconds)
                cpu_us["http"].append((sum(cpu_seconds(p) for p in pids) - c0) / max(1, r.count) * 1e6)
                rounds["http"].append(r.rps)
                c0 = sum(cpu_seconds(p) for p in pids)
                n, s, _ = asyncio.run(_grpc_load(address, lc.api_key, body, IN_FLIGHT, args.seconds, None))
                cpu_us["grpc"].append((sum(cpu_seconds(p) for p in pids) - c0) / max(1, n) * 1e6)
                rounds["grpc"].append(n / s)
            one_http = run_load(lc, http_req, 1, total=2200, warmup=200)
            _, _, one_grpc = asyncio.run(_grpc_load(address, lc.api_key, body, 1, None, 2000))
            bare = {kind: _bare_server_cpu_us(kind, cpu, args.seconds) for kind in ("aio", "sync")}
        finally:
            unpin_self()
    p50_h, p99_h = percentiles(one_http.latencies_s)
    p50_g, p99_g = percentiles(one_grpc)
    http_rps, grpc_rps = float(np.median(rounds["http"])), float(np.median(rounds["grpc"]))
    return {
        "HTTP binary, 64 in flight: requests/s (median of 2)": round(http_rps),
        "gRPC, 64 calls in flight: requests/s (median of 2)": round(grpc_rps),
        "gRPC / HTTP": round(grpc_rps / http_rps, 2),
        "one at a time, HTTP p50/p99 ms": f"{p50_h:.3f} / {p99_h:.3f}",
        "one at a time, gRPC p50/p99 ms": f"{p50_g:.3f} / {p99_g:.3f}",
        "CPU per request, gateway and worker, HTTP / gRPC, us (median of 2)": (
            f"{np.median(cpu_us['http']):.0f} / {np.median(cpu_us['grpc']):.0f}"
        ),
        "grpcio alone, a server echoing bytes: CPU per call, asyncio / sync (8 threads), us": (
            f"{bare['aio']:.0f} / {bare['sync']:.0f}"
        ),
        "gateway+worker pinned to one core": pinned,
    }


def _bare_server(kind: str, cpu: int | None, ready: Any) -> None:
    """A grpcio server that echoes bytes and nothing else: what the transport alone costs a call."""
    from concurrent import futures

    import grpc

    if cpu is not None:
        pin_self(cpu)
    handler = grpc.method_handlers_generic_handler(
        "bare.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo if kind == "sync" else _echo_async)}
    )
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(8))
        server.add_generic_rpc_handlers((handler,))
        ready.put(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        server.wait_for_termination()
        return

    async def main() -> None:
        aserver = grpc.aio.server()
        aserver.add_generic_rpc_handlers((handler,))
        ready.put(aserver.add_insecure_port("127.0.0.1:0"))
        await aserver.start()
        await aserver.wait_for_termination()

    asyncio.run(main())


def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _echo_async(request: bytes, context: Any) -> bytes:
    return request


def _bare_server_cpu_us(kind: str, cpu: int | None, seconds: float) -> float:
    """CPU per call of a bare grpcio server (``kind``: aio or sync) at 64 calls in flight."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=_bare_server, args=(kind, cpu, ready), daemon=True)
    proc.start()
    try:
        port = ready.get(timeout=60)
        address = f"127.0.0.1:{port}"
        asyncio.run(_grpc_load(address, "", b"x" * 100, IN_FLIGHT, 1.0, None, "/bare.Echo/Echo"))
        c0 = cpu_seconds(proc.pid)
        n, _, _ = asyncio.run(_grpc_load(address, "", b"x" * 100, IN_FLIGHT, seconds, None, "/bare.Echo/Echo"))
        return (cpu_seconds(proc.pid) - c0) / max(1, n) * 1e6
    finally:
        proc.terminate()
        proc.join(10)
