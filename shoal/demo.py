"""``shoal demo``: the whole system on one machine, under load, with a failure part way.

Starts a cluster gateway and its workers as real processes serving the MNIST CNN, sends real MNIST
test images (as PNG files, the way a camera would) from many simulated devices, kills one worker with
SIGKILL part way, and prints what happened: requests, failures, accuracy, latency, throughput and who
served how much. Exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse

HELP = "Run the whole system on this machine under load, kill a worker part way, print a summary."
EXAMPLE = """
shoal demo                      # about 20 s: 4000 requests from 32 devices, one worker killed
shoal demo --requests 10000 --devices 64 --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=4000, help="images to send in all (default %(default)s)")
    p.add_argument(
        "--devices", type=int, default=32, help="simulated devices, one connection each (default %(default)s)"
    )
    p.add_argument("--workers", type=int, default=3, help="workers in the cluster (default %(default)s)")
    p.add_argument(
        "--kill-at",
        type=float,
        default=0.4,
        help="fraction of requests after which a worker is killed (default %(default)s; 0: none)",
    )
    p.add_argument("--model", default="mnist-cnn", help="model to serve (default %(default)s)")
    p.add_argument("--repo", default=None, help="model repository (default: the models bundled with shoal)")
    p.add_argument("--workdir", default=None, help="folder for process logs (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _png(img) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import signal
    import tempfile
    import time
    from pathlib import Path

    import numpy as np
    import orjson
    from tqdm import tqdm

    from shoal.bench.loadgen import LoadGenerator, http_request
    from shoal.data.mnist import DatasetError, load_mnist
    from shoal.local import LocalCluster
    from shoal.modelrepo.manifest import ManifestError, resolve
    from shoal.worker.cli import bundled_repo

    repo = args.repo or bundled_repo()
    try:
        resolve(repo, args.model)
        images, labels = load_mnist("test")
    except (ManifestError, DatasetError) as e:
        print(f"shoal demo: {e}")
        return 2
    n_img = min(args.requests, len(images))
    print(f"shoal demo: encoding {n_img} MNIST test images as PNG ...", flush=True)
    pngs = [_png(images[i]) for i in range(n_img)]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="shoal-demo-"))
    lc = LocalCluster(workdir, name="cluster-a")
    t_start = time.monotonic()
    killed: dict[str, object] = {}
    try:
        lc.start()
        for _ in range(args.workers):
            lc.add_worker(args.model, repo=repo)
        lc.wait_workers(args.model, args.workers, timeout=60)
        print(
            f"shoal demo: cluster {lc.name} up at {lc.url} with {args.workers} workers of {args.model} "
            f"in {time.monotonic() - t_start:.1f} s; logs in {workdir}",
            flush=True,
        )
        path = f"/v2/models/{args.model}/infer"
        hdrs = {
            "Authorization": f"Bearer {lc.api_key}",
            "Content-Type": "image/png",
            "Inference-Header-Content-Length": "0",
        }
        reqs = [http_request(path, b, hdrs) for b in pngs]
        correct = 0
        answered_ok = 0
        failures: list[str] = []
        kill_after = int(args.requests * args.kill_at) if args.kill_at > 0 and args.workers > 1 else -1
        bar = tqdm(total=args.requests, unit="req", disable=args.no_progress, desc="devices", leave=False)

        def on_response(i: int, status: int, head: bytes, body: bytes) -> None:
            nonlocal correct, answered_ok
            if status != 200:
                failures.append(f"request {i}: HTTP {status} {body[:120]!r}")
                return
            out = orjson.loads(body)["outputs"][0]["data"]
            answered_ok += 1
            correct += int(int(np.argmax(out)) == int(labels[i % n_img]))

        def on_progress(done: int) -> None:
            bar.update(1)
            if done == kill_after:
                victim = lc.workers[0]
                victim.signal(signal.SIGKILL)
                killed.update(worker=victim.name, pid=victim.pid, after=done)
                bar.write(
                    f"shoal demo: killed worker {victim.name} (pid {victim.pid}) with SIGKILL after {done} requests"
                )

        gen = LoadGenerator(
            "127.0.0.1",
            lc.http_port,
            lambda i: reqs[i % n_img],
            args.devices,
            total=args.requests,
            on_response=on_response,
            on_progress=on_progress,
        )
        result = asyncio.run(gen.run())
        bar.close()
        failures += result.errors
        status = lc.status()
    finally:
        lc.stop()

    served = {w["worker_id"]: w["served"] for w in status["departed_workers"]}
    served.update({w["worker_id"]: w["served"] for m in status["models"] for w in m["workers"]})
    summary = {
        "requests": args.requests,
        "ok": answered_ok,
        "failed": args.requests - answered_ok,
        "accuracy": round(correct / answered_ok, 4) if answered_ok else 0.0,
        "p50_ms": round(result.percentile_ms(50), 2),
        "p99_ms": round(result.percentile_ms(99), 2),
        "rps": round(result.rps, 1),
        "devices": args.devices,
        "clusters": {lc.name: answered_ok},
        "workers": served,
        "killed": killed or None,
        "model": args.model,
    }
    _print_summary(summary, failures)
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
    for k, v in sorted(s["workers"].items()):
        tag = "  (killed with SIGKILL)" if s["killed"] and k == s["killed"]["worker"] else ""
        print(f"    {k:<22} {v:>7}{tag}")
    for f in failures[:10]:
        print(f"  failure: {f}")
