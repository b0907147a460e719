"""Latency per image on one CPU core with one thread, in ONNX Runtime: our stand-in for the paper's
Raspberry Pi.

``latency_ms`` runs this module as a fresh process (``python -m shoal.multihead.latency``) that
imports only numpy and ONNX Runtime, pins itself to one core with ``sched_setaffinity``, opens each
model with ``intra_op_num_threads=1`` and ``inter_op_num_threads=1``, runs warm-up passes, then times
many passes of one image and prints the times as JSON. Several models are run one after the other per
image (the 2M approach: a device runs both).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import shoal  # noqa: F401  (sets ORT_DISABLE_TELEMETRY before onnxruntime is imported)


def _session(path: str):  # noqa: ANN202 (onnxruntime is imported lazily)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _measure(paths: list[str], image: np.ndarray, runs: int, warmup: int, core: int) -> list[float]:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    sessions = [_session(p) for p in paths]
    feed = {"image": image}
    for _ in range(warmup):
        for s in sessions:
            s.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for s in sessions:
            s.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def latency_ms(
    paths: list[Path], image: np.ndarray, runs: int = 200, warmup: int = 20, core: int | None = None
) -> dict[str, float]:
    """Median, p10 and p90 milliseconds of running every model in ``paths`` on ``image`` [C, H, W]."""
    if core is None:
        core = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "image.npy"
        np.save(npy, np.ascontiguousarray(image[None], dtype=np.float32))
        cmd = [sys.executable, "-m", "shoal.multihead.latency", str(npy), str(runs), str(warmup), str(core)]
        done = subprocess.run([*cmd, *map(str, paths)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"latency measurement failed: {done.stderr.strip()[-2000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    q = np.percentile(times, [10, 90])
    return {
        "median_ms": statistics.median(times),
        "p10_ms": float(q[0]),
        "p90_ms": float(q[1]),
        "runs": runs,
        "core": core,
    }


if __name__ == "__main__":
    npy, runs, warmup, core, *models = sys.argv[1:]
    print(json.dumps(_measure(models, np.load(npy), int(runs), int(warmup), int(core))))
