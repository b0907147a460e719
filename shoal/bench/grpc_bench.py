"""The ``grpc`` suite: the gateway's gRPC front against its HTTP binary extension, side by side in one
run, on the same cores: a trivial model (echo) at 64 requests in flight, and one request at a time.

Both load generators are lean, so the gateway is what is measured: HTTP sends prebuilt request bytes
over 64 keep-alive connections (``loadgen.py``); gRPC sends a prebuilt, already serialised
``ModelInferRequest`` as 64 concurrent calls on one channel (HTTP/2 multiplexes them), through
grpcio's asyncio client with identity (de)serialisers. Gateway and worker share one core, the load
generator has the other, as in the ``throughput`` suite.

Where a gRPC call's CPU goes: the suite also serves the same load from bare grpcio servers pinned as
the gateway is, each doing one part of what the gateway's front does and nothing else (echoing
bytes; a ``ModelInfer`` parsed, its metadata and deadline read, its answer built and serialised; and
grpcio's synchronous server with every call handed to an asyncio loop on another thread and waited
for, the "sync server bridged into the loop" design), and reports each one's CPU per call.
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
    own_cpu: list[float] | None = None,
) -> tuple[int, float, list[float]]:
    """(answers, seconds, latencies) of ``in_flight`` concurrent calls for ``seconds`` or ``total``;
    the load generator's own CPU seconds over them appended to ``own_cpu`` when given."""
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        meta = (("authorization", f"Bearer {key}"),)
        for _ in range(50):  # warm the channel and the worker
            await call(body, metadata=meta)
        lat: list[float] = []
        c0 = time.process_time()
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
        if own_cpu is not None:
            own_cpu.append(time.process_time() - c0)
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
            cpu_us: dict[str, list[float]] = {"http": [], "grpc": [], "gateway": [], "loadgen": []}
            pids = [lc.gateway.pid, *(w.pid for w in lc.workers)]
            for _ in range(2):  # alternating, so drift weighs on both alike
                run_load(lc, http_req, IN_FLIGHT, seconds=1.0)
                c0 = sum(cpu_seconds(p) for p in pids)
                r = run_load(lc, http_req, IN_FLIGHT, seconds=args.seconds)
                cpu_us["http"].append((sum(cpu_seconds(p) for p in pids) - c0) / max(1, r.count) * 1e6)
                rounds["http"].append(r.rps)
                c0 = sum(cpu_seconds(p) for p in pids)
                g0 = cpu_seconds(pids[0])
                own: list[float] = []
                n, s, _ = asyncio.run(
                    _grpc_load(address, lc.api_key, body, IN_FLIGHT, args.seconds, None, own_cpu=own)
                )
                cpu_us["grpc"].append((sum(cpu_seconds(p) for p in pids) - c0) / max(1, n) * 1e6)
                cpu_us["gateway"].append((cpu_seconds(pids[0]) - g0) / max(1, n) * 1e6)
                cpu_us["loadgen"].append(own[0] / max(1, n) * 1e6)
                rounds["grpc"].append(n / s)
            one_http = run_load(lc, http_req, 1, total=2200, warmup=200)
            _, _, one_grpc = asyncio.run(_grpc_load(address, lc.api_key, body, 1, None, 2000))
            bare = {kind: _bare_server_cpu_us(kind, cpu, args.seconds, body) for kind in BARE}
            unpin_self()
            before = _baseline(workdir, args, cpu, pinned, body, lc)
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
        "gRPC: CPU per call of the gateway alone / of the load generator, us": (
            f"{np.median(cpu_us['gateway']):.0f} / {np.median(cpu_us['loadgen']):.0f}"
        ),
        **{
            f"bare grpcio, {what}: CPU per call us, calls/s": f"{bare[k][0]:.0f}, {bare[k][1]:.0f}"
            for k, what in BARE.items()
        },
        **before,
        "gateway+worker pinned to one core": pinned,
    }


def _baseline(
    workdir: Path,
    args: Namespace,
    cpu: int | None,
    pinned: bool,
    body: bytes,
    lc: LocalCluster,
) -> dict[str, Any]:
    """With ``--baseline DIR``: the gateway of that source tree under the same gRPC load, alternating
    with this tree's (both up at once, pinned alike), to measure a change to the gRPC front."""
    if not getattr(args, "baseline", None):
        return {}
    source = Path(args.baseline).resolve()
    with LocalCluster(workdir / "baseline", source=source) as old:
        old.start(cpu=cpu)
        old.add_worker("echo", cpu=cpu)
        old.wait_workers("echo", 1)
        runs: dict[str, dict[str, list[float]]] = {
            k: {"rps": [], "cpu": [], "p50": []} for k in ("this", "base")
        }
        if pinned:
            pin_self(CPU_CLIENT)
        for i in range(4):
            order = [("this", lc), ("base", old)] if i % 2 == 0 else [("base", old), ("this", lc)]
            for name, c in order:
                pids = [c.gateway.pid, *(w.pid for w in c.workers)]
                address = f"127.0.0.1:{c.grpc_port}"
                c0 = sum(cpu_seconds(p) for p in pids)
                n, s, _ = asyncio.run(_grpc_load(address, c.api_key, body, IN_FLIGHT, args.seconds, None))
                runs[name]["cpu"].append((sum(cpu_seconds(p) for p in pids) - c0) / max(1, n) * 1e6)
                runs[name]["rps"].append(n / s)
                _, _, one = asyncio.run(_grpc_load(address, c.api_key, body, 1, None, 1000))
                runs[name]["p50"].append(percentiles(one)[0])
    out = {}
    for name, label in (("this", "this tree"), ("base", source.name)):
        r = runs[name]
        out[f"gRPC, {label}: requests/s, gateway+worker CPU us, one-call p50 ms (medians of 4)"] = (
            f"{np.median(r['rps']):.0f}, {np.median(r['cpu']):.0f}, {np.median(r['p50']):.3f}"
        )
    return out


# The bare servers: what each does with a call (the load is the gateway's, a ModelInfer's bytes).
BARE = {
    "aio": "asyncio server echoing bytes",
    "aio-pb": "asyncio server, ModelInfer parsed, metadata and deadline read, answer built",
    "sync": "sync server (8 threads) echoing bytes",
    "sync-loop": "sync server (64 threads), each call handed to an asyncio loop and waited for",
}


def _bare_server(kind: str, cpu: int | None, ready: Any) -> None:
    """A grpcio server that does one part of the gateway front's work with each call and nothing
    else (``BARE``): what the transport and that part cost a call."""
    import threading
    from concurrent import futures

    import grpc

    from shoal.protocol.oip_grpc import grpc_service_pb2 as pb

    if cpu is not None:
        pin_self(cpu)
    loop = asyncio.new_event_loop()

    async def parsed(request: Any, context: Any) -> Any:
        dict(context.invocation_metadata() or ())
        context.time_remaining()
        t = request.inputs[0]
        out = pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
        return pb.ModelInferResponse(
            model_name=request.model_name,
            id=request.id,
            outputs=[out],
            raw_output_contents=[request.raw_input_contents[0]],
        )

    async def echoed(request: bytes) -> bytes:
        return request

    def handed_over(request: bytes, context: Any) -> bytes:
        return asyncio.run_coroutine_threadsafe(echoed(request), loop).result()

    if kind == "aio-pb":
        method = grpc.unary_unary_rpc_method_handler(
            parsed, pb.ModelInferRequest.FromString, pb.ModelInferResponse.SerializeToString
        )
    else:
        method = grpc.unary_unary_rpc_method_handler(
            {"aio": _echo_async, "sync": _echo, "sync-loop": handed_over}[kind]
        )
    handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": method})
    if kind.startswith("sync"):
        if kind == "sync-loop":
            threading.Thread(target=loop.run_forever, daemon=True).start()
        server = grpc.server(futures.ThreadPoolExecutor(64 if kind == "sync-loop" else 8))
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

    loop.run_until_complete(main())


def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _echo_async(request: bytes, context: Any) -> bytes:
    return request


def _bare_server_cpu_us(kind: str, cpu: int | None, seconds: float, body: bytes) -> tuple[float, float]:
    """CPU per call and calls/s of a bare grpcio server (``BARE``) at 64 calls in flight."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=_bare_server, args=(kind, cpu, ready), daemon=True)
    proc.start()
    try:
        port = ready.get(timeout=60)
        address = f"127.0.0.1:{port}"
        asyncio.run(_grpc_load(address, "k", body, IN_FLIGHT, 1.0, None))
        c0 = cpu_seconds(proc.pid)
        n, s, _ = asyncio.run(_grpc_load(address, "k", body, IN_FLIGHT, seconds, None))
        return (cpu_seconds(proc.pid) - c0) / max(1, n) * 1e6, n / s
    finally:
        proc.terminate()
        proc.join(10)
