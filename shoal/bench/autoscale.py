"""``shoal bench autoscale``: capacity following load, measured with real processes on this machine.

Every run drives the MNIST CNN (one request per model call, so the model is what limits, as a large
model would) through a gateway whose autoscaler starts and drains workers with the local engine:

* step: from one worker at low load, a step to high load; seconds until the first request answered by
  a worker that did not exist at the step (median of three steps);
* cycles: high and low load in turn until at least 20 scale events: requests lost, and p99 latency of
  requests answered within two seconds of a scale event against the others of the same run;
* day: the day-shaped trace (shoal.autoscale.traces) compressed into a minute, devices pausing 5 ms
  between images, once autoscaled (scale-down window and cool-down scaled with the day) and once on
  a static fleet sized for the autoscaled run's peak: worker-seconds and p99 of each;
* wake: a model at zero workers, woken by one request, three times: that request's latency;
* ray: the step and the wake again with the ray engine (workers as actors of a Ray head started on
  loopback for the run), where Ray is installed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from shoal.autoscale.traces import day_shape
from shoal.bench.loadgen import http_request
from shoal.local import LocalCluster

MODEL = "mnist-cnn"
POLL_S = 0.1
THINK_S = 0.005  # the day's devices pause between images, as the elastic demo's do


@dataclass
class Answers:
    """(wall time answered, latency s, HTTP status) of every request of a run."""

    rows: list[tuple[float, float, int]] = field(default_factory=list)

    def lost(self) -> int:
        return sum(1 for _, _, s in self.rows if s != 200)

    def p99_ms(self, keep=lambda t: True) -> float:
        lat = [dt for t, dt, s in self.rows if s == 200 and keep(t)]
        return round(float(np.percentile(lat, 99)) * 1000, 1) if lat else float("nan")


async def _client(
    port: int, req: bytes, active, answers: Answers, stop: asyncio.Event, i: int, think_s: float = 0.0
) -> None:
    """One keep-alive device that sends whenever ``active(i)`` says so, pausing ``think_s`` after each
    answer (a camera's time between frames; 0: at once, the most load one connection can offer)."""
    reader = writer = None
    while not stop.is_set():
        if not active(i):
            await asyncio.sleep(0.05)
            continue
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t = time.perf_counter()
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        n = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
        await reader.readexactly(n)
        answers.rows.append((time.time(), time.perf_counter() - t, status))
        if think_s:
            await asyncio.sleep(think_s)
    if writer is not None:
        writer.close()


def _drive(
    port: int, req: bytes, clients: int, active, seconds: float, on_tick=None, think_s: float = 0.0
) -> Answers:
    answers = Answers()

    async def main() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_client(port, req, active, answers, stop, i, think_s)) for i in range(clients)]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(POLL_S)
            if on_tick is not None:
                await asyncio.to_thread(on_tick)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    return answers


def _gateway(workdir: Path, models: dict, engine: dict | None = None) -> LocalCluster:
    """A gateway autoscaling ``models``; ``engine``: keys of the autoscale block that choose another
    engine than local (``{"engine": "ray", "ray": {...}}``)."""
    cfg = workdir / "gateway.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump({"autoscale": {"engine": "local", "workdir": str(workdir / "workers"),
                                                 "interval_s": 0.25, "models": models, **(engine or {})}}))
    return LocalCluster(workdir, gateway_args=["--config", str(cfg)]).start(timeout=120)


def _policy(**kw: Any) -> dict[str, Any]:
    return {"min": 1, "max": 4, "target_utilisation": 0.5, "scale_up_window_s": 0.5, "scale_down_window_s": 3,
            "cooldown_s": 2, "max_step": 2, "worker_args": ["--max-batch-size", "1"], **kw}


def _request(lc: LocalCluster, model: str = MODEL) -> bytes:
    import io

    from PIL import Image

    from shoal.data import load_mnist

    img = load_mnist("test")[0][0]
    b = io.BytesIO()
    Image.fromarray(img).save(b, "PNG")
    headers = {"Authorization": f"Bearer {lc.api_key}", "Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": "0"}
    return http_request(f"/v2/models/{model}/infer", b.getvalue(), headers)


def _workers(lc: LocalCluster, model: str = MODEL) -> dict[str, int]:
    """Connected workers of ``model`` and what each served."""
    return {w["worker_id"]: w["served"] for m in lc.status()["models"] if m["name"] == model for w in m["workers"]}


def _settle(lc: LocalCluster, n: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while len(_workers(lc)) != n:
        if time.monotonic() > end:
            raise TimeoutError(f"{MODEL} did not settle at {n} workers")
        time.sleep(POLL_S)


def step(workdir: Path, high: int = 16, steps: int = 3, engine: dict | None = None, **policy: Any) -> dict[str, Any]:
    lc = _gateway(workdir, {MODEL: _policy(**policy)}, engine)
    try:
        lc.wait_workers(MODEL, 1, timeout=60)
        req = _request(lc)
        delays: list[float] = []
        for _ in range(steps):
            _settle(lc, 1)
            before = set(_workers(lc))
            t_step = time.monotonic()
            seen: list[float] = []

            def tick(before=before, t_step=t_step, seen=seen) -> None:
                if not seen and any(n > 0 for w, n in _workers(lc).items() if w not in before):
                    seen.append(time.monotonic() - t_step)

            _drive(lc.http_port, req, high, lambda i: True, 8.0, tick)
            if seen:
                delays.append(seen[0])
        return {
            "step_to_new_worker_median_s": round(statistics.median(delays), 2) if delays else None,
            "step_to_new_worker_max_s": round(max(delays), 2) if delays else None,
            "steps_measured": len(delays),
        }
    finally:
        lc.stop()


def cycles(workdir: Path, high: int = 16, min_events: int = 20, period_s: float = 12.0) -> dict[str, Any]:
    lc = _gateway(workdir, {MODEL: _policy()})
    try:
        lc.wait_workers(MODEL, 1, timeout=60)
        req = _request(lc)
        t0 = time.monotonic()
        events: list[dict] = []
        answers = Answers()
        for _ in range(12):
            a = _drive(lc.http_port, req, high,
                       lambda i: (time.monotonic() - t0) % period_s < period_s / 2 or i == 0, period_s)
            answers.rows += a.rows
            events = lc.status()["autoscale"]["events"]
            counts = lc.status()["autoscale"]["counts"]
            if counts["up"] + counts["down"] >= min_events:
                break
        counts = lc.status()["autoscale"]["counts"]
        times = [e["time"] for e in events if e["kind"] in ("up", "down")]

        def near(t: float) -> bool:
            return any(-0.5 <= t - e <= 2.0 for e in times)

        return {
            "scale_events": counts["up"] + counts["down"],
            "requests": len(answers.rows),
            "lost": answers.lost(),
            "p99_near_scale_events_ms": answers.p99_ms(near),
            "p99_elsewhere_ms": answers.p99_ms(lambda t: not near(t)),
        }
    finally:
        lc.stop()


def _one_day(
    workdir: Path, policy: dict[str, Any], day_s: float, peak: int, think_s: float
) -> tuple[Answers, list[tuple[float, int]]]:
    """The day-shaped trace against one gateway: the answers, and (time, connected workers) samples."""
    lc = _gateway(workdir, {MODEL: policy})
    try:
        lc.wait_workers(MODEL, policy["min"], timeout=60)
        req = _request(lc)
        t0 = time.monotonic()
        live: list[tuple[float, int]] = []
        answers = _drive(
            lc.http_port,
            req,
            peak,
            lambda i: i < round(peak * day_shape((time.monotonic() - t0) / day_s)),
            day_s,
            lambda: live.append((time.monotonic(), len(_workers(lc)))),
            think_s,
        )
        return answers, live
    finally:
        lc.stop()


def day(workdir: Path, day_s: float = 60.0, peak: int = 16, think_s: float = THINK_S) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fleet = 0
    for kind in ("autoscaled", "static"):
        # The windows scale with the compressed day, as the demo's do: 1 s of a 60 s day is 24 minutes
        # of a real one (Kubernetes' HPA waits 5 minutes before it scales down).
        windows = {"scale_down_window_s": day_s / 60, "cooldown_s": day_s / 60}
        policy = _policy(**windows) if kind == "autoscaled" else _policy(min=fleet, max=fleet)
        answers, live = _one_day(workdir / kind, policy, day_s, peak, think_s)
        # Connected workers integrated over the day.
        out[f"{kind}_worker_seconds"] = round(sum(n * (t1 - t) for (t, n), (t1, _) in zip(live, live[1:], strict=False)), 1)
        out[f"{kind}_p99_ms"] = answers.p99_ms()
        out[f"{kind}_lost"] = answers.lost()
        if kind == "autoscaled":
            fleet = max(n for _, n in live)
            out["static_fleet_workers"] = fleet
    out["worker_seconds_saved"] = round(1 - out["autoscaled_worker_seconds"] / out["static_worker_seconds"], 3)
    out["p99_ratio_autoscaled_to_static"] = round(out["autoscaled_p99_ms"] / out["static_p99_ms"], 2)
    return out


def wake(workdir: Path, times: int = 3, engine: dict | None = None, **policy: Any) -> dict[str, Any]:
    lc = _gateway(workdir, {MODEL: _policy(min=0, idle_to_zero_s=2, scale_down_window_s=1, cooldown_s=0.5, **policy)},
                  engine)
    try:
        req = _request(lc)
        waits: list[float] = []
        for _ in range(times):
            _settle(lc, 0)
            a = _drive(lc.http_port, req, 1, lambda i: True, 0.05)  # one client, stops after its request
            ok = [dt for _, dt, s in a.rows if s == 200]
            if ok:
                waits.append(ok[0])
        return {"wake_latency_median_s": round(statistics.median(waits), 2) if waits else None,
                "wake_latency_max_s": round(max(waits), 2) if waits else None, "wakes": len(waits)}
    finally:
        lc.stop()


def on_ray(workdir: Path) -> dict[str, Any]:
    """The step and the wake-up again with the ray engine, against a Ray head started here on loopback
    (two CPUs, workers of half a CPU each): keys prefixed ``ray_``."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return {"ray": "not run: Ray is not installed (pip install 'shoal[ray]')"}
    from shoal.autoscale.ray_engine import LocalRayHead

    head = LocalRayHead(workdir / "head", cpus=2).start()
    try:
        engine = {"engine": "ray", "ray": {"address": head.address, "namespace": "shoal-bench"}}
        res = {**step(workdir / "step", engine=engine, resources={"cpus": 0.5}),
               **wake(workdir / "wake", engine=engine, resources={"cpus": 0.5})}
    finally:
        head.stop()
    return {f"ray_{k}": v for k, v in res.items()}


def autoscale(workdir: Path, args: Namespace) -> dict[str, Any]:
    from shoal.bench.process import progress

    res: dict[str, Any] = {"engine": "local"}
    parts = (
        ("step", "a load step to a new worker serving", step),
        ("wake", "a model woken from zero", wake),
        ("cycles", "20+ scale events, requests lost", cycles),
        ("day", "a day-shaped trace against a static fleet", day),
        ("ray", "the step and the wake-up on the ray engine", on_ray),
    )
    for i, (name, what, part) in enumerate(parts, 1):
        progress(f"autoscale {i}/{len(parts)}: {what}")
        res.update(part(workdir / name))
    return res
