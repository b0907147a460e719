"""``shoal demo --elastic``: capacity following load, on one machine.

A central server and one cluster whose gateway runs the autoscaler with the local engine: the MNIST
CNN between one and four workers, and the digit detector at zero workers, woken by its first request.
Simulated devices come and go along a day compressed into about a minute (a night, a morning rise,
the midday peak, an evening fall), each sending real MNIST test images; a night camera sends the
detector a few images twice in the day. The workers follow: from the minimum up to the peak and back
down, the detector woken and put back to sleep. A timeline is printed as it runs, and at the end a
summary, a PNG of load, workers and p99 latency against time, and with ``--json`` one JSON line.
Exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from shoal.autoscale.traces import day_shape

MODEL = "mnist-cnn"
SLEEPER = "digit-detector"
TICK_S = 0.5  # timeline resolution


@dataclass
class Timeline:
    t: list[float] = field(default_factory=list)
    devices: list[int] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    workers: dict[str, list[int]] = field(default_factory=lambda: {MODEL: [], SLEEPER: []})
    load: list[float] = field(default_factory=list)  # the autoscaler's measure of MODEL's load, in workers


def gateway_config(workdir: Path, day_s: float) -> Path:
    """The autoscale block of the demo's gateway (windows scaled to a day of ``day_s`` seconds)."""
    k = day_s / 60.0
    doc = {
        "autoscale": {
            "engine": "local",
            "workdir": str(workdir / "workers"),
            "interval_s": 0.25,
            "models": {
                # One request per model call, as a large model at batch 1 would be: on a small machine
                # shared by the devices, the gateway and the workers, the model is then what limits.
                MODEL: {"min": 1, "max": 4, "target_utilisation": 0.5, "scale_up_window_s": 0.5,
                        "scale_down_window_s": round(6 * k, 2), "cooldown_s": round(3 * k, 2), "max_step": 2,
                        "worker_args": ["--max-batch-size", "1"]},
                SLEEPER: {"min": 0, "max": 1, "idle_to_zero_s": round(6 * k, 2),
                          "scale_down_window_s": round(3 * k, 2), "cooldown_s": 1},
            },
        }
    }
    p = workdir / "gateway.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def tidy(workdir: Path, args: argparse.Namespace, ok: bool) -> None:
    """Remove the demo's temporary folder when it succeeded, unless asked to keep it; say where it is
    when kept."""
    if args.workdir is not None:
        return
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"shoal demo: logs kept in {workdir}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from shoal.aio import run as aio_run
    from shoal.client.device import AsyncClient
    from shoal.data.mnist import DatasetError, load_mnist
    from shoal.local import LocalCentral, LocalCluster

    try:
        images, labels = load_mnist("test")
    except DatasetError as e:
        print(f"shoal demo: {e}")
        return 2
    from shoal.data import to_png

    pngs = [to_png(images[i]) for i in range(500)]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="shoal-demo-elastic-"))
    workdir.mkdir(parents=True, exist_ok=True)
    day_s = args.day_s
    peak = args.devices
    central = LocalCentral(workdir)
    lc: LocalCluster | None = None
    results: list[tuple[float, float, bool]] = []  # (time done, latency ms, ok)
    failures: list[str] = []
    correct = 0
    tl = Timeline()
    final: dict[str, Any] = {}
    try:
        central.start()
        lc = central.start_cluster(
            workdir / "site-a", "site-a", gateway_args=["--config", str(gateway_config(workdir, day_s))]
        )
        passwords = {f"device-{i:03d}": secrets.token_hex(8) for i in range(peak)}
        passwords["night-camera"] = secrets.token_hex(8)
        for d, pw in passwords.items():
            central.add_account("device", d, pw)
        lc.wait_workers(MODEL, 1, timeout=60)
        central.wait_routable(["site-a"], MODEL)
        print(
            f"shoal demo --elastic: one cluster, {MODEL} autoscaled 1..4 workers, {SLEEPER} asleep at 0; "
            f"a day of {day_s:g} s, up to {peak} devices (logs in {workdir})",
            flush=True,
        )
        print(f"{'t (s)':>6} {'devices':>8} {'req/s':>7} {'p99 ms':>7} {'load':>6} {MODEL + ' workers':>18} "
              f"{SLEEPER + ' workers':>24}")
        t0 = time.monotonic()

        def active(now: float) -> int:
            return round(peak * day_shape((now - t0) / day_s)) if now - t0 < day_s else 0

        async def device(i: int, name: str, pw: str) -> None:
            nonlocal correct
            async with AsyncClient(central.url, name, pw, timeout=30.0) as client:
                k = i
                while time.monotonic() - t0 < day_s:
                    if i >= active(time.monotonic()):
                        await asyncio.sleep(0.1)
                        continue
                    k += peak
                    t = time.monotonic()
                    try:
                        r = await client.infer(MODEL, image=pngs[k % len(pngs)])
                    except Exception as e:  # every failure is reported
                        failures.append(f"{name}: {e}")
                        results.append((time.monotonic() - t0, (time.monotonic() - t) * 1000, False))
                    else:
                        correct += int(str(r.label()) == str(int(labels[k % len(pngs)])))
                        results.append((time.monotonic() - t0, r.latency_ms, True))
                    await asyncio.sleep(args.think_ms / 1000.0)

        async def night_camera() -> None:
            async with AsyncClient(central.url, "night-camera", passwords["night-camera"], timeout=60.0) as client:
                for at in (0.3, 0.75):
                    await asyncio.sleep(max(0.0, t0 + at * day_s - time.monotonic()))
                    for j in range(3):
                        t = time.monotonic()
                        try:
                            await client.infer(SLEEPER, image=pngs[j])
                            results.append((time.monotonic() - t0, (time.monotonic() - t) * 1000, True))
                        except Exception as e:
                            failures.append(f"night-camera: {e}")
                            results.append((time.monotonic() - t0, 0.0, False))

        async def observer() -> None:
            assert lc is not None
            seen = 0
            next_print = 0.0
            while time.monotonic() - t0 < day_s + 2:
                await asyncio.sleep(TICK_S)
                now = time.monotonic() - t0
                st = await asyncio.to_thread(lc.status)
                live = {m["name"]: sum(1 for w in m["workers"] if w["accepting"]) for m in st["models"]}
                window = [r for r in results[seen:] if r[2]]
                seen = len(results)
                lat = [r[1] for r in window]
                tl.t.append(now)
                tl.devices.append(active(time.monotonic()))
                tl.rps.append(len(window) / TICK_S)
                tl.p99_ms.append(float(np.percentile(lat, 99)) if lat else float("nan"))
                for m in tl.workers:
                    tl.workers[m].append(live.get(m, 0))
                scaled = (st.get("autoscale") or {}).get("models", {}).get(f"{MODEL}:1", {})
                tl.load.append(float(scaled.get("load_workers", 0.0)))
                if now >= next_print:
                    next_print += 5.0
                    p99 = f"{tl.p99_ms[-1]:.0f}" if lat else "-"
                    print(f"{now:6.1f} {tl.devices[-1]:>8} {tl.rps[-1]:>7.0f} {p99:>7} {tl.load[-1]:>6.2f} "
                          f"{tl.workers[MODEL][-1]:>18} {tl.workers[SLEEPER][-1]:>24}", flush=True)

        async def everything() -> None:
            await asyncio.gather(
                *(device(i, f"device-{i:03d}", passwords[f"device-{i:03d}"]) for i in range(peak)),
                night_camera(),
                observer(),
            )

        aio_run(everything())
        final = lc.status()
    finally:
        if lc is not None:
            lc.stop()
        central.stop()

    counts = (final.get("autoscale") or {}).get("counts", {})
    ws = {m: float(sum(v) * TICK_S) for m, v in tl.workers.items()}
    static = {m: float(max(v or [0]) * len(v) * TICK_S) for m, v in tl.workers.items()}
    ok = sum(1 for r in results if r[2])
    lat = np.asarray([r[1] for r in results if r[2]] or [float("nan")])
    summary = {
        "requests": len(results),
        "ok": ok,
        "failed": len(results) - ok,
        "accuracy": round(correct / max(1, ok - 6), 4),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "workers_min": min(tl.workers[MODEL] or [0]),
        "workers_max": max(tl.workers[MODEL] or [0]),
        "scale_ups": counts.get("up", 0),
        "scale_downs": counts.get("down", 0),
        "wakeups": counts.get("wake", 0),
        "sleeps": counts.get("sleep", 0),
        "worker_seconds": round(sum(ws.values()), 1),
        "static_worker_seconds": round(sum(static.values()), 1),
        "day_s": day_s,
        "peak_devices": peak,
    }
    summary["saved"] = round(1 - summary["worker_seconds"] / summary["static_worker_seconds"], 3) if summary[
        "static_worker_seconds"
    ] else 0.0
    if args.plot:
        plot = Path(args.plot)
    elif args.workdir or args.keep:
        plot = workdir / "elastic.png"
    else:  # the temporary folder goes at the end: one file in its parent, replaced by the next run
        plot = Path(tempfile.gettempdir()) / "shoal-demo-elastic.png"
    summary["plot"] = str(plot) if _plot(tl, plot) else None
    _print_summary(summary, failures)
    tidy(workdir, args, summary["failed"] == 0)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


def _plot(tl: Timeline, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("shoal demo: no plot (pip install 'shoal[plots]' for matplotlib)")
        return False
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    axes[0].plot(tl.t, tl.rps, color="tab:blue")
    axes[0].set_ylabel("requests / s")
    axes[0].set_title("shoal demo --elastic: workers follow the load")
    axes[1].step(tl.t, tl.workers[MODEL], where="post", label=MODEL, color="tab:green")
    axes[1].step(tl.t, tl.workers[SLEEPER], where="post", label=SLEEPER + " (sleeps at 0)", color="tab:orange")
    axes[1].set_ylabel("live workers")
    axes[1].legend(loc="upper left")
    axes[2].plot(tl.t, tl.p99_ms, color="tab:red")
    axes[2].set_ylabel("p99 latency (ms)")
    axes[2].set_xlabel("time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _print_summary(s: dict, failures: list[str]) -> None:
    print("\nshoal demo --elastic summary")
    rows = [
        ("requests", s["requests"]),
        ("ok", s["ok"]),
        ("failed", s["failed"]),
        ("latency p50 / p99", f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} ms"),
        (f"{MODEL} workers", f"{s['workers_min']} .. {s['workers_max']}"),
        ("scale ups / downs", f"{s['scale_ups']} / {s['scale_downs']}"),
        (f"{SLEEPER} woken / slept", f"{s['wakeups']} / {s['sleeps']}"),
        ("worker-seconds", f"{s['worker_seconds']:.0f} (a fleet sized for the peak: {s['static_worker_seconds']:.0f}, "
         f"{s['saved'] * 100:.0f} % saved)"),
        ("plot", s["plot"] or "-"),
    ]
    for k, v in rows:
        print(f"  {k:<24} {v}")
    for f in failures[:10]:
        print(f"  failure: {f}")
