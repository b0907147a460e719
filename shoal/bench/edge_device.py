"""The device of ``shoal bench edge``: one camera sending frames of real test images through
``shoal.client.Client`` under one placement policy, one request at a time, recording each answer.

Run by the bench inside the device's network namespace, pinned to one core:

    python -m shoal.bench.edge_device CONFIG.json

CONFIG holds the central URL and account, the cluster's model, the local model folder, the policy and
its settings, the data set (``mnist`` or ``coloured`` digits), the frame size, the frame rate, the
run's length and where to write the rows (JSON lines: time since the start, latency, where it ran,
bytes up, whether the answer was right, the fallback or error). After its warm-up requests it prints
one line ``{"ready": <unix time>}`` so the bench can time an outage against the run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def load_set(name: str, count: int) -> tuple[np.ndarray, list[dict[str, str]]]:
    """(uint8 images [N, 28, 28(, 3)], the expected label of each output)."""
    if name == "mnist":
        from shoal.data.mnist import load_mnist

        x, y = load_mnist("test")
        return x[:count], [{"logits": str(int(v))} for v in y[:count]]
    from shoal.multihead import data

    ds = data.generate("test", count, seed=0)
    return ds.images, [
        {"digit": data.DIGITS[d], "colour": data.COLOURS[c]} for d, c in zip(ds.digit, ds.colour, strict=True)
    ]


def camera_frame(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 28x28 test image as a camera would frame it: RGB, ``size`` (width, height), bilinear."""
    from PIL import Image

    im = Image.fromarray(image).convert("RGB").resize(size, Image.BILINEAR)
    return np.asarray(im)


def run(cfg: dict[str, Any]) -> None:
    from shoal.client import Client

    images, truth = load_set(cfg["dataset"], cfg["images"])
    size = tuple(cfg["frame"])
    client = Client(
        cfg["central"],
        cfg["device"],
        cfg["password"],
        timeout=cfg.get("timeout", 10.0),
        local=cfg.get("local"),
        policy=cfg["policy"],
        threshold=cfg.get("threshold", 0.9),
    )
    kw = {
        "budget_ms": cfg.get("budget_ms"),
        "frame_format": cfg.get("frame_format", "jpeg"),
        "quality": cfg.get("quality", 90),
    }
    n = len(images)
    i = cfg.get("offset", 0)
    for _ in range(cfg.get("warmup", 5)):  # route, connections, first estimates
        try:
            client.infer(cfg["model"], frame=camera_frame(images[i % n], size), **kw)
        except Exception:  # noqa: BLE001 (a warm-up failure shows in the run itself)
            pass
        i += 1
    print(json.dumps({"ready": time.time()}), flush=True)
    interval = 1.0 / cfg["fps"]
    t_start = next_at = time.perf_counter()
    rows = []
    while (now := time.perf_counter() - t_start) < cfg["seconds"]:
        k = i % n
        frame = camera_frame(images[k], size)
        t = time.perf_counter()
        row: dict[str, Any] = {"t": round(now, 4), "image": int(k)}
        try:
            r = client.infer(cfg["model"], frame=frame, **kw)
            row.update(
                ms=(time.perf_counter() - t) * 1000.0,
                where=r.where,
                bytes_up=r.bytes_up,
                correct=all(str(r.label(o)) == v for o, v in truth[k].items()),
                timings=r.timings_ms,
            )
            if r.fallback:
                row["fallback"] = r.fallback
        except Exception as e:  # noqa: BLE001 (a failed request is a figure of the run)
            row.update(ms=(time.perf_counter() - t) * 1000.0, error=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
        i += 1
        # The next frame of the camera's cadence; frames that came while a request ran are dropped.
        next_at = max(next_at + interval, time.perf_counter())
        time.sleep(max(0.0, next_at - time.perf_counter()))
    client.close()
    Path(cfg["out"]).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    run(json.loads(Path(args[0]).read_text()))


if __name__ == "__main__":
    main()
