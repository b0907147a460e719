"""The ``gateways`` suite: a cluster served by several gateways.

* **Scaling with cores**: a trivial model at 256 keep-alive connections through 1, 2 (and 4 where
  the machine has the cores) gateway processes of one cluster (``shoal cluster --processes N``, one
  HTTP port), with as many echo workers as gateways. Where there are enough cores, the gateways, the
  workers and the load generators each get cores of their own; on a smaller machine everything
  shares, and the figure that carries over is the gateways' CPU per request.
* **A gateway killed under load**: two gateways of one cluster (separate processes with their own
  HTTP ports, as two machines would be) reporting to central, devices on ``shoal.client`` (async, 64
  in flight) routed there; one gateway SIGKILLed half way: failed requests, p99 in the second after
  the kill, how soon the workers count one gateway fewer, and the survivor's share after.
* **Idle connections held**: many idle keep-alive connections spread over four gateway processes of
  one machine, then one request on each, all at once: connections held, answered, gateway memory.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from argparse import Namespace
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench.loadgen import LoadGenerator
from shoal.bench.process import cpu_seconds, percentiles, rss_kb
from shoal.bench.serving import infer_request
from shoal.local import LocalCluster

CONNECTIONS = 256


def _cores() -> list[int]:
    return (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )


def _load(
    port: int, req: bytes, connections: int, seconds: float, cpus: list[int] | None
) -> tuple[int, float, list[float], list[str]]:
    """One load generator process: (answers, steady requests/s, latencies in s, errors)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))
    gen = LoadGenerator("127.0.0.1", port, lambda i: req, connections, duration_s=seconds)
    res = asyncio.run(gen.run())
    bad = [f"HTTP {k}: {v}" for k, v in res.statuses.items() if k != 200]
    return res.count, res.steady_rps(), res.latencies_s[::10], bad + res.errors[:3]


def _gateway_cpu(lc: LocalCluster) -> float:
    return sum(cpu_seconds(pid) for pid in lc.gateway_pids)


def scale_run(workdir: Path, n: int, seconds: float) -> dict[str, Any]:
    """Requests/s and gateway CPU per request through ``n`` gateway processes."""
    cores = _cores()
    roomy = len(cores) >= 2 * n + 2  # gateways, workers and load generators each on their own cores
    with LocalCluster(workdir, processes=n) as lc:
        if roomy:
            lc.gateway_args = []
            lc.start(cpu=None)
            for pid, core in zip(lc.gateway_pids, cores[:n], strict=False):
                os.sched_setaffinity(pid, {core})
        else:
            lc.start()
        for i in range(n):
            lc.add_worker("echo", cpu=cores[n + i] if roomy else None)
        lc.wait_workers("echo", n)
        req = infer_request(lc, "echo", {"x": np.zeros((1, 16), np.float32)})
        gens = max(1, min(4, len(cores) - 2 * n)) if roomy else 1
        gen_cpus = [cores[2 * n + i :: gens] if roomy else None for i in range(gens)]
        with ProcessPoolExecutor(gens) as pool:
            list(
                pool.map(
                    _load,
                    [lc.http_port] * gens,
                    [req] * gens,
                    [CONNECTIONS // gens] * gens,
                    [1.0] * gens,
                    gen_cpus,
                )
            )
            cpu0 = _gateway_cpu(lc)
            runs = list(
                pool.map(
                    _load,
                    [lc.http_port] * gens,
                    [req] * gens,
                    [CONNECTIONS // gens] * gens,
                    [seconds] * gens,
                    gen_cpus,
                )
            )
            cpu = _gateway_cpu(lc) - cpu0
    errors = [e for r in runs for e in r[3]]
    if errors:
        raise RuntimeError(f"benchmark requests failed: {errors[:3]}")
    count = sum(r[0] for r in runs)
    lat = [x for r in runs for x in r[2]]
    p50, p99 = percentiles(lat)
    return {
        "rps": sum(r[1] for r in runs),
        "gateway_cpu_us": cpu / max(1, count) * 1e6,
        "p50_ms": p50,
        "p99_ms": p99,
        "own_cores": roomy,
        "load_generators": gens,
    }


def gateways(workdir: Path, args: Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cores = _cores()
    counts = [1, 2] + ([4] if len(cores) >= 10 else [])
    runs: dict[int, dict[str, Any]] = {}
    for n in counts:
        runs[n] = scale_run(workdir / f"scale-{n}", n, args.seconds)
    for n, r in runs.items():
        out[f"{n} gateway(s): requests/s, 256 connections"] = round(r["rps"])
        out[f"{n} gateway(s): gateway CPU per request, us"] = round(r["gateway_cpu_us"], 1)
        out[f"{n} gateway(s): p50/p99 ms"] = f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}"
    for n in counts[1:]:
        out[f"{n} gateways / 1, requests/s"] = round(runs[n]["rps"] / runs[1]["rps"], 2)
    out["cores"] = len(cores)
    out["each part on its own cores"] = runs[counts[-1]]["own_cores"]
    if not runs[counts[-1]]["own_cores"]:
        out["what shares the cores"] = (
            f"gateways, workers and the load generator all on {len(cores)} cores: the ratio says what more "
            "processes cost here, not how they scale; the CPU per request is what carries over"
        )
    out.update(kill(workdir / "kill", args))
    out.update(held(workdir / "held", args))
    return out


# ------------------------------------------------------------------------ idle connections held


def held(workdir: Path, args: Namespace) -> dict[str, Any]:
    """``args.gateway_hold`` idle connections over four gateway processes, then a request on each."""
    want = args.gateway_hold
    per_process = 15_000  # each client process stays under its open-files limit
    clients = max(1, -(-want // per_process))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < per_process + 1000 and hard != resource.RLIM_INFINITY:
        per_process = max(100, hard - 1000)
        clients = max(1, -(-want // per_process))
    # Every request arrives at once: the queues hold them all. Opening tens of thousands of
    # connections takes longer than the default 30 s a connection may wait before its request is
    # whole (a slow client's limit): the first opened would be answered 408.
    gateway_args = ["--max-queue", str(want + 100), "--read-timeout", "600"]
    with LocalCluster(workdir, processes=4, gateway_args=gateway_args) as lc:
        lc.start()
        lc.add_worker("echo")
        lc.wait_workers("echo", 1)
        rss0 = sum(rss_kb(pid) for pid in lc.gateway_pids)
        req = infer_request(lc, "echo", {"x": np.zeros((1, 4), np.float32)})
        shares = [min(per_process, want - i * per_process) for i in range(clients)]
        with ProcessPoolExecutor(clients) as pool:
            results = list(pool.map(_hold, [lc.http_port] * clients, [req] * clients, shares, range(clients)))
        rss1 = sum(rss_kb(pid) for pid in lc.gateway_pids)
        status = lc.status()
    opened = sum(r["opened"] for r in results)
    answered = sum(r["answered"] for r in results)
    codes: dict[str, int] = {}
    for r in results:
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    return {
        "held: idle connections over 4 gateway processes": opened,
        "held: answered 200 (one request each, all at once)": answered,
        "held: all outcomes": codes,
        "held: gateways' memory growth, MB (all four)": round((rss1 - rss0) / 1024, 1),
        "held: memory per connection, KB": round((rss1 - rss0) / max(1, opened), 1),
        "held: seconds to open all": round(max(r["open_s"] for r in results), 1),
        "held: seconds to answer all": round(max(r["answer_s"] for r in results), 1),
        "held: gateways still serving": bool(status["models"]),
    }


def _hold(port: int, req: bytes, n: int, k: int) -> dict[str, Any]:
    """Open ``n`` connections from source address 127.0.0.(k+2) (each source address has its own
    ephemeral ports), hold them all, then send one request on each, all at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return asyncio.run(_hold_async(port, req, n, f"127.0.0.{k + 2}"))


async def _hold_async(port: int, req: bytes, n: int, source: str) -> dict[str, Any]:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    sem = asyncio.Semaphore(256)
    t0 = time.perf_counter()

    async def open_one() -> None:
        async with sem:
            conns.append(await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)))

    await asyncio.gather(*(open_one() for _ in range(n)), return_exceptions=True)
    t1 = time.perf_counter()

    async def ask(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> str:
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
        key = a if isinstance(a, str) else type(a).__name__
        codes[key] = codes.get(key, 0) + 1
    return {
        "opened": len(conns),
        "answered": codes.get("200", 0),
        "codes": codes,
        "open_s": t1 - t0,
        "answer_s": t2 - t1,
    }


# ------------------------------------------------------------------------ a gateway killed under load


def kill(workdir: Path, args: Namespace) -> dict[str, Any]:
    """Two gateways of one cluster (their own processes and HTTP ports, as on two machines) under
    devices' load through central; one SIGKILLed half way."""
    import secrets

    from shoal.local import LocalCentral

    seconds = max(8.0, 2 * args.seconds)
    with LocalCentral(workdir / "central", extra_args=["--report-interval", "0.5"]) as central:
        central.start()
        password = secrets.token_hex(12)
        central.add_account("cluster", "bench-site", password)
        devices = {f"bench-cam-{i}": secrets.token_hex(8) for i in range(4)}
        for d, pw in devices.items():
            central.add_account("device", d, pw)
        first = LocalCluster(
            workdir / "g0", name="bench-site", central_urls=[central.url], central_password=password
        )
        second = LocalCluster(
            workdir / "g1",
            name="bench-site",
            secret=first.secret,
            api_key=first.api_key,
            central_urls=[central.url],
            central_password=password,
        )
        gws = [first, second]
        try:
            for i, lc in enumerate(gws):
                lc.gateway_args = [f"--gateway-id=g{i}"]
                lc.start()
            for _ in range(2):
                first.add_worker("echo")  # told of g0 only: central names g1 to them
            for lc in gws:
                lc.wait_workers("echo", 2, timeout=60)
            central.wait_routable(["bench-site"], "echo")
            _wait_gateways_serving(central, "bench-site", 2)
            out, timeline = asyncio.run(_kill_run(central.url, devices, gws, seconds))
            out["kill: timeline plot"] = str(_plot_kill(timeline, workdir / "gateway-kill.png"))
            return out
        finally:
            for lc in gws:
                lc.stop()


def _wait_gateways_serving(central: Any, cluster: str, n: int, timeout: float = 30.0) -> None:
    """Until central lists ``n`` live gateways of the cluster with workers (so every route names them)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        code, body = central.call("GET", "/v1/clusters")
        for c in body.get("clusters", []) if code == 200 else []:
            if (
                c["name"] == cluster
                and sum(1 for g in c["gateways"] if g["live"] and g["load"] is not None) >= n
            ):
                return
        time.sleep(0.05)
    raise TimeoutError(f"central did not list {n} serving gateways of {cluster} within {timeout:g} s")


async def _kill_run(
    central: str, devices: dict[str, str], gws: list[LocalCluster], seconds: float
) -> dict[str, Any]:
    from shoal.client.device import AsyncClient

    x = {"x": np.zeros((1, 16), np.float32)}
    done: list[tuple[float, float, str]] = []  # (sent, answered, gateway URL)
    failed: list[str] = []
    t0 = time.monotonic()
    end = t0 + seconds
    kill_at = t0 + seconds / 2
    killed: dict[str, float] = {}

    async def device(name: str, pw: str) -> None:
        async with AsyncClient(central, name, pw, timeout=10.0) as c:

            async def one_slot() -> None:
                while time.monotonic() < end:
                    t = time.monotonic()
                    try:
                        r = await c.infer("echo", x)
                    except Exception as e:  # every failure is counted
                        failed.append(f"{type(e).__name__}: {e}")
                    else:
                        done.append((t, time.monotonic(), r.gateway))

            await asyncio.gather(*(one_slot() for _ in range(16)))

    async def killer() -> None:
        await asyncio.sleep(kill_at - time.monotonic())
        # The gateway that answered most so far: the one carrying load.
        urls = [g for _, _, g in done]
        victim = max(gws, key=lambda lc: urls.count(lc.url))
        survivor = next(lc for lc in gws if lc is not victim)
        assert victim.gateway is not None
        victim.gateway.signal(9)
        killed["t"] = time.monotonic()
        killed["share"] = urls.count(victim.url) / max(1, len(urls))
        killed["survivor"] = survivor.url  # type: ignore[assignment]
        while time.monotonic() < end:  # until the workers count one gateway fewer
            try:
                st = await asyncio.to_thread(survivor.status)
            except (OSError, RuntimeError):
                st = {"models": []}
            links = [w["load"].get("links") for m in st["models"] for w in m["workers"]]
            if links and all(n == 1 for n in links):
                killed["noticed"] = time.monotonic()
                return
            await asyncio.sleep(0.05)

    await asyncio.gather(killer(), *(device(n, pw) for n, pw in devices.items()))
    kt = killed["t"]
    after = [(b - a) for a, b, _ in done if kt <= a < kt + 1.0]
    steady = [(b - a) for a, b, _ in done if kt - 3.0 <= a < kt]  # the three seconds before
    later = [g for a, _, g in done if a >= kt + 1.0]
    p50_before, p99_before = percentiles(steady) if steady else (float("nan"), float("nan"))
    _, p99_after = percentiles(after) if after else (float("nan"), float("nan"))
    timeline = {
        "done": [(a - t0, b - t0) for a, b, _ in done],
        "kill": kt - t0,
        "noticed": killed.get("noticed", kt) - t0,
    }
    return {
        "kill: requests answered": len(done),
        "kill: requests failed": len(failed),
        "kill: first failures": failed[:3],
        "kill: devices / in flight": f"{len(devices)} / {16 * len(devices)}",
        "kill: killed gateway's share before": round(killed["share"], 2),
        "kill: p50/p99 ms in the 3 s before the kill": f"{p50_before:.1f} / {p99_before:.1f}",
        "kill: p99 ms of requests sent in the second after": round(p99_after, 1),
        "kill: workers counted one gateway fewer after, s": round(
            killed.get("noticed", float("nan")) - kt, 3
        ),
        "kill: survivor's share of answers after that second": round(
            sum(1 for g in later if g == killed["survivor"]) / max(1, len(later)), 3
        ),
    }, timeline


def _plot_kill(timeline: dict[str, Any], path: Path) -> Path:
    """Answers per second and the p99 latency of the requests sent in each 200 ms, the kill marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = np.asarray(timeline["done"]) if timeline["done"] else np.zeros((0, 2))
    width = 0.2
    edges = np.arange(0.0, float(done[:, 1].max()) + width if len(done) else 1.0, width)
    answered, _ = np.histogram(done[:, 1], edges)
    p99 = []
    for lo in edges[:-1]:
        lat = done[(done[:, 0] >= lo) & (done[:, 0] < lo + width)]
        p99.append(float(np.percentile(lat[:, 1] - lat[:, 0], 99) * 1000) if len(lat) else np.nan)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    top.plot(edges[:-1], answered / width, drawstyle="steps-post")
    top.set_ylabel("answers/s")
    bottom.plot(edges[:-1], p99, drawstyle="steps-post", color="tab:red")
    bottom.set_ylabel("p99 ms (by time sent)")
    bottom.set_xlabel("seconds")
    for ax in (top, bottom):
        ax.axvline(timeline["kill"], color="black", linestyle="--", label="one gateway SIGKILLed")
        ax.axvline(timeline["noticed"], color="grey", linestyle=":", label="workers count one fewer")
    top.legend(loc="lower left", fontsize=8)
    top.set_title("Two gateways of one cluster, one killed under devices' load: none failed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
