"""Suites that measure the whole system: how fast a device is re-routed when its cluster dies."""

from __future__ import annotations

import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from shoal.local import LocalCluster


def reroute(workdir: Path, args: Namespace) -> dict[str, Any]:
    """A device's cluster dies: how long until its next request is answered by another cluster, and
    until central has dropped the dead cluster from its route table."""
    import signal

    from shoal.client import Client
    from shoal.local import LocalCentral

    out: dict[str, Any] = {}
    central = LocalCentral(workdir / "central").start()
    clusters: list[LocalCluster] = []
    try:
        for name in ("cluster-a", "cluster-b"):
            lc = central.start_cluster(workdir / name, name)
            lc.add_worker("echo")
            clusters.append(lc)
        central.add_account("device", "bench-device", "bench-password")
        for lc in clusters:
            lc.wait_workers("echo", 1)
        x = {"x": np.ones((1, 4), np.float32)}
        rerouted, dropped = [], []
        with Client(central.url, "bench-device", "bench-password", timeout=5) as c:
            for _ in range(3):
                central.wait_routable({"cluster-a", "cluster-b"}, "echo")
                first = c.infer("echo", x).cluster
                victim = next(lc for lc in clusters if lc.name == first)
                t = time.perf_counter()
                victim.gateway.signal(signal.SIGKILL)
                victim.gateway.popen.wait(5)
                r = c.infer("echo", x)
                rerouted.append(time.perf_counter() - t)
                assert r.cluster != first
                while first in central.routable("echo"):
                    time.sleep(0.02)
                dropped.append(time.perf_counter() - t)
                victim.start(http_port=victim.http_port, worker_port=victim.worker_port)
                victim.wait_workers("echo", 1)
        out["device re-routed after its cluster died, ms (3 runs)"] = " / ".join(
            f"{x * 1000:.1f}" for x in rerouted
        )
        out["central dropped the dead cluster after, s"] = " / ".join(f"{x:.2f}" for x in dropped)
    finally:
        for lc in clusters:
            lc.stop()
        central.stop()
    return out
