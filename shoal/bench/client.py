"""The device client's own cost per request: one request at a time against a trivial model, the
client's CPU time per request (its process, measured from ``/proc``) and the p50 a device sees,
for ``OipHttpClient`` (one gateway) and ``Client`` (routed through central).

The client runs in a child process (this file run as a script, importing only ``shoal.client``), so
with ``--baseline DIR`` the same measurement runs the client of another shoal source tree, alternating.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np


def measure(gateway: str, token: str, central: str, device: str, password: str, n: int) -> dict[str, float]:
    """Runs in the child: ``n`` requests with each client; CPU us per request and p50 ms."""
    from shoal.client import Client, OipHttpClient

    x = {"x": np.zeros((1, 16), np.float32)}
    out: dict[str, float] = {}
    with OipHttpClient(gateway, token) as direct, Client(central, device, password) as routed:
        for name, call in (("direct", lambda: direct.infer("echo", x)), ("routed", lambda: routed.infer("echo", x))):
            for _ in range(200):
                call()
            lat = []
            c0 = time.process_time()
            for _ in range(n):
                t = time.perf_counter()
                call()
                lat.append(time.perf_counter() - t)
            out[f"{name}_cpu_us"] = (time.process_time() - c0) / n * 1e6
            out[f"{name}_p50_ms"] = float(np.percentile(lat, 50)) * 1000
    return out


def _child(args: list[str], source: Path | None, cpu: int | None) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = dict(os.environ)
    if source is not None:  # that tree's shoal first on the path
        env["PYTHONPATH"] = str(source)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=source or None)
    if r.returncode != 0:
        raise RuntimeError(f"client measurement failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def client(workdir: Path, args: Namespace) -> dict[str, Any]:
    """Client CPU per request and p50, this tree (and ``--baseline DIR``'s client, alternating)."""
    from shoal.bench.process import CPU_CLIENT, CPU_SERVER, two_cores
    from shoal.local import LocalCentral

    baseline = Path(args.baseline).resolve() if getattr(args, "baseline", None) else None
    pinned = two_cores()
    n = 2000
    central = LocalCentral(workdir / "central").start()
    lc = central.start_cluster(workdir / "site", "site-a")
    runs: dict[str, list[dict[str, float]]] = {"this": [], "baseline": []}
    try:
        lc.add_worker("echo", cpu=CPU_SERVER if pinned else None)
        central.add_account("device", "bench-cam", "bench-password")
        lc.wait_workers("echo", 1)
        central.wait_routable({"site-a"}, "echo")
        child_args = [lc.url, lc.api_key, central.url, "bench-cam", "bench-password", str(n)]
        for _ in range(2):
            runs["this"].append(_child(child_args, None, CPU_CLIENT if pinned else None))
            if baseline is not None:
                runs["baseline"].append(_child(child_args, baseline, CPU_CLIENT if pinned else None))
    finally:
        lc.stop()
        central.stop()
    out: dict[str, Any] = {"requests per client and run": n, "client pinned to its own core": pinned}
    for name in ("direct", "routed"):
        for who, rs in runs.items():
            if rs:
                cpu = " / ".join(f"{r[f'{name}_cpu_us']:.0f}" for r in rs)
                p50 = " / ".join(f"{r[f'{name}_p50_ms']:.3f}" for r in rs)
                label = "this tree" if who == "this" else baseline.name if baseline else who
                out[f"{name}: client CPU us/request, {label}"] = cpu
                out[f"{name}: p50 ms, {label}"] = p50
    return out


if __name__ == "__main__":
    gw, tok, ctl, dev, pw, count = sys.argv[1:7]
    print(json.dumps(measure(gw, tok, ctl, dev, pw, int(count))))
