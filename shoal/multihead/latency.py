"""Latency per image on one CPU core with one thread, in ONNX Runtime: our stand-in for the paper's
Raspberry Pi.

``latency_ms`` runs this module as a fresh process (``python -m shoal.multihead.latency``) that
imports only numpy and ONNX Runtime, pins itself to one core with ``sched_setaffinity``, opens each
model with ``intra_op_num_threads=1`` and ``inter_op_num_threads=1``, runs warm-up passes, then times
many passes of one image and prints the times as JSON. Several models in one group are run one after
the other per image (the 2M approach: a device runs both); several groups are timed in turn.
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


def _measure(
    groups: dict[str, list[str]], image: np.ndarray, runs: int, warmup: int, core: int
) -> dict[str, list[float]]:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    sessions = {name: [_session(p) for p in paths] for name, paths in groups.items()}
    feed = {"image": image}
    for _ in range(warmup):
        for group in sessions.values():
            for s in group:
                s.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in groups}
    names = list(groups)
    for r in range(runs):
        # Round robin, starting from a different group each time: on a shared machine a burst of
        # load then hits every model alike instead of whichever was being timed.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for s in sessions[name]:  # 2M: a device runs both models for every image
                s.run(None, feed)
            times[name].append((time.perf_counter() - t0) * 1000)
    return times


def latency_table(
    groups: dict[str, list[Path]],
    image: np.ndarray,
    runs: int = 200,
    warmup: int = 20,
    core: int | None = None,
) -> dict[str, dict[str, float]]:
    """Per group: median, p10 and p90 milliseconds of running its models on ``image`` [C, H, W], the
    groups timed in turn in one pinned, single-threaded process."""
    if core is None:
        core = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "image.npy"
        np.save(npy, np.ascontiguousarray(image[None], dtype=np.float32))
        spec = Path(tmp) / "groups.json"
        spec.write_text(json.dumps({k: [str(p) for p in v] for k, v in groups.items()}))
        cmd = [
            sys.executable,
            "-m",
            "shoal.multihead.latency",
            str(npy),
            str(spec),
            str(runs),
            str(warmup),
            str(core),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"latency measurement failed: {done.stderr.strip()[-2000:]}")
    out = {}
    for name, times in json.loads(done.stdout.strip().splitlines()[-1]).items():
        q = np.percentile(times, [10, 90])
        out[name] = {
            "median_ms": statistics.median(times),
            "p10_ms": float(q[0]),
            "p90_ms": float(q[1]),
            "runs": runs,
            "core": core,
        }
    return out


def latency_ms(paths: list[Path], image: np.ndarray, runs: int = 200, warmup: int = 20) -> dict[str, float]:
    """Median, p10 and p90 milliseconds of running every model in ``paths`` on ``image``."""
    return latency_table({"model": paths}, image, runs, warmup)["model"]


if __name__ == "__main__":
    npy, spec, runs, warmup, core = sys.argv[1:]
    groups = json.loads(Path(spec).read_text())
    print(json.dumps(_measure(groups, np.load(npy), int(runs), int(warmup), int(core))))
