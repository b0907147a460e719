"""The soak suite: memory of a gateway and a worker over a long run with workers killed and replaced."""

from __future__ import annotations

import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench.process import progress, rss_kb
from shoal.bench.serving import infer_request, run_load
from shoal.local import LocalCluster


def soak(workdir: Path, args: Namespace) -> dict[str, Any]:
    """Steady load for ``--soak-seconds`` with a worker killed and replaced every so often; the
    gateway's and a long-lived worker's memory sampled throughout: it should stay flat."""
    import signal
    import threading

    total_s = args.soak_seconds
    samples: list[tuple[float, int, int]] = []
    with LocalCluster(workdir, gateway_args=["--max-queue", "4096"]) as lc:
        lc.start()
        keeper = lc.add_worker("echo")
        lc.add_worker("echo")
        lc.wait_workers("echo", 2)
        req = infer_request(lc, "echo", {"x": np.zeros((1, 64), np.float32)})
        stop = threading.Event()
        kills = [0]

        def churn() -> None:
            # Every 10 s: SIGKILL the newest worker and start a fresh one, as a failing host would.
            while not stop.wait(10.0):
                victim = lc.workers[-1]
                victim.signal(signal.SIGKILL)
                victim.popen.wait(5)
                lc.workers.remove(victim)
                lc.add_worker("echo")
                kills[0] += 1

        def sample() -> None:
            t0 = time.monotonic()
            said = 0.0
            while not stop.wait(2.0):
                samples.append((time.monotonic() - t0, rss_kb(lc.gateway.pid), rss_kb(keeper.pid)))
                if samples[-1][0] - said >= 30.0:  # a line every 30 s of a run of minutes
                    said = samples[-1][0]
                    progress(
                        f"soak {said:.0f}/{total_s:.0f} s: {kills[0]} workers replaced, gateway RSS "
                        f"{samples[-1][1] / 1024:.1f} MB, worker {samples[-1][2] / 1024:.1f} MB"
                    )

        threads = [threading.Thread(target=churn, daemon=True), threading.Thread(target=sample, daemon=True)]
        for t in threads:
            t.start()
        try:
            res = run_load(lc, req, 32, seconds=total_s)
        finally:
            stop.set()
            for t in threads:
                t.join(15)
    warm = [s for s in samples if s[0] >= total_s * 0.2] or samples
    gw = [s[1] for s in warm]
    wk = [s[2] for s in warm]
    return {
        "seconds under load": total_s,
        "requests (all answered 200)": res.count,
        "workers killed and replaced": kills[0],
        "gateway RSS MB after warm-up: first / max / last": f"{gw[0] / 1024:.1f} / {max(gw) / 1024:.1f} / {gw[-1] / 1024:.1f}",
        "worker RSS MB after warm-up: first / max / last": f"{wk[0] / 1024:.1f} / {max(wk) / 1024:.1f} / {wk[-1] / 1024:.1f}",
    }
