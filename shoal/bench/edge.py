"""``shoal bench edge``: the device client's placement policies on emulated radio links.

A central, a gateway and its workers run in a network namespace of their own (the "cluster"); the
device program (``shoal.bench.edge_device``) runs in a second one, on one core, joined to the first by
a veth pair (``shoal.bench.netns``). Per link profile the kernel's token bucket shapes bandwidth on
each end and ``shoal.bench.relay`` adds delay, jitter and loss in front of central and the gateway;
the outage profile takes the cluster's end of the link down for the middle third of every run.

Per profile the device sends camera frames (real test images drawn at ``FRAME`` pixels, the
paper's ~3 MB frames) for ``--edge-seconds``. Each policy has a client of its own; ``GROUPS`` of
policies share a camera loop that hands each frame to them in turn (one frame every ``CYCLE_S`` or
so), the loops run at once on the device's core: so all policies meet the same link and the same load
on this shared machine at the same moments, and those that may hang while the link is down (remote,
split) hold up no other:

* ``local``, ``remote``, ``fastest``, ``cascade``: MNIST; the device holds the MLP (``mnist-mlp``),
  the cluster serves the CNN (``mnist-cnn``); frames go up as JPEG;
* ``split``: coloured digits; the device runs the frozen EfficientNet-Lite0 backbone of the
  multi-head model, the cluster its heads (``shoal.multihead.split``).

Figures per run: p50 and p99 end-to-end latency, accuracy, failures, bytes up per request, share
answered locally; the cascade's threshold against accuracy and share over all 10 000 MNIST test images
(in-process); plots of latency through the outage. Everything it starts is stopped and both namespaces
deleted at the end, also after a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench.netns import LinkProfile, VethPair, unavailable
from shoal.bundled import bundled_repo

POLICIES = ("local", "remote", "fastest", "cascade", "split")
PROFILES = (
    LinkProfile("good-wifi", up_mbit=40, down_mbit=40, delay_ms=3, jitter_ms=1.5, loss=0.001),
    LinkProfile("poor-wifi", up_mbit=3, down_mbit=6, delay_ms=25, jitter_ms=15, loss=0.02),
    LinkProfile("lte", up_mbit=8, down_mbit=30, delay_ms=30, jitter_ms=8, loss=0.005),
    LinkProfile("wifi-outage", up_mbit=40, down_mbit=40, delay_ms=3, jitter_ms=1.5, loss=0.001, outage=(1 / 3, 2 / 3)),
)
FRAME = (1280, 720)  # 2.76 MB of RGB: the source paper's ~3 MB frames
CYCLE_S = 0.5  # each camera loop takes a frame this often (or when its last requests end)
GROUPS = (("local", "fastest", "cascade"), ("remote",), ("split",))
QUALITY = 90
NOT_RUN = "not run"  # a check whose runs did not take place (never counted as passed)
THRESHOLD = 0.99  # cascade: MLP top-class probability kept locally (the sweep in the results shows why)
SPLIT_BACKBONE = "efficientnet-lite0"
CENTRAL_PORT, GATEWAY_PORT = 9000, 9001  # relay ports on the cluster's end of the link
CPU_CLUSTER, CPU_DEVICE = 0, 1
SWEEP = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


# ------------------------------------------------------------------------------------- models


def _models(workdir: Path, split_repo: str | None, log, want_split: bool = True) -> tuple[Path, dict[str, Any]]:
    """A repository with the MNIST pair and the split pair (trained here unless given or not wanted)."""
    repo = workdir / "repo"
    for m in ("mnist-cnn", "mnist-mlp"):
        shutil.copytree(bundled_repo() / m, repo / m, dirs_exist_ok=True)
    if not want_split:
        return repo, {"skipped": "the split policy was not asked for"}
    split: dict[str, Any] = {}
    from shoal.multihead.split import split_names

    dev, clu = split_names(SPLIT_BACKBONE)
    if split_repo:
        src = Path(split_repo)
    else:
        try:
            from shoal.multihead import compare
            from shoal.multihead.split import train_split
        except ImportError as e:
            return repo, {"skipped": f"split needs the training extra to build its models ({e.name})"}
        src = workdir / "split-repo"
        if not (src / clu).exists():
            cfg = compare.Config(backbones=(SPLIT_BACKBONE,), threads=1, progress=False)
            train_split(src, SPLIT_BACKBONE, cfg, log=log)
    for n in (dev, clu):
        versions = sorted((src / n).iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0)
        shutil.copytree(versions[-1], repo / n / versions[-1].name, dirs_exist_ok=True)
        split[n] = versions[-1].name
    return repo, {"device": dev, "cluster": clu, "version": split[dev]}


def cascade_sweep(repo: Path) -> dict[str, Any]:
    """Over all 10 000 MNIST test images, in process: the MLP, the CNN, and the cascade at each
    threshold (share answered by the MLP, accuracy)."""
    from shoal.client.edge import LocalModel
    from shoal.data.mnist import load_mnist

    x, y = load_mnist("test")
    mlp, cnn = LocalModel(repo / "mnist-mlp" / "1"), LocalModel(repo / "mnist-cnn" / "1")
    spec = mlp.manifest.image
    xi = ((x.astype(np.float32) * np.float32(spec.scale) - spec.mean[0]) / spec.std[0])[:, None]
    lm = np.concatenate([mlp.run({"image": xi[i : i + 500]})["logits"] for i in range(0, len(x), 500)])
    lc = np.concatenate([cnn.run({"image": xi[i : i + 500]})["logits"] for i in range(0, len(x), 500)])
    p = np.exp(lm - lm.max(1, keepdims=True))
    conf = (p / p.sum(1, keepdims=True)).max(1)
    right_m, right_c = lm.argmax(1) == y, lc.argmax(1) == y
    rows = []
    for t in SWEEP:
        keep = conf >= t
        rows.append({"threshold": t, "local_share": round(float(keep.mean()), 4),
                     "accuracy": round(float(np.where(keep, right_m, right_c).mean()), 4)})
    return {"images": len(x), "mlp_accuracy": float(right_m.mean()), "cnn_accuracy": float(right_c.mean()),
            "thresholds": rows}


def frame_bytes(dataset: str, count: int = 40) -> dict[str, float]:
    """Mean raw, JPEG and PNG bytes of the frames the device sends (first ``count`` test images)."""
    from shoal.bench.edge_device import camera_frame, load_set
    from shoal.client.edge import encode_frame

    images, _ = load_set(dataset, count)
    frames = [camera_frame(im, FRAME) for im in images]
    return {"raw": float(frames[0].nbytes),
            "jpeg": float(np.mean([len(encode_frame(f, "jpeg", QUALITY)) for f in frames])),
            "png": float(np.mean([len(encode_frame(f, "png")) for f in frames[:10]]))}


# ----------------------------------------------------------------------------------------- runs


def _spawn_relay(workdir: Path, pair: VethPair, prof: LinkProfile, targets: dict[int, int], seed: int):
    ready, stats = workdir / "relay.ready", workdir / "relay.stats.json"
    ready.unlink(missing_ok=True)
    stats.unlink(missing_ok=True)
    cmd = ["taskset", "-c", str(CPU_CLUSTER), sys.executable, "-m", "shoal.bench.relay",
           "--delay-ms", str(prof.delay_ms), "--jitter-ms", str(prof.jitter_ms), "--loss", str(prof.loss),
           "--seed", str(seed), "--ready", str(ready), "--stats", str(stats)]
    for listen, target in targets.items():
        cmd += ["--route", f"{pair.cluster_ip}:{listen}=127.0.0.1:{target}"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(workdir / "relay.log", "ab"))  # noqa: SIM115
    end = time.monotonic() + 20
    while not ready.exists():
        if p.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"the relay did not start: {(workdir / 'relay.log').read_text()[-500:]}")
        time.sleep(0.02)
    return p, stats


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def run_device(pair: VethPair, cfg: dict[str, Any], prof: LinkProfile, workdir: Path) -> dict[str, Any]:
    """One device run; takes the link down and up again meanwhile when the profile has an outage."""
    path, log = workdir / f"{prof.name}.json", workdir / f"{prof.name}.log"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        pair.in_device([sys.executable, "-m", "shoal.bench.edge_device", str(path)], cpu=CPU_DEVICE),
        stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True,  # noqa: SIM115
    )
    outage: tuple[float, float] | None = None
    try:
        ready: list[float] = []
        reader = threading.Thread(target=lambda: ready.append(json.loads(proc.stdout.readline() or "{}").get("ready", 0)))
        reader.start()
        reader.join(120)
        if not ready or not ready[0]:
            raise RuntimeError(f"device did not start: {log.read_text()[-800:]}")
        if prof.outage:
            a, b = (ready[0] + f * cfg["seconds"] for f in prof.outage)
            time.sleep(max(0.0, a - time.time()))
            pair.set_link(False)
            down_at = time.time()
            time.sleep(max(0.0, b - time.time()))
            pair.set_link(True)
            outage = (down_at - ready[0], time.time() - ready[0])
        proc.wait(cfg["seconds"] + 120)
    finally:
        _stop(proc)
        if prof.outage:
            pair.set_link(True)
    rows = [json.loads(line) for line in Path(cfg["out"]).read_text().splitlines()]
    return {"rows": rows, "outage_s": outage}


def summarise(rows: list[dict[str, Any]], outage: tuple[float, float] | None = None) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    lat = np.array([r["ms"] for r in ok]) if ok else np.array([np.nan])
    extra: dict[str, Any] = {}
    if outage:  # requests started while the link was down
        during = [r for r in rows if outage[0] <= r["t"] < outage[1]]
        extra = {"started_in_outage": len(during), "answered_in_outage": sum("error" not in r for r in during),
                 "max_ms_in_outage": round(max((r["ms"] for r in during), default=0.0), 1)}
    return {
        "requests": len(rows),
        "failed": len(rows) - len(ok),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "accuracy": round(float(np.mean([r["correct"] for r in ok])), 4) if ok else None,
        "bytes_up_per_request": round(float(np.mean([r["bytes_up"] for r in ok])), 0) if ok else None,
        "local_share": round(float(np.mean([r["where"] == "local" for r in ok])), 3) if ok else None,
        "fallbacks": sum(1 for r in ok if r.get("fallback")),
        "max_ms": round(float(np.max(lat)), 1),
        **extra,
    }


# ---------------------------------------------------------------------------------------- plots


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    outage = next((p for p in PROFILES if p.outage), None)
    if outage and outage.name in results["runs"]:
        runs = results["runs"][outage.name]
        fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.0 * len(runs)), sharex=True)
        for ax, (policy, run) in zip(np.atleast_1d(axes), runs.items(), strict=True):
            rows = run["rows"]
            for where, colour in (("local", "tab:green"), ("remote", "tab:blue"), ("split", "tab:purple")):
                pts = [(r["t"], r["ms"]) for r in rows if r.get("where") == where]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), s=6, color=colour, label=f"answered {where}")
            bad = [(r["t"], r["ms"]) for r in rows if "error" in r]
            if bad:
                ax.scatter(*zip(*bad, strict=True), s=14, marker="x", color="tab:red", label="failed")
            if run.get("outage_s"):
                ax.axvspan(*run["outage_s"], color="0.85", zorder=0, label="link down")
            ax.set_yscale("log")
            ax.set_ylabel("ms")
            ax.set_title(f"{policy}: p50 {run['summary']['p50_ms']} ms, p99 {run['summary']['p99_ms']} ms, "
                         f"failed {run['summary']['failed']}", fontsize=9)
            ax.legend(fontsize=7, loc="upper right", markerscale=2)
        np.atleast_1d(axes)[-1].set_xlabel("seconds into the run")
        fig.suptitle(f"End-to-end latency through an outage ({outage.name}, link down for the middle third)")
        fig.tight_layout()
        path = out / "latency-outage.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    profiles = list(results["runs"])
    width = 0.8 / len(POLICIES)
    for k, policy in enumerate(POLICIES):
        vals = [results["runs"][p].get(policy, {}).get("summary", {}).get("p50_ms", np.nan) for p in profiles]
        ax.bar(np.arange(len(profiles)) + k * width, vals, width, label=policy)
    ax.set_xticks(np.arange(len(profiles)) + width * (len(POLICIES) - 1) / 2, profiles)
    ax.set_yscale("log")
    ax.set_ylim(1, ax.get_ylim()[1] * 4)  # bars from 1 ms, room above them for the legend
    ax.set_ylabel("p50 end-to-end latency, ms")
    ax.legend(fontsize=8, ncol=5, loc="upper left")
    ax.set_title("p50 latency by link profile and policy (split: coloured digits, the rest: MNIST)", fontsize=9)
    fig.tight_layout()
    path = out / "p50-by-profile.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# ---------------------------------------------------------------------------------------- targets


def targets(results: dict[str, Any]) -> dict[str, Any]:
    runs = results["runs"]
    out: dict[str, Any] = {}
    worst = 0.0
    over, paired = {}, {}
    for name, r in runs.items():
        if not all(p in r for p in ("local", "remote", "fastest")):
            continue
        best = min(r["local"]["summary"]["p50_ms"], r["remote"]["summary"]["p50_ms"])
        over[name] = round(r["fastest"]["summary"]["p50_ms"] / best - 1, 3)
        worst = max(worst, over[name])
        # The same frame under both (they share a camera loop): the policy's own cost, load aside.
        local = {x["image"]: x["ms"] for x in r["local"]["rows"] if "error" not in x}
        diff = [x["ms"] - local[x["image"]] for x in r["fastest"]["rows"] if x["image"] in local and "error" not in x]
        paired[name] = round(float(np.median(diff)), 2) if diff else None
    out["fastest_p50_over_best"] = over
    out["fastest_minus_local_same_frame_median_ms"] = paired
    # A check whose runs did not take place says "not run", never passed.
    out["fastest_p50_over_best_worst"] = round(worst, 3) if over else NOT_RUN
    out["fastest_within_10pct"] = worst <= 0.10 if over else NOT_RUN
    outage = [p.name for p in PROFILES if p.outage and p.name in runs]
    failed = {
        pol: sum(runs[o][pol]["summary"]["failed"] for o in outage if pol in runs[o])
        for pol in ("fastest", "cascade")
        if any(pol in runs[o] for o in outage)
    }
    out["outage_failures"] = failed or NOT_RUN
    out["no_failure_in_outage"] = all(v == 0 for v in failed.values()) if failed else NOT_RUN
    sweep = results.get("cascade_sweep", {})
    row = next((t for t in sweep.get("thresholds", []) if t["threshold"] == THRESHOLD), None)
    if row:
        out["cascade_accuracy_gap_pp_10k"] = round((sweep["cnn_accuracy"] - row["accuracy"]) * 100, 2)
        out["cascade_bytes_vs_remote_10k"] = round(1 - row["local_share"], 3)
    gaps, ratios = [], []
    for name, r in runs.items():
        if "cascade" in r and "remote" in r and name not in outage:
            gaps.append((r["remote"]["summary"]["accuracy"] - r["cascade"]["summary"]["accuracy"]) * 100)
            ratios.append(r["cascade"]["summary"]["bytes_up_per_request"] / r["remote"]["summary"]["bytes_up_per_request"])
    if gaps:
        out["cascade_accuracy_gap_pp_runs_max"] = round(max(gaps), 2)
        out["cascade_bytes_vs_remote_runs_max"] = round(max(ratios), 3)
    out["cascade_held"] = (
        out["cascade_accuracy_gap_pp_10k"] <= 0.5 and out["cascade_bytes_vs_remote_10k"] <= 0.5 if row else NOT_RUN
    )
    fb = results.get("frame_bytes", {}).get("coloured")
    split = [r["split"]["summary"]["bytes_up_per_request"] for r in runs.values() if "split" in r]
    if fb and split:
        out["split_bytes_per_request"] = max(split)
        out["split_fewer_bytes_than_jpeg_x"] = round(fb["jpeg"] / max(split), 1)
        out["split_fewer_bytes_than_raw_x"] = round(fb["raw"] / max(split), 1)
        out["split_held"] = fb["jpeg"] / max(split) >= 10
    else:
        out["split_held"] = NOT_RUN
    return out


# ------------------------------------------------------------------------------------------ main


def _policy_cfg(policy: str, repo: Path, split: dict[str, Any]) -> dict[str, Any]:
    if policy == "split":
        return {"name": policy, "policy": policy, "model": split["cluster"], "dataset": "coloured",
                "local": str(repo / split["device"] / split["version"])}
    return {"name": policy, "policy": policy, "model": "mnist-cnn", "dataset": "mnist",
            "local": str(repo / "mnist-mlp" / "1"), "threshold": THRESHOLD}


def edge(workdir: Path, args: Namespace) -> dict[str, Any]:
    reason = unavailable()
    if reason:
        return {"edge": f"not run: {reason}"}
    from shoal.local import LocalCentral

    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(getattr(args, "edge_out", None) or workdir / "results")
    out.mkdir(parents=True, exist_ok=True)
    seconds = float(getattr(args, "edge_seconds", 60.0))
    policies = tuple(getattr(args, "edge_policies", None) or POLICIES)
    profiles = [p for p in PROFILES if p.name in (getattr(args, "edge_profiles", None) or [q.name for q in PROFILES])]
    log = print
    repo, split = _models(workdir, getattr(args, "edge_split_repo", None), log, "split" in policies)
    if "skipped" in split:
        policies = tuple(p for p in policies if p != "split")
    results: dict[str, Any] = {
        "frame": list(FRAME), "cycle_s": CYCLE_S, "seconds": seconds, "quality": QUALITY, "threshold": THRESHOLD,
        "profiles": [asdict(p) for p in profiles], "split": split,
        "cascade_sweep": cascade_sweep(repo),
        "frame_bytes": {"mnist": frame_bytes("mnist"), **({"coloured": frame_bytes("coloured")} if "device" in split else {})},
        "runs": {},
    }
    pair = VethPair(f"e{os.getpid()}", subnet=os.getpid() % 250)
    started: list[Any] = []
    try:
        pair.create()
        with pair.inside_cluster():
            central = LocalCentral(workdir / "central").start()
            started.append(central)
            lc = central.start_cluster(
                workdir / "site", "site",
                gateway_args=["--public-url", f"http://{pair.cluster_ip}:{GATEWAY_PORT}"],
            )
            started.append(lc)
            lc.add_worker("mnist-cnn", repo=str(repo), cpu=CPU_CLUSTER)
            if "device" in split:
                lc.add_worker(split["cluster"], repo=str(repo), cpu=CPU_CLUSTER)
            lc.wait_workers("mnist-cnn", 1, timeout=120)
            central.wait_routable({"site"}, "mnist-cnn", timeout=60)
            if "device" in split:
                lc.wait_workers(split["cluster"], 1, timeout=120)
                central.wait_routable({"site"}, split["cluster"], timeout=60)
            password = secrets.token_hex(12)
            central.add_account("device", "camera", password)
            targets_ = {CENTRAL_PORT: central.http_port, GATEWAY_PORT: lc.http_port}
            for k, prof in enumerate(profiles):
                pair.shape(prof.up_mbit, prof.down_mbit)
                relay, stats = _spawn_relay(workdir, pair, prof, targets_, seed=k)
                cfg = {
                    "central": f"http://{pair.cluster_ip}:{CENTRAL_PORT}", "device": "camera",
                    "password": password, "images": 2000, "frame": list(FRAME), "cycle_s": CYCLE_S,
                    "seconds": seconds, "quality": QUALITY, "out": str(workdir / f"{prof.name}.rows"),
                    "policies": [_policy_cfg(p, repo, split) for p in policies],
                    "groups": [g for g in ([p for p in grp if p in policies] for grp in GROUPS) if g],
                }
                print(f"  {prof.name}: {seconds:.0f} s", flush=True)
                try:
                    run = run_device(pair, cfg, prof, workdir)
                finally:
                    _stop(relay)
                results["runs"][prof.name] = {}
                for policy in policies:
                    rows = [r for r in run["rows"] if r["policy"] == policy]
                    results["runs"][prof.name][policy] = {"rows": rows, "outage_s": run["outage_s"],
                                                          "summary": summarise(rows, run["outage_s"])}
                    print(f"    {policy:<8} {json.dumps(results['runs'][prof.name][policy]['summary'])}", flush=True)
                if stats.exists():
                    results["relay"] = {**results.get("relay", {}), prof.name: json.loads(stats.read_text())}
    finally:
        for s in reversed(started):
            try:
                s.stop()
            except Exception:  # noqa: BLE001 (the rest must still be stopped)
                pass
        pair.delete()
    results["targets"] = targets(results)
    for path in plot(results, out):
        print(f"  wrote {path}")
    rows = {prof: {pol: run.pop("rows") for pol, run in runs.items()} for prof, runs in results["runs"].items()}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "rows.json").write_text(json.dumps(rows) + "\n")  # every request, for other plots
    flat: dict[str, Any] = {"results": str(out / "results.json")}
    for prof, runs in results["runs"].items():
        for policy, run in runs.items():
            s = run["summary"]
            flat[f"{prof} {policy}"] = (
                f"p50 {s['p50_ms']} p99 {s['p99_ms']} ms, acc {s['accuracy']}, "
                f"{s['bytes_up_per_request']} B/req, local {s['local_share']}, failed {s['failed']}"
            )
    flat.update(results["targets"])
    return flat
