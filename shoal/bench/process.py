"""Measurements of processes shared by the benchmark suites: pinning to a core, CPU time and memory
of a process (Linux ``/proc``), latency percentiles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CPU_SERVER = 0  # the core the measured server side is pinned to, where pinning is asked for
CPU_CLIENT = 1


def progress(message: str) -> None:
    """A progress line inside a long suite (the results come at its end)."""
    import time

    print(f"  .. {time.strftime('%H:%M:%S')} {message}", flush=True)


def pin_self(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {cpu})


def unpin_self() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def two_cores() -> bool:
    return hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peak_rss_kb(pid: int) -> int:
    """The most resident memory the process has had (since it started, or since ``reset_peak``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    """Start ``peak_rss_kb`` afresh from the current resident memory (Linux: clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds of durations in seconds."""
    a = np.asarray(samples) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))
