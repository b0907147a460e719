"""The checker: the rules applied after a run to the devices' logs, the samples the lab took of the
gateways and central, and the fault records. Pure functions of those (no clock, no I/O but
``read_jsonl``).

Requests (each device log line pairs a ``send`` with its ``done``, by request id):

* every request sent was answered exactly once or failed with an error the device saw: a ``send``
  without a ``done`` is **lost**, two ``done``s are **answered twice**;
* no answer carries another request's data: an answer whose output is not the request's own input
  is **wrong** (and **foreign** when it is another request's input).

Per fault (times from the fault's start, or from the heal for a partition's recovery), by the role
of the machine it hit:

* a worker's machine: **detected** when a gateway drops the worker from its pool (or holds it as not
  accepting), ``detected_by_all_s`` when every gateway has; after a partition, **recovered** when
  every gateway that answers holds it accepting again.
* a gateway's machine: **detected** when every worker the other gateways hold links to one gateway
  fewer (``load.links``), ``central_dropped_s`` when central lists it as not live; after a partition,
  **recovered** when every worker links to all the gateways again and central lists it as live.
* a worker's machine whose packets were dropped (``drop``, the link up): as a partition.
* a worker's machine whose link was slow or lossy (``slow``, ``lossy``): ``dropped_s`` when a gateway
  first took it for lost (None: never), ``its_share_before`` / ``its_share_during`` of the answers
  (the gateways' counters) in the 5 s before and during; recovered at its end.
* a worker started by the fault and lost while joining or draining (``crash-joining``,
  ``crash-draining``): ``joined_s`` (a gateway held it, from its start), ``served_before_lost``;
  draining, ``lost_after_drain_s``, ``held_at_drain`` (what it said it still held) and **detected**
  when what it held went elsewhere (``handed_back``: each gateway's log lines saying so, seconds
  after the loss, how many requests, whether after its silence or once it left).
* a ``serve`` step (not a fault: the second site takes the first site's model too): ``serving_s``,
  when central routed the model there.
* a gateway that was its cluster's last: **detected** when central dropped it.
* a crash is **recovered** when the devices carry on without the machine (``devices_recovered_s``);
  ``answers_from_it_after`` counts answers from a crashed gateway to requests sent after its crash,
  ``its_share_before`` the gateway's share of the answers in the 2 s before the fault.
* a gateway's machine lost (crashed): issue 23's target, the devices carry on within
  ``GATEWAY_LOST_TARGET_S`` (``target_s``): ``within_target`` when no request it held up took longer;
  ``passed`` needs it. Devices behind an edge link profile (``edge_devices``) are left out of it and
  their longest is given apart (``edge_longest_held_s``): a frame lost on their own link costs TCP a
  retransmission (a SYN's: 1 s), which no fail-over can win back.
* every fault's **devices_recovered_s**: when the last request the fault held up ended (one in flight
  at the fault or sent after it, ended before the next fault, that failed, was answered by a machine
  the fault took down, or took longer than ``max(1 s, 5 x the p99 before the first fault)``); 0 when
  none was held up.

* a central replica's machine (``central-*``) crashed: **detected** when the observer's polls of it
  fail; ``routes_by_survivors``: the route probes (a device account asking each replica for a route
  every 250 ms) the replicas still up answered, out of those asked, until the next fault.
* the database (``db``) stopped or cut off: ``routes_while_down``: the route probes answered, refused
  (an HTTP error) and unanswered while it was down; **recovered** when every replica up answers a
  probe again after it is back (``recovered_s``, from the heal).
* the WAN (``wan``) on: ``central_listed_live`` (the share of central's lists during it that name
  every gateway up as live: the reports crossed the WAN), ``routes_complete`` (the share of the
  probes answered that name every gateway up); recovered at its end.

Latency p50/p99 per phase (by the time a request was sent): the warm-up (routes asked for, connections
opened), before the first fault, during each fault (its start until it and the devices recovered),
between faults and after the last.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return out


def _pct(lat: list[float]) -> tuple[float | None, float | None]:
    if not lat:
        return None, None
    a = np.asarray(lat) * 1000.0
    return round(float(np.percentile(a, 50)), 2), round(float(np.percentile(a, 99)), 2)


def pair_requests(log: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One record a request (``sent``, ``done`` or None, ``ok``, ``gateway``, ``correct``, ``in``,
    ``out``, ``error``), and the request rules' counts."""
    sends: dict[str, dict[str, Any]] = {}
    dones: dict[str, list[dict[str, Any]]] = {}
    for r in log:
        if r.get("e") == "send":
            sends[r["id"]] = r
        elif r.get("e") == "done":
            dones.setdefault(r["id"], []).append(r)
    reqs = []
    for rid, s in sends.items():
        d = (dones.get(rid) or [None])[0]
        reqs.append(
            {
                "id": rid,
                "sent": s["t"],
                "in": s.get("in"),
                "done": d["t"] if d else None,
                "ok": bool(d and d.get("ok")),
                "error": d.get("error") if d else None,
                "gateway": d.get("gateway") if d else None,
                "out": d.get("out") if d else None,
                "correct": bool(d and d.get("correct")),
                "model": s.get("model"),
            }
        )
    reqs.sort(key=lambda r: r["sent"])
    inputs = {r["in"]: r["id"] for r in reqs}
    ok = [r for r in reqs if r["ok"]]
    wrong = [r for r in ok if not r["correct"]]
    failed = [r for r in reqs if r["done"] is not None and not r["ok"]]
    counts = {
        "requests": len(reqs),
        "answered": len(ok),
        "failed": len(failed),
        "lost": sum(1 for r in reqs if r["done"] is None),
        "answered_twice": sum(1 for rid in sends if len(dones.get(rid, [])) > 1),
        "answers_never_sent": sum(1 for rid in dones if rid not in sends),
        "wrong_answers": len(wrong),
        "foreign_answers": sum(1 for r in wrong if inputs.get(r["out"], r["id"]) != r["id"]),
        "first_failures": [f"{r['id']}: {r['error']}" for r in failed[:5]],
    }
    return reqs, counts


Timeline = list[tuple[float, dict[str, dict[str, Any]], dict[str, bool] | None]]


def _timeline(samples: list[dict[str, Any]], gateways: set[str], since: float, until: float) -> Timeline:
    """For each sample in [since, until): (time, the latest answered sample of each gateway up to
    then, the gateways central listed as live in its latest answer)."""
    latest: dict[str, dict[str, Any]] = {}
    central: dict[str, bool] | None = None
    out: Timeline = []
    for s in sorted(samples, key=lambda s: s["t"]):
        if s["t"] >= until:
            break
        if s["source"].startswith("central"):  # any replica's latest answer
            central = s["gateways"] if s["ok"] else central
        elif s["source"] in gateways:
            if s["ok"]:
                latest[s["source"]] = s
            else:
                latest.pop(s["source"], None)  # a gateway that does not answer holds nobody
        if s["t"] >= since:
            out.append((s["t"], dict(latest), central))
    return out


def _first(timeline: Timeline, cond: Callable[[list[dict[str, Any]]], bool]) -> float | None:
    """When ``cond`` of the answering gateways' samples first held."""
    return next((t for t, latest, _ in timeline if cond(list(latest.values()))), None)


def _holds(s: dict[str, Any], worker: str) -> bool:
    w = s["workers"].get(worker)
    return bool(w and w["accepting"])


def _since(t: float | None, start: float) -> float | None:
    return None if t is None else round(t - start, 3)


def _worker_gone(w: str, tl: Timeline, start: float) -> dict[str, Any]:
    """When a gateway dropped the worker from its pool (or held it as not accepting), and when all had."""
    det = _first(tl, lambda gs: any(not _holds(s, w) for s in gs))
    det_all = _first(tl, lambda gs: bool(gs) and all(not _holds(s, w) for s in gs))
    return {"detected_s": _since(det, start), "detected_by_all_s": _since(det_all, start)}


def _worker_back(w: str, tl: Timeline) -> float | None:
    """When every gateway that answers held the worker as accepting again."""
    return _first(tl, lambda gs: bool(gs) and all(_holds(s, w) for s in gs))


def _links_at_most(n: int) -> Callable[[list[dict[str, Any]]], bool]:
    def cond(gs: list[dict[str, Any]]) -> bool:
        ws = [w for s in gs for w in s["workers"].values()]
        return bool(ws) and all(w["links"] is not None and w["links"] <= n for w in ws)

    return cond


def _gateway_gone(g: str, tl: Timeline, start: float, others: int) -> dict[str, Any]:
    """When the workers the other gateways hold linked to ``others`` gateways (one fewer), and when
    central listed the gateway as not live."""
    dropped = next((t for t, _, c in tl if c is not None and not c.get(g, False)), None)
    return {
        "detected_s": _since(_first(tl, _links_at_most(others)), start),
        "central_dropped_s": _since(dropped, start),
    }


def _gateway_back(g: str, tl: Timeline, gateways: int) -> float | None:
    """When every worker linked to all ``gateways`` again and central listed ``g`` as live."""
    linked = [x for x in tl if _links_at_most(gateways)(list(x[1].values()))]
    full = [
        t
        for t, lt, c in linked
        if c and c.get(g) and all(w["links"] == gateways for s in lt.values() for w in s["workers"].values())
    ]
    return full[0] if full else None


CRASHES = ("crash", "crash-joining", "crash-draining")  # as in faults.py (kept free of its imports)
# Issue 23: a gateway machine lost, the devices carry on (through the cluster's other gateway or the
# other site) within this, 0 failed requests through shoal.client.
GATEWAY_LOST_TARGET_S = 3.0
CUT_OFF = ("partition", "drop")
IMPAIRED = ("lossy", "slow")


def _served(samples: list[dict[str, Any]], gateways: set[str], lo: float, hi: float) -> dict[str, int]:
    """Requests each worker answered in [lo, hi), by the gateways' counters (a counter that went back,
    a worker that rejoined, counts again from zero)."""
    prev: dict[tuple[str, str], int] = {}
    out: dict[str, int] = {}
    for s in sorted(samples, key=lambda s: s["t"]):
        if s["source"] not in gateways or not s["ok"] or not lo <= s["t"] < hi:
            continue
        for w, v in s["workers"].items():
            key, served = (s["source"], w), v.get("served") or 0
            if key in prev:
                out[w] = out.get(w, 0) + (served - prev[key] if served >= prev[key] else served)
            else:
                out.setdefault(w, 0)
            prev[key] = served
    return out


def _share(served: dict[str, int], worker: str) -> float | None:
    total = sum(served.values())
    return round(served.get(worker, 0) / total, 3) if total else None


def _worker_impaired(
    w: str, samples: list[dict[str, Any]], tl: Timeline, start: float, heal: float, gateways: set[str]
) -> dict[str, Any]:
    """A worker whose link was slow or lossy: whether a gateway took it for lost meanwhile
    (``dropped_s``: when a gateway first held it as not accepting or not at all; None: never), and
    its share of the answers in the 5 s before and during the fault."""
    dropped = _first([x for x in tl if x[0] < heal], lambda gs: any(not _holds(s, w) for s in gs))
    return {
        "dropped_s": _since(dropped, start),
        "its_share_before": _share(_served(samples, gateways, start - 5.0, start), w),
        "its_share_during": _share(_served(samples, gateways, start, heal), w),
    }


def _worker_started(f: dict[str, Any], samples: list[dict[str, Any]], gateways: set[str]) -> dict[str, Any]:
    """A worker the fault started on an idle machine: when a gateway first held it (from its start),
    and what it answered before it was lost."""
    w, started, start = f["machine"], f["started"], f["start"]
    joined = next(
        (s["t"] for s in samples if s["source"] in gateways and s["ok"] and s["t"] >= started and w in s["workers"]),
        None,
    )
    out = {
        "joined_s": _since(joined, started),
        "served_before_lost": _served(samples, gateways, started, start + 0.2).get(w, 0),
    }
    if "drain" in f:
        # Draining, it was already not accepting: detected when its requests went elsewhere (the
        # gateways' logs) or it left the pools.
        out["lost_after_drain_s"] = round(start - f["drain"], 3)
        out["held_at_drain"] = f.get("held_at_drain")
        back = [h["after_s"] for hs in (f.get("handed_back") or {}).values() for h in hs]
        left = next(
            (
                s["t"]
                for s in samples
                if s["source"] in gateways and s["ok"] and s["t"] >= start and w not in s["workers"]
            ),
            None,
        )
        out["detected_s"] = min(back) if back else _since(left, start)
    return out


def role(machine: str, gateways: set[str]) -> str:
    """What a machine runs, by the lab's names: gateway, central, database, wan or worker."""
    if machine in gateways:
        return "gateway"
    if machine.startswith("central"):
        return "central"
    return {"db": "database", "wan": "wan"}.get(machine, "worker")


def _probes(samples: list[dict[str, Any]], lo: float, hi: float, skip: set[str]) -> list[dict[str, Any]]:
    """The route probes in [lo, hi) of the replicas not in ``skip``."""
    return [
        s
        for s in samples
        if s["source"].startswith("route-") and s["source"][6:] not in skip and lo <= s["t"] < hi
    ]


def _central_rows(
    f: dict[str, Any],
    role_: str,
    samples: list[dict[str, Any]],
    start: float,
    nxt: float,
    down: set[str],
    gw_urls: dict[str, str],
) -> tuple[dict[str, Any], float | None]:
    """The rows of a fault on central's side (a replica, the database, the WAN) and when it recovered
    (None: not yet; for a crash the caller decides)."""
    m = f["machine"]
    rec: dict[str, Any] = {}
    if role_ == "central":
        gone = next((s["t"] for s in samples if s["source"] == m and s["t"] >= start and not s["ok"]), None)
        rec["detected_s"] = _since(gone, start)
        ps = _probes(samples, start, nxt, down | {m})
        rec["routes_by_survivors"] = {
            "answered": sum(1 for p in ps if p["ok"] and p["code"] == 200),
            "asked": len(ps),
        }
        return rec, None
    heal = f.get("heal", start)
    live_gws = {u for u, g in gw_urls.items() if g not in down}
    if role_ == "database":
        ps = _probes(samples, start, heal, down)
        rec["routes_while_down"] = {
            "answered": sum(1 for p in ps if p["ok"] and p["code"] == 200),
            "refused": sum(1 for p in ps if p["ok"] and p["code"] != 200),
            "unanswered": sum(1 for p in ps if not p["ok"]),
        }
        latest: dict[str, bool] = {}
        back = None
        replicas = {p["source"] for p in _probes(samples, start, nxt, down)}
        for p in sorted(_probes(samples, heal, nxt, down), key=lambda p: p["t"]):
            latest[p["source"]] = p["ok"] and p["code"] == 200
            if set(latest) == replicas and all(latest.values()):
                back = p["t"]
                break
        rec["recovered_s"] = _since(back, heal)
        return rec, back
    # the WAN: reports and routes while it is on
    lists = [s for s in samples if s["source"].startswith("central") and s["ok"] and start <= s["t"] < heal]
    gw_names = set(gw_urls.values()) - down
    rec["central_listed_live"] = (
        round(sum(1 for s in lists if all(s["gateways"].get(g) for g in gw_names)) / len(lists), 3)
        if lists
        else None
    )
    ps = [p for p in _probes(samples, start, heal, down) if p["ok"] and p["code"] == 200]
    rec["routes_complete"] = (
        round(sum(1 for p in ps if live_gws <= {u.rstrip("/") for u in p["gateways"]}) / len(ps), 3)
        if ps
        else None
    )
    rec["recovered_s"] = 0.0
    return rec, heal


def check(
    log: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    faults: list[dict[str, Any]],
    gateways: dict[str, str],
    warm: float | None = None,
    clusters: dict[str, dict[str, Any]] | None = None,
    edge_devices: set[str] | None = None,
) -> dict[str, Any]:
    """The run's summary. ``gateways``: gateway URL -> machine; ``faults``: ``faults.inject``'s
    records in order; ``warm``: when the system was first steady under load (the requests before it,
    routes asked for and connections opened, are the 'warm-up' phase); ``clusters``: name ->
    ``{"model", "gateways"}`` (machines), the first the one the faults hit (default: one cluster of
    every gateway; ``"workers"``, the machines of its workers, puts a worker's fault at its site: its
    rows are read from that site's gateways). Times in the summary are seconds from the first
    request."""
    reqs, counts = pair_requests(log)
    t0 = reqs[0]["sent"] if reqs else 0.0
    end = max((r["done"] or r["sent"] for r in reqs), default=t0)
    for r in reqs:
        r["machine"] = gateways.get((r["gateway"] or "").rstrip("/"), r["gateway"])
    gw_machines = set(next(iter(clusters.values()))["gateways"]) if clusters else set(gateways.values())
    if clusters:  # every answer from a gateway of the cluster that serves the request's model
        serving: dict[str, set[str]] = {}  # model -> the gateways of every cluster serving it
        for c in clusters.values():
            for model in c.get("models", [c["model"]]):
                serving.setdefault(model, set()).update(c["gateways"])
        counts["wrong_cluster"] = sum(
            1 for r in reqs if r["ok"] and r["model"] in serving and r["machine"] not in serving[r["model"]]
        )
    first_fault = faults[0]["start"] if faults else end
    warm = t0 if warm is None else warm
    before = [r["done"] - r["sent"] for r in reqs if r["ok"] and warm <= r["sent"] < first_fault]
    slow = max(1.0, 5 * float(np.percentile(before, 99) if before else 0.2))

    down: set[str] = set()  # machines taken down for good so far
    out_faults = []
    phases: dict[str, Any] = {"warm-up": _phase(reqs, t0, warm, t0)} if warm > t0 else {}
    mark = warm
    for i, f in enumerate(faults):
        start = f["start"]
        # Until the next fault, or the start of the worker it starts first (its slow batches).
        nxt = min(faults[i + 1]["start"], faults[i + 1].get("started", end)) if i + 1 < len(faults) else end + 1.0
        m = f["machine"]
        # The gateways that hold the machine's worker: its own site's (the first site's by default).
        its_gws = next(
            (set(c["gateways"]) for c in (clusters or {}).values() if m in c.get("workers", ())), gw_machines
        )
        tl = _timeline(samples, its_gws, start, nxt)
        rec: dict[str, Any] = {"fault": f["label"], "at_s": round(start - t0, 3)}
        if its_gws != gw_machines:
            rec["site"] = next(n for n, c in (clusters or {}).items() if set(c["gateways"]) == its_gws)
        recovered_at = None
        r_ = role(m, gw_machines)
        if r_ in ("central", "database", "wan"):
            if "heal" in f:
                rec["heal_at_s"] = round(f["heal"] - t0, 3)
            site = {u: g for u, g in gateways.items() if g in gw_machines}  # the cluster the faults hit
            more, recovered_at = _central_rows(f, r_, samples, start, nxt, down, site)
            rec.update(more)
        elif m in gw_machines:
            others = len(gw_machines - down - {m})
            rec.update(_gateway_gone(m, tl, start, others))
            if not others:  # its cluster's last gateway: no worker links left to count; central's view
                rec["detected_s"] = rec["central_dropped_s"]
            last = [r["machine"] for r in reqs if r["ok"] and start - 2.0 <= r["done"] < start]
            rec["its_share_before"] = round(last.count(m) / len(last), 3) if last else None
        elif f["kind"] in IMPAIRED:
            rec.update(_worker_impaired(m, samples, tl, start, f["heal"], its_gws))
            recovered_at = f["heal"]
        elif f["kind"] == "serve":  # not a fault: the other site takes the model too
            recovered_at = f["serving"]
            rec["serving_s"] = _since(recovered_at, start)
        else:
            rec.update(_worker_gone(m, tl, start))
            if f["kind"] in ("crash-joining", "crash-draining"):
                rec.update(_worker_started(f, samples, its_gws))
        if "handed_back" in f:  # from the gateways' logs: what the lost worker held, sent elsewhere
            rec["handed_back"] = f["handed_back"]
        if "frames" in f:  # shoal.lab.netem's counters: frames it let through and lost, each way
            rec["frames"] = f["frames"]
        if r_ in ("central", "database", "wan"):
            if f["kind"] == "crash":
                down.add(m)
        elif f["kind"] == "serve":
            rec["recovered_s"] = rec["serving_s"]
        elif f["kind"] in IMPAIRED:
            rec["heal_at_s"] = round(f["heal"] - t0, 3)
            rec["recovered_s"] = 0.0
        elif f["kind"] in CUT_OFF:
            heal = f["heal"]
            rec["heal_at_s"] = round(heal - t0, 3)
            after_heal = [x for x in tl if x[0] >= heal]
            recovered_at = (
                _gateway_back(m, after_heal, len(gw_machines - down))
                if m in gw_machines
                else _worker_back(m, after_heal)
            )
            rec["recovered_s"] = _since(recovered_at, heal)
            if m in gw_machines:  # back in the routes central answers
                url = next(u for u, g in gateways.items() if g == m)
                named = next(
                    (
                        p["t"]
                        for p in _probes(samples, heal, nxt, down)
                        if p["ok"] and url in {u.rstrip("/") for u in p["gateways"]}
                    ),
                    None,
                )
                rec["in_routes_s"] = _since(named, heal)
        else:
            down.add(m)
            if m in gw_machines:
                rec["answers_from_it_after"] = sum(  # to requests sent after its link went down
                    1 for r in reqs if r["ok"] and r["machine"] == m and r["sent"] > start
                )
        # The requests the fault held up: in flight at it or sent after it (before the next one).
        held = [
            r
            for r in reqs
            if r["sent"] < nxt
            and (r["done"] is None or start <= r["done"] < nxt)
            and (r["done"] is None or not r["ok"] or r["machine"] in down or r["done"] - r["sent"] > slow)
        ]
        dev_rec = max((r["done"] or end for r in held), default=start)
        rec["held_up_requests"] = len(held)
        rec["longest_held_s"] = round(max(((r["done"] or end) - r["sent"] for r in held), default=0.0), 3)
        rec["devices_recovered_s"] = round(dev_rec - start, 3)
        if f["kind"] in CRASHES:  # it does not come back: recovered when the devices carry on
            rec["recovered_s"] = rec["devices_recovered_s"]
            if m in gw_machines:
                edge = edge_devices or set()
                lan = [(r["done"] or end) - r["sent"] for r in held if r["id"].split("/")[0] not in edge]
                rec["target_s"] = GATEWAY_LOST_TARGET_S
                rec["within_target"] = max(lan, default=0.0) <= GATEWAY_LOST_TARGET_S
                if edge:
                    far = [(r["done"] or end) - r["sent"] for r in held if r["id"].split("/")[0] in edge]
                    rec["edge_longest_held_s"] = round(max(far, default=0.0), 3)
            after = [r for r in reqs if r["ok"] and dev_rec < r["sent"] < nxt]
            rec["survivors_share_after"] = (
                round(sum(1 for r in after if r["machine"] not in down) / len(after), 3) if after else None
            )
        if "recovered_s" not in rec:
            rec["recovered_s"] = None
        fault_end = max(x for x in (start, f.get("heal"), recovered_at, dev_rec) if x is not None)
        phases["before" if i == 0 else f"between {i} and {i + 1}"] = _phase(reqs, mark, start, t0)
        phases[f["label"]] = _phase(reqs, start, fault_end, t0)
        mark = fault_end
        out_faults.append(rec)
    phases["after" if faults else "all"] = _phase(reqs, mark, end + 1.0, t0)
    answered_by = Counter(r["machine"] for r in reqs if r["ok"])
    sites = {
        name: _site(name, c, reqs, samples, gateways, t0, first=i == 0)
        for i, (name, c) in enumerate((clusters or {}).items())
    }
    return {
        **counts,
        "duration_s": round(end - t0, 3),
        "answered_by": dict(sorted(answered_by.items())),
        **({"sites": sites} if len(sites) > 1 else {}),
        "slow_threshold_s": round(slow, 3),
        "faults": out_faults,
        "phases": phases,
    }


def _site(
    name: str,
    c: dict[str, Any],
    reqs: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    urls: dict[str, str],
    t0: float,
    first: bool,
) -> dict[str, Any]:
    """A cluster's requests (those for its model) over the whole run, and, for a site other than
    the first (whose gateways the faults hit), how central saw it: ``central_listed_live`` (the
    share of central's lists naming every one of its gateways live: its reports crossed its WAN) and
    ``routes_to_it`` (the share of the route probes for its model answered that name its gateways
    and no other)."""
    mine = [r for r in reqs if r["model"] == c["model"]]
    p50, p99 = _pct([r["done"] - r["sent"] for r in mine if r["ok"]])
    out: dict[str, Any] = {
        "model": c["model"],
        "gateways": c["gateways"],
        "requests": len(mine),
        "answered": sum(1 for r in mine if r["ok"]),
        "failed": sum(1 for r in mine if r["done"] is not None and not r["ok"]),
        "p50_ms": p50,
        "p99_ms": p99,
    }
    if first:
        return out
    lo = min((r["sent"] for r in mine), default=t0)
    lists = [s for s in samples if s["source"].startswith("central") and s["ok"] and s["t"] >= lo]
    out["central_listed_live"] = (
        round(sum(1 for s in lists if all(s["gateways"].get(g) for g in c["gateways"])) / len(lists), 3)
        if lists
        else None
    )
    probes = [s for s in samples if s["source"].startswith(f"{name}-route-") and s["ok"] and s["t"] >= lo]
    answered = [p for p in probes if p["code"] == 200]
    def its_own(p: dict[str, Any]) -> bool:
        return bool(p["gateways"]) and all(urls.get(u.rstrip("/")) in c["gateways"] for u in p["gateways"])

    out["routes_asked"] = len(probes)
    out["routes_to_it"] = round(sum(1 for p in answered if its_own(p)) / len(answered), 3) if answered else None
    return out


def quiet_windows(phases: dict[str, Any], t0: float) -> list[tuple[float, float]]:
    """The phases between faults (before the first, between two, after the last), wall clock."""
    return [
        (p["from_s"] + t0, p["to_s"] + t0)
        for name, p in phases.items()
        if name in ("before", "after", "all") or name.startswith("between ")
    ]


def by_profile(
    logs: dict[str, list[dict[str, Any]]], quiet: list[tuple[float, float]]
) -> dict[str, dict[str, Any]]:
    """Each group of devices (the devices behind one link profile: their own log) over the whole run:
    requests, answered, failed, p50/p99, the longest request; and p50/p99 of the requests sent in the
    ``quiet`` windows (between the faults), the link's own cost."""
    out = {}
    for name, log in logs.items():
        reqs, counts = pair_requests(log)
        ok = [r for r in reqs if r["ok"]]
        p50, p99 = _pct([r["done"] - r["sent"] for r in ok])
        q50, q99 = _pct([r["done"] - r["sent"] for r in ok if any(lo <= r["sent"] < hi for lo, hi in quiet)])
        out[name] = {
            "requests": counts["requests"],
            "answered": counts["answered"],
            "failed": counts["failed"],
            "lost": counts["lost"],
            "p50_ms": p50,
            "p99_ms": p99,
            "longest_s": round(max((r["done"] - r["sent"] for r in ok), default=0.0), 3),
            "between_faults_p50_ms": q50,
            "between_faults_p99_ms": q99,
        }
    return out


def _phase(reqs: list[dict[str, Any]], lo: float, hi: float, t0: float) -> dict[str, Any]:
    inside = [r for r in reqs if lo <= r["sent"] < hi]
    p50, p99 = _pct([r["done"] - r["sent"] for r in inside if r["ok"]])
    return {
        "from_s": round(lo - t0, 3),
        "to_s": round(hi - t0, 3),
        "requests": len(inside),
        "failed": sum(1 for r in inside if r["done"] is not None and not r["ok"]),
        "p50_ms": p50,
        "p99_ms": p99,
    }


def passed(summary: dict[str, Any]) -> bool:
    """No request failed, lost, answered twice or answered wrongly, every fault was detected and
    recovered, and the devices carried on within the target where a gateway's machine was lost."""
    clean = not any(
        summary.get(k)
        for k in ("failed", "lost", "answered_twice", "answers_never_sent", "wrong_answers", "wrong_cluster")
    )
    return clean and all(
        f.get("detected_s", 0) is not None and f["recovered_s"] is not None and f.get("within_target", True)
        for f in summary["faults"]
    )
