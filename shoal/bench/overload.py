"""The ``overload`` suite: the gateway past its worker's capacity, open-loop (requests sent on a
schedule, not when answers come back, as devices do), each request with a deadline it tells the gateway.

The model is ``paced``, written into the suite's own repository: it sleeps a fixed time per batch (10 ms
for up to 4 rows), so one worker's capacity is known and costs no CPU, and the gateway's behaviour is
what is measured. Phases, each of ``--seconds``:

* capacity: closed loop, 32 in flight: the answers a second one worker gives (C);
* 1.2 C and 2 C with a 500 ms deadline: good answers a second against C, the admitted requests' p99
  against the deadline, how fast the rest are refused, and time-outs and closed connections (none
  expected: the gateway refuses at once what it cannot answer in time);
* priorities at 1.5 C, one request in ten at level 1 (2 s deadline): the high level's p99 against its
  own at 0.3 C;
* clients that give up: 1.5 C, the clients' own 300 ms time-out not told to the gateway: the model time
  spent on answers nobody read, against the share of requests the clients gave up on.
"""

from __future__ import annotations

import asyncio
import json
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench.loadgen import http_request
from shoal.bench.process import CPU_CLIENT, CPU_SERVER, percentiles, pin_self, two_cores, unpin_self
from shoal.local import LocalCluster

BATCH = 4
BATCH_S = 0.010
HANDLER = f'''"""A paced model: {BATCH_S * 1e3:.0f} ms per batch, whatever its rows (it sleeps)."""
import time


class Paced:
    def __init__(self, model_dir, manifest):
        pass

    def __call__(self, inputs):
        time.sleep({BATCH_S})
        return {{"y": inputs["x"]}}
'''
MANIFEST = {
    "name": "paced",
    "version": "1",
    "runtime": "python",
    "file": "handler.py",
    "handler": "handler:Paced",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    "max_batch_size": BATCH,
    "batch_delay_ms": 0,
}


def write_model(repo: Path) -> None:
    d = repo / "paced" / "1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "handler.py").write_text(HANDLER)
    (d / "manifest.json").write_text(json.dumps(MANIFEST))


@dataclass
class Outcome:
    sent_at: float
    status: int  # 0: the client gave up (its time-out), -1: the connection failed
    latency_s: float
    high: bool = False


@dataclass
class OpenLoop:
    """Requests on a schedule over a pool of keep-alive connections (a new one when all are busy)."""

    port: int
    requests: dict[bool, bytes]  # high priority -> the request's bytes
    client_timeout_s: float
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    opened: int = 0

    async def one(self, high: bool, out: list[Outcome]) -> None:
        t0 = time.perf_counter()
        if self.idle:
            r, w = self.idle.pop()
        else:
            r, w = await asyncio.open_connection("127.0.0.1", self.port)
            self.opened += 1
        try:
            w.write(self.requests[high])
            status = await asyncio.wait_for(_response(r), self.client_timeout_s)
        except TimeoutError:
            w.close()  # the client gives up: its connection closes, as a device's would
            out.append(Outcome(t0, 0, time.perf_counter() - t0, high))
            return
        except (OSError, asyncio.IncompleteReadError):
            w.close()
            out.append(Outcome(t0, -1, time.perf_counter() - t0, high))
            return
        out.append(Outcome(t0, status, time.perf_counter() - t0, high))
        self.idle.append((r, w))

    async def run(self, rate: float, seconds: float, high_share: float = 0.0) -> list[Outcome]:
        out: list[Outcome] = []
        tasks = []
        rng = np.random.default_rng(0)
        n = int(rate * seconds)
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.one(bool(rng.random() < high_share), out)))
        await asyncio.gather(*tasks)
        self.close()
        return out

    def close(self) -> None:
        """Close the idle connections (inside the event loop that opened them)."""
        for _, w in self.idle:
            w.close()
        self.idle.clear()


async def _response(r: asyncio.StreamReader) -> int:
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await r.readexactly(length)
    return status


def _request(port: int, key: str, headers: dict[str, str]) -> bytes:
    x = np.zeros((1, 4), np.float32)
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x.ravel().tolist()}]}
    return http_request(
        "/v2/models/paced/infer",
        json.dumps(doc).encode(),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
        f"127.0.0.1:{port}",
    )


async def _capacity(lc: LocalCluster, seconds: float) -> float:
    loop = OpenLoop(lc.http_port, {False: _request(lc.http_port, lc.api_key, {})}, 30.0)
    out: list[Outcome] = []
    end = time.perf_counter() + seconds

    async def closed() -> None:
        while time.perf_counter() < end:
            await loop.one(False, out)

    t0 = time.perf_counter()
    await asyncio.gather(*(closed() for _ in range(32)))
    loop.close()
    return sum(1 for o in out if o.status == 200) / (time.perf_counter() - t0)


def _ms(samples: list[float]) -> str:
    if not samples:
        return "-"
    p50, p99 = percentiles(samples)
    return f"{p50:.1f} / {p99:.1f}"


def _step(
    lc: LocalCluster, cap: float, factor: float, seconds: float, deadline_ms: int, phases: list
) -> dict[str, Any]:
    req = _request(lc.http_port, lc.api_key, {"X-Request-Timeout-Ms": str(deadline_ms)})
    loop = OpenLoop(lc.http_port, {False: req}, deadline_ms / 1000.0 + 2.0)
    before = _model(lc)
    out = asyncio.run(loop.run(cap * factor, seconds))
    phases.append((f"{factor} C", out))
    ok = [o.latency_s for o in out if o.status == 200]
    refused = [o.latency_s for o in out if o.status == 503]
    p99_ms = percentiles(ok)[1] if ok else 0.0
    return {
        "offered/s": round(cap * factor),
        "good answers / capacity": round(len(ok) / seconds / cap, 3),
        "admitted p50 / p99 ms": _ms(ok),
        "admitted p99 within the deadline": p99_ms <= deadline_ms,
        "refused": len(refused),
        "refused in p50 / p99 ms": _ms(refused),
        "time-outs": sum(1 for o in out if o.status == 0),
        "closed connections": sum(1 for o in out if o.status == -1),
        "other answers": _others(out),
        "model time on answers nobody read": _unread(lc, before),
    }


def _others(out: list[Outcome]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for o in out:
        if o.status not in (0, -1, 200, 503):
            counts[o.status] = counts.get(o.status, 0) + 1
    return counts


def _unread(lc: LocalCluster, before: dict[str, Any]) -> str:
    deadline = time.monotonic() + 30
    while (m := _model(lc))["in_flight"] or m["queue"]:  # what the worker still holds, answered
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    unread_s = (m["unread_ms"] - before["unread_ms"]) / 1e3
    model_s = (m["busy_ms"] - before["busy_ms"]) / 1e3
    return f"{unread_s:.2f} s of {model_s:.2f} s ({unread_s / max(1e-9, model_s):.1%})"


def _priorities(lc: LocalCluster, cap: float, seconds: float, phases: list) -> dict[str, Any]:
    reqs = {
        high: _request(lc.http_port, lc.api_key, {"X-Request-Timeout-Ms": "2000", "X-Request-Priority": str(1 if high else 2)})
        for high in (False, True)
    }
    loop = OpenLoop(lc.http_port, reqs, 4.0)
    quiet = asyncio.run(loop.run(cap * 0.3, seconds, high_share=1.0))
    busy = asyncio.run(loop.run(cap * 1.5, seconds, high_share=0.1))
    phases.append(("1.5 C, 1 in 10 high", busy))
    q = [o.latency_s for o in quiet if o.status == 200]
    hi = [o.latency_s for o in busy if o.high and o.status == 200]
    lo = [o.latency_s for o in busy if not o.high and o.status == 200]
    ratio = percentiles(hi)[1] / percentiles(q)[1] if hi and q else float("nan")
    return {
        "high alone at 0.3 C: p50 / p99 ms": _ms(q),
        "at 1.5 C, high (1 in 10): p50 / p99 ms": _ms(hi),
        "at 1.5 C, low: p50 / p99 ms": _ms(lo),
        "high p99 at 1.5 C / alone": round(ratio, 2),
        "high refused / sent": f"{sum(1 for o in busy if o.high and o.status != 200)} / {sum(1 for o in busy if o.high)}",
        "low refused / sent": f"{sum(1 for o in busy if not o.high and o.status != 200)} / {sum(1 for o in busy if not o.high)}",
    }


def _model(lc: LocalCluster) -> dict[str, Any]:
    return next(m for m in lc.status()["models"] if m["name"] == "paced")


def _giving_up(lc: LocalCluster, cap: float, seconds: float) -> dict[str, Any]:
    loop = OpenLoop(lc.http_port, {False: _request(lc.http_port, lc.api_key, {})}, 0.3)
    before = _model(lc)
    out = asyncio.run(loop.run(cap * 1.5, seconds))
    gave_up = sum(1 for o in out if o.status == 0)
    unread = _unread(lc, before)
    return {
        "offered/s": round(cap * 1.5),
        "requests the clients gave up on": f"{gave_up} of {len(out)} ({gave_up / max(1, len(out)):.0%})",
        "cancelled at the gateway": _model(lc)["cancelled"] - before["cancelled"],
        "model time on answers nobody read": unread,
    }


def _cluster(workdir: Path, repo: Path, pinned: bool, gateway_args: list[str]) -> LocalCluster:
    lc = LocalCluster(workdir, gateway_args=gateway_args)
    try:
        lc.start(cpu=CPU_SERVER if pinned else None)
        lc.add_worker("paced", repo=str(repo), cpu=CPU_CLIENT if pinned else None)
        lc.wait_workers("paced", 1)
    except BaseException:
        lc.stop()
        raise
    return lc


def overload(workdir: Path, args: Namespace) -> dict[str, Any]:
    pinned = two_cores()
    repo = workdir / "repo"
    write_model(repo)
    seconds = max(3.0, args.seconds)
    result: dict[str, Any] = {"model": f"paced: {BATCH_S * 1e3:.0f} ms a batch of up to {BATCH} (one worker)"}
    with _cluster(workdir / "default", repo, pinned, []) as lc:
        if pinned:
            pin_self(CPU_CLIENT)
        try:
            cap = asyncio.run(_capacity(lc, seconds))
            result["capacity C, answers/s (closed loop, 32 in flight)"] = round(cap)
            phases: list[tuple[str, list[Outcome]]] = []
            for factor in (1.2, 2.0):
                result[f"{factor} C, 500 ms deadline"] = _step(lc, cap, factor, seconds, 500, phases)
            result["priorities"] = _priorities(lc, cap, seconds, phases)
            result["timeline plot"] = str(_plot(phases, cap, workdir / "overload.png"))
            result["clients giving up after 300 ms, not told"] = _giving_up(lc, cap, seconds)
        finally:
            unpin_self()
    # The same clients, where the operator has set the gateway's deadline to their patience.
    with _cluster(workdir / "timeout", repo, pinned, ["--timeout", "0.3"]) as lc:
        if pinned:
            pin_self(CPU_CLIENT)
        try:
            result["the same, gateway --timeout 0.3"] = _giving_up(lc, cap, seconds)
        finally:
            unpin_self()
    return result


def _plot(phases: list[tuple[str, list[Outcome]]], cap: float, path: Path) -> Path:
    """Each phase side by side: answers and refusals a second against the capacity, and each answered
    request's latency (high priority apart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(phases), figsize=(4.2 * len(phases), 6), sharey="row", squeeze=False)
    for k, (name, out) in enumerate(phases):
        t0 = min(o.sent_at for o in out)
        end = max(o.sent_at + o.latency_s for o in out) - t0
        bins = np.arange(0.0, end + 0.5, 0.5)
        rate = axes[0][k]
        for status, label, colour in ((200, "answered", "tab:green"), (503, "refused at once", "tab:orange")):
            ts = [o.sent_at - t0 + o.latency_s for o in out if o.status == status]
            counts, _ = np.histogram(ts, bins)
            rate.plot(bins[:-1], counts / 0.5, label=label, color=colour)
        gone = [o.sent_at - t0 for o in out if o.status not in (200, 503)]
        if gone:
            counts, _ = np.histogram(gone, bins)
            rate.plot(bins[:-1], counts / 0.5, label="time-outs, errors", color="tab:red")
        rate.axhline(cap, color="grey", linestyle="--", label="capacity C")
        rate.set_title(name)
        rate.set_xlabel("s")
        lat = axes[1][k]
        for high, label, colour in ((False, "answered", "tab:green"), (True, "high priority", "tab:purple")):
            pts = [(o.sent_at - t0, o.latency_s * 1e3) for o in out if o.status == 200 and o.high == high]
            if pts:
                x, y = zip(*pts, strict=True)
                lat.scatter(x, y, s=2, color=colour, label=label)
        lat.set_xlabel("sent at, s")
    axes[0][0].set_ylabel("per second")
    axes[1][0].set_ylabel("latency of answered requests, ms")
    axes[0][0].legend(fontsize=7)
    axes[1][-1].legend(fontsize=7)
    fig.suptitle("One worker past its capacity: what is answered, what is refused at once")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
