"""What one large request costs a gateway (``shoal bench request-memory``; docs/benchmarks.md has the
figures): its peak memory and how long another client's small requests wait while it is decoded.

The cases are the ones an outside test used (each body about 60 MB, a device's credentials): JSON
strings of one character with a shape that claims one element, JSON numbers likewise, binary BYTES of
two-byte elements, four of the first at once; and the largest request a gateway accepts (60 MB of JSON
numbers for a UINT8 model that sums them). The target: the gateway's peak at most twice the body plus
32 MB, and the largest accepted request delaying other clients' p99 by at most 100 ms.
"""

from __future__ import annotations

import http.client
import statistics
import threading
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from shoal.bench.process import peak_rss_kb, reset_peak, rss_kb
from shoal.local import LocalCluster

MB = 1 << 20
ALLOWANCE_MB = 32
SIZE = 60 * MB


def _json_strings(shape: list[int]) -> bytes:
    n = SIZE // 4
    return b'{"inputs":[{"name":"image","datatype":"BYTES","shape":%s,"data":[' % orjson.dumps(shape) + (
        b'"a",' * (n - 1)
    ) + b'"a"]}]}'


def _json_numbers(name: str, datatype: str, shape: list[int]) -> bytes:
    n = SIZE // 2
    head = orjson.dumps({"name": name, "datatype": datatype, "shape": shape})[:-1]
    return b'{"inputs":[' + head + b',"data":[' + b"1," * (n - 1) + b"1]}]}"


def _binary_bytes() -> tuple[bytes, dict[str, str]]:
    n = SIZE // 6
    blob = (b"\x02\x00\x00\x00ab") * n
    head = orjson.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [n],
                                     "parameters": {"binary_data_size": len(blob)}}]})
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


def _post(port: int, token: str, model: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        h = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **(headers or {})}
        c.request("POST", f"/v2/models/{model}/infer", body, h)
        r = c.getresponse()
        data = r.read()
        try:
            return r.status, orjson.loads(data).get("error", "")[:160]
        except orjson.JSONDecodeError:
            return r.status, data[:160].decode("latin-1")
    finally:
        c.close()


def _measure(lc: LocalCluster, worker_pid: int, sends: list[tuple[str, bytes, dict[str, str]]]) -> dict[str, Any]:
    """Send these requests at once; the gateway's (and a worker's) peak memory above what it held."""
    gw = lc.gateway.pid
    base, wbase = rss_kb(gw), rss_kb(worker_pid)
    reset_peak(gw)
    reset_peak(worker_pid)
    answers: list[tuple[int, str]] = []
    t = time.perf_counter()
    threads = [threading.Thread(target=lambda s=s: answers.append(_post(lc.http_port, lc.api_key, s[0], s[1], s[2])))
               for s in sends]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    body = len(sends[0][1])
    peak = (peak_rss_kb(gw) - base) / 1024
    return {
        "body_mb": round(body / MB, 1),
        "answers": sorted({f"{code} {why}" for code, why in answers}),
        "seconds": round(time.perf_counter() - t, 2),
        "gateway_peak_mb": round(peak, 1),
        "worker_peak_mb": round((peak_rss_kb(worker_pid) - wbase) / 1024, 1),
        "target_mb": round(len(sends) * (2 * body / MB + ALLOWANCE_MB), 1),
        "within_target": peak <= len(sends) * (2 * body / MB + ALLOWANCE_MB),
    }


def _small_p99(lc: LocalCluster, n: int) -> float:
    """p99 in ms of one client's small JSON requests, one after another."""
    x = {"x": np.ones((1, 4), np.float32)}
    times = []
    with lc.client() as c:
        for _ in range(n):
            t = time.perf_counter()
            c.infer("echo", x, binary=False)
            times.append(time.perf_counter() - t)
    return float(np.percentile(np.asarray(times) * 1000, 99))


def _delay_of_largest(lc: LocalCluster, body: bytes, n: int) -> dict[str, Any]:
    """Another client's p99 with the largest accepted request sent back to back, against quiet,
    in alternating rounds (both halves of a pair see the same background load)."""
    quiet, busy, sent = [], [], []
    for _ in range(3):
        quiet.append(_small_p99(lc, n))
        stop = threading.Event()

        def big(stop: threading.Event = stop) -> None:
            while not stop.is_set():
                sent.append(_post(lc.http_port, lc.api_key, "checksum", body)[0])

        th = threading.Thread(target=big)
        th.start()
        time.sleep(0.5)  # the first big request is being read and decoded
        busy.append(_small_p99(lc, n))
        stop.set()
        th.join()
    q, b = statistics.median(quiet), statistics.median(busy)
    return {
        "small_p99_quiet_ms": round(q, 1),
        "small_p99_with_largest_ms": round(b, 1),
        "added_p99_ms": round(b - q, 1),
        "largest_answers": sorted(set(sent)),
        "within_target": b - q <= 100.0,
    }


def request_memory(workdir: Path, args: Namespace) -> dict[str, Any]:
    with LocalCluster(workdir, gateway_args=["--max-body-mb", "64"]) as lc:
        lc.start()
        image = lc.add_worker("mnist-cnn")
        lc.add_worker("checksum")
        lc.add_worker("echo")
        for m in ("mnist-cnn", "checksum", "echo"):
            lc.wait_workers(m, 1)
        _small_p99(lc, 50)  # warm
        binary, bh = _binary_bytes()
        strings = _json_strings([1])
        largest = _json_numbers("data", "UINT8", [1, SIZE // 2])
        out: dict[str, Any] = {
            "json_strings_60mb": _measure(lc, image.pid, [("mnist-cnn", strings, {})]),
            "json_numbers_60mb": _measure(lc, image.pid, [("echo", _json_numbers("x", "FP32", [1, 4]), {})]),
            "binary_bytes_60mb": _measure(lc, image.pid, [("mnist-cnn", binary, bh)]),
            "four_json_strings_at_once": _measure(lc, image.pid, [("mnist-cnn", strings, {})] * 4),
        }
        checksum_pid = next(w.pid for w in lc.workers if "w2" in w.name)
        out["largest_accepted_60mb"] = _measure(lc, checksum_pid, [("checksum", largest, {})])
        out["largest_accepted_delay"] = _delay_of_largest(lc, largest, max(100, int(args.seconds * 25)))
    return out
