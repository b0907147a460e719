"""The device of ``shoal bench edge``: one camera sending frames of real test images through
``shoal.client.Client``, one client and one camera loop per placement policy, recording each answer.

Run by the bench inside the device's network namespace, pinned to one core:

    python -m shoal.bench.edge_device CONFIG.json

CONFIG holds the central URL and account, the frame size, the cycle (each policy gets one frame per
cycle), the groups of policies that share a camera loop, the run's length, where to write the rows (JSON lines: policy, time since the start, latency,
where it ran, bytes up, whether the answer was right, the fallback or error), and per policy the
cluster's model, the local model folder, the data set (``mnist`` or ``coloured`` digits) and the
cascade threshold. After its warm-up requests it prints
one line ``{"ready": <unix time>}`` so the bench can time an outage against the run.
"""

from __future__ import annotations

import json
import random
import sys
import threading
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
    """Each policy has a client of its own. Policies are grouped: each group is a camera loop (a
    thread) that sends each frame to its policies in turn, all groups at once, so that all meet the
    same link and the same load on this machine at the same moments; policies that may hang on a
    dead link (remote, split) have groups of their own, so that they hold up no other."""
    from shoal.client import Client

    sets = {name: load_set(name, cfg["images"]) for name in {p["dataset"] for p in cfg["policies"]}}
    size = tuple(cfg["frame"])
    kw = {"frame_format": "jpeg", "quality": cfg.get("quality", 90), "budget_ms": cfg.get("budget_ms")}
    clients = {
        p["name"]: Client(
            cfg["central"],
            cfg["device"],
            cfg["password"],
            timeout=cfg.get("timeout", 10.0),
            local=p.get("local"),
            policy=p["policy"],
            threshold=p.get("threshold", 0.9),
        )
        for p in cfg["policies"]
    }
    for i in range(cfg.get("warmup", 5)):  # routes, connections, first estimates
        for p in cfg["policies"]:
            images, _ = sets[p["dataset"]]
            try:
                clients[p["name"]].infer(p["model"], frame=camera_frame(images[i], size), **kw)
            except Exception:  # noqa: BLE001 (a warm-up failure shows in the run itself)
                pass
    print(json.dumps({"ready": time.time()}), flush=True)
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def one(p: dict[str, Any], i: int) -> None:
        images, truth = sets[p["dataset"]]
        k = i % len(images)
        frame = camera_frame(images[k], size)
        t = time.perf_counter()
        row: dict[str, Any] = {"policy": p["name"], "t": round(t - t_start, 4), "image": int(k)}
        try:
            r = clients[p["name"]].infer(p["model"], frame=frame, **kw)
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

    def camera_loop(n: int, group: list[dict[str, Any]]) -> None:
        """One camera: each cycle's frame goes to every policy of the group in turn (an order that
        rotates), so they meet the same conditions; cycles start at random moments (0.5 to 1.5
        cycles apart) so that no group meets another's work on the core more often."""
        rng = random.Random(n)
        next_at = t_start + rng.uniform(0.0, cfg["cycle_s"])
        i = cfg.get("warmup", 5)
        while (now := time.perf_counter()) - t_start < cfg["seconds"]:
            time.sleep(max(0.0, next_at - now))
            for p in group[i % len(group) :] + group[: i % len(group)]:
                one(p, i)
            i += 1
            # The camera's next frame; frames that came while requests ran are dropped.
            next_at = max(next_at + rng.uniform(0.5, 1.5) * cfg["cycle_s"], time.perf_counter())

    by_name = {p["name"]: p for p in cfg["policies"]}
    groups = cfg.get("groups") or [[p["name"]] for p in cfg["policies"]]
    threads = [
        threading.Thread(target=camera_loop, args=(n, [by_name[x] for x in g])) for n, g in enumerate(groups)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for c in clients.values():
        c.close()
    Path(cfg["out"]).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    run(json.loads(Path(args[0]).read_text()))


if __name__ == "__main__":
    main()
