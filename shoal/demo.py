"""``shoal demo``: the whole system on one machine, under load, with a failure part way.

Starts a central server (SQLite), two clusters of two gateway processes each that report to it, and
workers serving the MNIST CNN (each linked to both gateways of its cluster), all as real processes.
Many simulated devices, each with its own account, ask central for a route and send real MNIST test
images (PNG files, as a camera would) to the cluster they were sent to. Part way, one worker is
killed with SIGKILL, and later one gateway process (its supervisor restarts it). The summary says what
happened: requests, failures, accuracy, latency, throughput, and which cluster and worker served how
much. Exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import sys

HELP = "Run central, two clusters and their workers on this machine under load; kill a worker and a gateway; summarise."
EXAMPLE = """
shoal demo                      # about 20 s: 3000 images from 32 devices, a worker and a gateway killed
shoal demo --requests 10000 --devices 64 --json
shoal demo --elastic            # about 75 s: workers follow a day of load; a model woken from zero
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=3000, help="images to send in all (default %(default)s)")
    p.add_argument(
        "--devices",
        type=int,
        default=32,
        help="simulated devices, each with its own account (default %(default)s)",
    )
    p.add_argument("--clusters", type=int, default=2, help="clusters (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="workers per cluster (default %(default)s)")
    p.add_argument(
        "--gateways", type=int, default=2, help="gateway processes per cluster (default %(default)s)"
    )
    p.add_argument(
        "--kill-at",
        type=float,
        default=0.4,
        help="fraction of requests after which a worker is killed (0: none; default %(default)s)",
    )
    p.add_argument(
        "--kill-gateway-at",
        type=float,
        default=0.7,
        help="fraction of requests after which one gateway process of the first cluster is killed "
        "(0: none; needs --gateways 2 or more; default %(default)s)",
    )
    p.add_argument("--model", default="mnist-cnn", help="model to serve (default %(default)s)")
    p.add_argument("--repo", default=None, help="model repository (default: the models bundled with shoal)")
    p.add_argument(
        "--workdir",
        default=None,
        help="folder for the database and process logs (default: a temporary folder, removed at the end "
        "unless --keep or the demo failed)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder of logs at the end")
    p.add_argument(
        "--elastic",
        action="store_true",
        help="capacity following load: devices come and go over a compressed day while the cluster's "
        "autoscaler starts and drains workers (see --day-s)",
    )
    p.add_argument(
        "--day-s", type=float, default=60.0, help="--elastic: length of the day in seconds (default %(default)s)"
    )
    p.add_argument("--think-ms", type=float, default=5.0, help="--elastic: pause between a device's images")
    p.add_argument(
        "--plot",
        default=None,
        help="--elastic: where to write the PNG (default: elastic.png in --workdir, else shoal-demo-elastic.png "
        "in the temporary directory)",
    )
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    small = [f"--{k}" for k in ("requests", "devices", "clusters", "workers", "gateways") if getattr(args, k) < 1]
    if small:
        print(f"shoal demo: {', '.join(small)} must be at least 1", file=sys.stderr)
        return 2
    if args.elastic:
        from shoal import demo_elastic

        if args.devices == 32:  # the plain demo's default: the elastic day peaks lower on two cores
            args.devices = 24
        return demo_elastic.run(args)
    import asyncio
    import json
    import secrets
    import signal
    import tempfile
    import time
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from shoal.aio import run as aio_run
    from shoal.bundled import bundled_repo
    from shoal.client.device import AsyncClient
    from shoal.data import to_png
    from shoal.data.mnist import DatasetError, load_mnist
    from shoal.local import LocalCentral, LocalCluster
    from shoal.modelrepo.manifest import ManifestError, resolve

    repo = args.repo or str(bundled_repo())
    try:
        resolve(repo, args.model)
        images, labels = load_mnist("test")
    except (ManifestError, DatasetError) as e:
        print(f"shoal demo: {e}", file=sys.stderr)
        return 2
    n_img = min(args.requests, len(images))
    pngs = [to_png(images[i]) for i in range(n_img)]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="shoal-demo-"))
    t_start = time.monotonic()
    central = LocalCentral(workdir)
    clusters: list[LocalCluster] = []
    killed: dict[str, object] = {}
    status: list[dict] = []
    latencies: list[float] = []
    per_cluster: dict[str, int] = {}
    failures: list[str] = []
    correct = ok = 0
    try:
        central.start()
        for c in range(args.clusters):
            name = f"cluster-{chr(ord('a') + c)}"
            lc = central.start_cluster(workdir / name, name, processes=args.gateways)
            clusters.append(lc)
            for _ in range(args.workers):
                lc.add_worker(args.model, repo=repo)
        device_pw = {f"device-{i:03d}": secrets.token_hex(8) for i in range(args.devices)}
        for d, pw in device_pw.items():
            central.add_account("device", d, pw)
        for lc in clusters:
            lc.wait_workers(args.model, args.workers, timeout=60)
        central.wait_routable([lc.name for lc in clusters], args.model)
        print(
            f"shoal demo: central at {central.url}, {args.clusters} clusters x {args.workers} workers of {args.model}, "
            f"{args.devices} devices; up in {time.monotonic() - t_start:.1f} s (logs in {workdir})",
            flush=True,
        )
        kill_after = int(args.requests * args.kill_at) if args.kill_at > 0 and args.workers > 1 else -1
        kill_gw_after = (
            int(args.requests * args.kill_gateway_at)
            if args.kill_gateway_at > 0 and args.gateways > 1
            else -1
        )
        bar = tqdm(total=args.requests, unit="img", disable=args.no_progress, desc="devices", leave=False)
        done = 0

        async def device(name: str, pw: str, indices: range) -> None:
            nonlocal correct, ok, done
            async with AsyncClient(central.url, name, pw, timeout=15.0) as client:
                for i in indices:
                    try:
                        r = await client.infer(args.model, image=pngs[i % n_img])
                    except Exception as e:  # every failure is reported in the summary
                        failures.append(f"{name} image {i}: {e}")
                    else:
                        ok += 1
                        latencies.append(r.latency_ms)
                        per_cluster[r.cluster] = per_cluster.get(r.cluster, 0) + 1
                        correct += int(str(r.label()) == str(int(labels[i % n_img])))
                    done += 1
                    bar.update(1)
                    if done == kill_after:
                        victim = clusters[0].workers[0]
                        victim.signal(signal.SIGKILL)
                        killed.update(worker=victim.name, pid=victim.pid, after=done)
                        bar.write(
                            f"shoal demo: killed worker {victim.name} (pid {victim.pid}) with SIGKILL after {done} images"
                        )
                    if done == kill_gw_after:
                        pid = clusters[0].kill_gateway(0)
                        killed.update(
                            gateway=f"{clusters[0].name} gateway process 0",
                            gateway_pid=pid,
                            gateway_after=done,
                        )
                        bar.write(
                            f"shoal demo: killed gateway process 0 of {clusters[0].name} (pid {pid}) with SIGKILL "
                            f"after {done} images; its supervisor restarts it"
                        )

        async def all_devices() -> float:
            t = time.perf_counter()
            names = list(device_pw)
            await asyncio.gather(
                *(device(n, device_pw[n], range(k, args.requests, len(names))) for k, n in enumerate(names))
            )
            return time.perf_counter() - t

        elapsed = aio_run(all_devices())
        bar.close()
        status = [lc.status() for lc in clusters]
    finally:
        for lc in clusters:
            lc.stop()
        central.stop()

    workers: dict[str, int] = {}
    for st in status:  # each worker's own count (it serves every gateway of its cluster)
        for w in [*st["departed_workers"], *(w for m in st["models"] for w in m["workers"])]:
            served = w.get("load", {}).get("served", w["served"])
            workers[w["worker_id"]] = max(served, workers.get(w["worker_id"], 0))
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    summary = {
        "requests": args.requests,
        "ok": ok,
        "failed": args.requests - ok,
        "accuracy": round(correct / ok, 4) if ok else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "rps": round(ok / elapsed, 1),
        "devices": args.devices,
        "clusters": dict(sorted(per_cluster.items())),
        "workers": dict(sorted(workers.items())),
        "killed": killed or None,
        "model": args.model,
    }
    _print_summary(summary, failures)
    from shoal.demo_elastic import tidy

    tidy(workdir, args, summary["failed"] == 0)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


def _print_summary(s: dict, failures: list[str]) -> None:
    rows = [
        ("requests", s["requests"]),
        ("ok", s["ok"]),
        ("failed", s["failed"]),
        ("accuracy", f"{s['accuracy'] * 100:.2f} %"),
        ("latency p50", f"{s['p50_ms']:.2f} ms"),
        ("latency p99", f"{s['p99_ms']:.2f} ms"),
        ("throughput", f"{s['rps']:.0f} requests/s"),
        ("devices", s["devices"]),
    ]
    print("\nshoal demo summary")
    for k, v in rows:
        print(f"  {k:<14} {v}")
    print("  served by cluster:")
    for k, v in s["clusters"].items():
        print(f"    {k:<22} {v:>7}")
    print("  served by worker (the killed one's unanswered requests went to the others):")
    for k, v in s["workers"].items():
        tag = "  (killed with SIGKILL)" if s["killed"] and k == s["killed"].get("worker") else ""
        print(f"    {k:<22} {v:>7}{tag}")
    if s["killed"] and "gateway" in s["killed"]:
        k = s["killed"]
        print(
            f"  killed with SIGKILL after {k['gateway_after']} images: {k['gateway']} (pid {k['gateway_pid']})"
        )
    for f in failures[:10]:
        print(f"  failure: {f}")
