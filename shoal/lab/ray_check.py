"""The Ray scenario's checker (``shoal lab --scenario ray``): pure functions of the devices' log, the
observer's samples (the gateway's workers, each with the machine its process runs on; the processes
left on each Ray machine and whether the gateway's process runs) and the fault records.

The request rules are ``checker``'s (every request answered once or failed with an error the device
saw; every answer the request's own input). Per fault:

* ``ray-node-crash(m)``: ``detected_s`` (the gateway no longer holds the workers that ran on ``m`` as
  accepting), ``back_s`` (it holds ``min_workers`` accepting workers again, none on ``m``: the
  worker count brought back on the surviving nodes), ``replaced_on`` (where those run) and
  ``restarted_by_ray`` (the lost workers came back under their own ids: Ray restarted their actors;
  otherwise the autoscaler replaced them), ``handed_back`` (what they held, from the gateway's log),
  ``held_up_requests``, ``longest_held_s``;
* ``ray-head-restart`` (GCS on Redis): ``head_up_s`` (the head's node up again, from the fault),
  the requests sent while the head was away and how they ended, ``longest_gap_s`` between answers,
  ``fewest_workers`` accepting while it was away, ``gateway_alive``, ``back_s`` (``min_workers``
  accepting again), ``head_worker_back_s`` (a worker on the head's machine again);
* ``ray-head-crash`` (GCS in memory): ``served_until_s`` (the last answer), ``first_failure_s``,
  ``gateway_status_lost_s`` and ``gateway_exited_s``, ``node_processes_gone_s`` (each machine's
  processes all ended), and the answers to requests sent after the fault.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from shoal.lab.checker import _phase, pair_requests, read_jsonl

__all__ = ["check_act", "gateway_log_lines", "read_jsonl"]

GW = "gw"
LOG_WORDS = re.compile(r"GCS|gcs_|raylet|Raylet|ray engine|RaySystemError|Failed to connect|exiting|Exiting|exit")


def gateway_log_lines(path: Path, limit: int = 12) -> list[str]:
    """What the gateway's log says about Ray (distinct lines, first ``limit``, 300 characters each)."""
    if not path.exists():
        return []
    seen: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        if LOG_WORDS.search(line):
            short = line.strip()[:300]
            if short not in seen:
                seen.append(short)
        if len(seen) >= limit:
            break
    return seen


def _since(t: float | None, start: float) -> float | None:
    return None if t is None else round(t - start, 3)


def _gw(samples: list[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
    return [s for s in samples if s["source"] == GW and lo <= s["t"] < hi]


def _accepting(s: dict[str, Any], avoid: str | None = None) -> dict[str, str | None]:
    """The workers the gateway holds as accepting (id -> machine); with ``avoid``, only those whose
    process runs on a machine other than ``avoid`` (a worker whose process is gone has none)."""
    return {
        wid: w["machine"]
        for wid, w in s["workers"].items()
        if w["accepting"] and (avoid is None or w["machine"] not in (None, avoid))
    }


def _held(reqs: list[dict[str, Any]], start: float, nxt: float, slow: float) -> list[dict[str, Any]]:
    """In flight at the fault or sent after it (before the next), and failed, lost or slow."""
    return [
        r
        for r in reqs
        if r["sent"] < nxt
        and (r["done"] is None or start <= r["done"] < nxt)
        and (r["done"] is None or not r["ok"] or r["done"] - r["sent"] > slow)
    ]


def _node_crash(f: dict[str, Any], samples: list[dict[str, Any]], nxt: float, min_workers: int) -> dict[str, Any]:
    start, m, lost = f["start"], f["machine"], set(f.get("workers", []))
    ok = [s for s in _gw(samples, start, nxt) if s["ok"]]
    detected = next((s["t"] for s in ok if not lost & set(_accepting(s))), None)
    back = next((s for s in ok if len(_accepting(s, avoid=m)) >= min_workers), None)
    row: dict[str, Any] = {
        "workers_on_it": sorted(lost),
        "detected_s": _since(detected, start),
        "back_s": _since(back["t"] if back else None, start),
    }
    if back is not None:
        acc = _accepting(back, avoid=m)
        row["replaced_on"] = dict(sorted(acc.items()))
        row["restarted_by_ray"] = bool(lost) and lost <= set(acc)
    return row


def _head_restart(f: dict[str, Any], samples: list[dict[str, Any]], reqs: list[dict[str, Any]], nxt: float, min_workers: int) -> dict[str, Any]:
    start, up = f["start"], f.get("head_up") or f["start"]
    away = [r for r in reqs if start <= r["sent"] < up]
    answers = sorted(r["done"] for r in reqs if r["ok"] and r["done"] is not None and start <= r["done"] < up)
    gaps = np.diff([start, *answers, up]) if up > start else np.array([0.0])
    during = _gw(samples, start, up)
    procs = [s for s in samples if s["source"] == "procs" and start <= s["t"] < up and s["ok"]]
    ok = [s for s in _gw(samples, start, nxt) if s["ok"]]
    back = next((s["t"] for s in ok if s["t"] >= up and len(_accepting(s)) >= min_workers), None)
    head_back = next(
        (s["t"] for s in ok if s["t"] >= up and any(mm == f["machine"] for mm in _accepting(s).values())), None
    )
    return {
        "workers_on_it": sorted(f.get("workers", [])),
        "heal_at_s": _since(f.get("heal"), start),
        "head_up_s": _since(f.get("head_up"), start),
        "sent_while_away": len(away),
        "answered_while_away": sum(1 for r in away if r["ok"]),
        "failed_while_away": sum(1 for r in away if r["done"] is not None and not r["ok"]),
        "longest_gap_s": round(float(gaps.max()), 3),
        "fewest_workers": min((len(_accepting(s)) for s in during if s["ok"]), default=None),
        "gateway_status_failures": sum(1 for s in during if not s["ok"]),
        "gateway_alive": all(s["gateway_alive"] for s in procs) if procs else None,
        "back_s": _since(back, start),
        "head_worker_back_s": _since(head_back, start),
    }


def _head_crash(f: dict[str, Any], samples: list[dict[str, Any]], reqs: list[dict[str, Any]]) -> dict[str, Any]:
    start = f["start"]
    done_ok = [r["done"] for r in reqs if r["ok"] and r["done"] is not None and r["done"] >= start]
    failed = [r["done"] for r in reqs if r["done"] is not None and not r["ok"] and r["done"] >= start]
    gws = _gw(samples, start, float("inf"))
    lost = next((s["t"] for s in gws if not s["ok"]), None)
    procs = [s for s in samples if s["source"] == "procs" and s["t"] >= start and s["ok"]]
    exited = next((s["t"] for s in procs if not s["gateway_alive"]), None)
    gone: dict[str, float | None] = {}
    for m in (procs[0]["processes"] if procs else {}):
        gone[m] = _since(next((s["t"] for s in procs if s["processes"].get(m, 0) == 0), None), start)
    workers: list[tuple[float, int]] = []  # (seconds after the fault, workers accepting) at each change
    for s in gws:
        n = len(_accepting(s)) if s["ok"] else 0
        if not workers or workers[-1][1] != n:
            workers.append((round(s["t"] - start, 2), n))
    after = [r for r in reqs if r["sent"] >= start]
    return {
        "served_until_s": _since(max(done_ok, default=None), start),
        "first_failure_s": _since(min(failed, default=None), start),
        "gateway_status_lost_s": _since(lost, start),
        "gateway_exited_s": _since(exited, start),
        "node_processes_gone_s": gone,
        "workers_accepting": workers[:20],
        "sent_after": len(after),
        "answered_after": sum(1 for r in after if r["ok"]),
        "failed_after": sum(1 for r in after if r["done"] is not None and not r["ok"]),
    }


def check_act(
    act: str,
    log: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    faults: list[dict[str, Any]],
    warm: float,
    gateway_url: str = "",
    min_workers: int = 2,
    gateway_log: list[str] | None = None,
) -> dict[str, Any]:
    """One act's summary; times are seconds from the fault (rows) or the first request (phases)."""
    reqs, counts = pair_requests(log)
    t0 = reqs[0]["sent"] if reqs else warm
    end = max((r["done"] or r["sent"] for r in reqs), default=t0)
    first = faults[0]["start"] if faults else end
    before = [r["done"] - r["sent"] for r in reqs if r["ok"] and warm <= r["sent"] < first]
    slow = max(1.0, 5 * float(np.percentile(before, 99) if before else 0.2))
    rows = []
    phases: dict[str, Any] = {"warm-up": _phase(reqs, t0, warm, t0), "before": _phase(reqs, warm, first, t0)}
    for i, f in enumerate(faults):
        start = f["start"]
        nxt = faults[i + 1]["start"] if i + 1 < len(faults) else end + 1.0
        row: dict[str, Any] = {"fault": f["label"], "at_s": round(start - t0, 3), "processes_killed": f.get("killed")}
        if f["kind"] == "ray-node-crash":
            row.update(_node_crash(f, samples, nxt, min_workers))
        elif f["kind"] == "ray-head-restart":
            row.update(_head_restart(f, samples, reqs, nxt, min_workers))
        else:
            row.update(_head_crash(f, samples, reqs))
        if "handed_back" in f:
            row["handed_back"] = f["handed_back"]
        held = _held(reqs, start, nxt, slow)
        row["held_up_requests"] = len(held)
        row["longest_held_s"] = round(max(((r["done"] or end) - r["sent"] for r in held), default=0.0), 3)
        row["failed"] = sum(1 for r in reqs if start <= (r["done"] or 0) < nxt and not r["ok"])
        rows.append(row)
        phases[f["label"]] = _phase(reqs, start, nxt, t0)
    clean = not any(counts[k] for k in ("lost", "answered_twice", "answers_never_sent", "wrong_answers"))
    if act == "ft":  # nothing may fail, and every fault must be recovered from
        ok = clean and not counts["failed"] and all(
            r.get("back_s") is not None and r.get("detected_s", 0) is not None for r in rows
        )
    else:  # the cluster is lost with its head: failures are what is measured; none lost, none twice
        ok = clean
    return {
        "act": act,
        "gcs": "redis" if act == "ft" else "memory",
        **counts,
        "duration_s": round(end - t0, 3),
        "gateway": gateway_url,
        "slow_threshold_s": round(slow, 3),
        "faults": rows,
        "phases": phases,
        "gateway_log": gateway_log or [],
        "passed": ok,
    }
