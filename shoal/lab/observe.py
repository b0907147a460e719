"""The lab's eyes on the wire: threads that live in the bridge's namespace (``world.enter``) and
reach the machines over the bridge, as a monitoring host on the same network would.

* ``Observer.call`` runs a function on one of those threads (whatever sockets it opens are on the
  bridge): central's and the gateways' HTTP APIs through ``LabCentral`` / ``LabGateway``, which are
  ``shoal.local``'s ``LocalCentral`` / ``LocalCluster`` at a machine's address instead of loopback.
* ``Observer.watch`` polls a gateway's ``/v2/status`` (every 100 ms) or central's cluster list
  (every 250 ms) until ``stop``; each poll is one sample, timed by the wall clock the devices' logs
  and the fault records use.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from shoal.client import OipHttpClient
from shoal.lab.world import enter
from shoal.local import LocalCentral, LocalCluster

T = TypeVar("T")


class _OnMachine:
    """A server at a lab machine's address rather than on loopback."""

    host: str
    http_port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


@dataclass
class LabGateway(_OnMachine, LocalCluster):
    """A gateway on a lab machine: its status over the bridge."""

    host: str = ""


@dataclass
class LabCentral(_OnMachine, LocalCentral):
    """Central on a lab machine: its operator API over the bridge."""

    host: str = ""


def gateway_sample(gw: LabGateway, locate: Callable[[int], str | None] | None = None) -> dict[str, Any]:
    """Which workers the gateway holds in its pools: id -> accepting, gateways the worker links to,
    requests this gateway has in flight at it and it has answered for this gateway; with
    ``locate``, also the machine each worker's process runs on (from its pid in the status)."""
    with gw.client(1.0) as c:  # a silent gateway is a failed sample within the poll's rhythm
        code, body = c.get_json("/v2/status")
    if code != 200:
        raise RuntimeError(f"status answered {code}")
    workers: dict[str, Any] = {}
    for m in body["models"]:
        for w in m["workers"]:
            workers[w["worker_id"]] = {
                "accepting": w["accepting"],
                "links": (w.get("load") or {}).get("links"),
                "in_flight": w["in_flight"],
                "served": w["served"],
            }
            if locate is not None:
                workers[w["worker_id"]]["machine"] = locate(int(w.get("pid") or 0))
    return {"workers": workers}


def central_sample(central: LabCentral) -> dict[str, Any]:
    """The gateways central lists, id -> live."""
    auth = base64.b64encode(f"{central.operator}:{central.operator_password}".encode()).decode()
    with OipHttpClient(central.url, timeout=1.0) as c:
        code, _, raw = c.request("GET", "/v1/clusters", None, {"Authorization": f"Basic {auth}"})
    if code != 200:
        raise RuntimeError(f"central answered {code}")
    body = json.loads(raw)
    return {"gateways": {g["id"]: g["live"] for c in body["clusters"] for g in c["gateways"]}}


def route_sample(central: LabCentral, device: str, password: str, model: str) -> dict[str, Any]:
    """A device's route as the replica answers it now: the HTTP status and the gateways it names."""
    auth = base64.b64encode(f"{device}:{password}".encode()).decode()
    body = json.dumps({"model": model}).encode()
    headers = {"Authorization": f"Basic {auth}", "Content-Type": "application/json"}
    with OipHttpClient(central.url, timeout=1.0) as c:
        code, _, raw = c.request("POST", "/v1/route", body, headers)
    if code != 200:
        return {"code": code, "gateways": []}
    r = json.loads(raw)
    return {"code": code, "gateways": [r["url"], *r.get("fallbacks", [])]}


class Observer:
    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 120.0) -> T:
        """``fn(*args)`` on a thread in the bridge's namespace; its result or its exception. The
        thread is a daemon: Ctrl+C while it waits leaves it behind without holding the exit up."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                enter(self.ns)
                box["value"] = fn(*args)
            except BaseException as e:  # handed to the caller
                box["error"] = e

        th = threading.Thread(target=target, name="lab-call", daemon=True)
        th.start()
        th.join(timeout)
        if th.is_alive():
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not return within {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def watch(self, source: str, sample: Callable[[], dict[str, Any]], every: float) -> None:
        def loop() -> None:
            enter(self.ns)
            while not self._stop.is_set():
                t = time.time()
                try:  # an answer is timed when it came (a poll may take a while on a busy machine)
                    s = {**sample(), "source": source, "ok": True}
                    s["t"] = time.time()
                except Exception as e:  # an unreachable or crashed machine is a sample too
                    s = {"t": t, "source": source, "ok": False, "error": f"{type(e).__name__}: {e}"}
                self.samples.append(s)
                self._stop.wait(max(0.0, every - (time.time() - t)))

        th = threading.Thread(target=loop, name=f"lab-watch-{source}", daemon=True)
        th.start()
        self._threads.append(th)

    def latest(self, source: str) -> dict[str, Any] | None:
        return next((s for s in reversed(self.samples) if s["source"] == source), None)

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(5)
