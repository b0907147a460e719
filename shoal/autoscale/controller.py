"""The autoscaler inside a gateway: every ``interval_s`` it samples each managed model version's load
from its pool, asks the policy (``policy.decide``) how many workers it should have, and makes it so
through the engine: launching workers, or draining the ones ``policy.workers_to_stop`` picks. It also
keeps an eye on what it launched: a worker that exits before joining, or does not join within
``start_timeout_s``, is a failed start, retried with exponential back-off (never a crash loop) and
reported in the status; a drained worker that does not leave is stopped.

Only workers this controller launched are ever drained or stopped; workers started by hand count as
capacity and are left alone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.aio import cancel_and_wait
from shoal.autoscale.config import AutoscaleConfig, ModelScale
from shoal.autoscale.engine import Engine, EngineError, EngineWorker, WorkerLaunch
from shoal.autoscale.policy import LoadSample, ScalePolicy, WorkerView, decide, workers_to_stop
from shoal.autoscale.view import PoolControl, PoolView
from shoal.protocol.names import check_name

log = logging.getLogger("shoal.autoscale")

SAMPLES_KEPT = 1200  # the longest window any policy may look back over, in samples
EVENTS_KEPT = 500
MAX_BACKOFF_S = 60.0


class LoadFailed(Exception):
    """An operator's load whose workers failed to start again (the message says why)."""


@dataclass
class Launch:
    handle: EngineWorker
    launched_at: float
    joined: bool = False
    drain_at: float | None = None
    rejoining: bool = False  # it joined, left without ending, and is expected back


@dataclass
class Managed:
    """One model version under the controller."""

    name: str
    version: str
    scale: ModelScale
    policy: ScalePolicy
    pool: PoolView
    capacity_hint: int
    samples: deque[LoadSample] = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))
    launches: dict[str, Launch] = field(default_factory=dict)
    last_scale_t: float = -math.inf
    desired: int = 0
    reason: str = "starting"
    load: float = 0.0
    unloaded: bool = False
    failures: int = 0
    exits_before_joining: int = 0  # in a row: the model does not load
    unavailable: str = ""  # why the controller gave up on it; cleared by an operator's load
    next_launch_t: float = 0.0
    last_error: str = ""
    prev: tuple[float, int, float] | None = None  # (t, arrivals, busy_ms) at the last sample
    startup_s: float = 1.0  # how long its workers took from launch to join, recently

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def asleep(self) -> bool:
        return (
            not self.unloaded
            and not self.unavailable
            and self.policy.min_workers == 0
            and not self.pool.workers
            and not self.starting()
        )

    def starting(self) -> list[Launch]:
        return [x for x in self.launches.values() if not x.joined and x.handle.exit_code() is None]


class Autoscaler:
    def __init__(
        self,
        cfg: AutoscaleConfig,
        engine: Engine,
        gateway_address: Callable[[], str],
        secret: bytes,
        repo: str,
        control: PoolControl,
        name: str = "cluster",
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.control = control  # the pools' owner: every change to a pool or worker goes through it
        self.gateway_address = gateway_address
        self.secret = secret
        self.repo = repo
        self.prefix = f"{name}-{os.urandom(2).hex()}"
        self.managed: dict[str, Managed] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.counts = {"up": 0, "down": 0, "wake": 0, "sleep": 0, "start_failures": 0, "given_up": 0}
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        # A cluster served by several gateways: only the one deciding starts and stops workers, on
        # the load all of them carry; an operator's load or unload here is told to the others.
        self.deciding: Callable[[], bool] = lambda: True
        self.peer_load: Callable[[str, str], tuple[float, float]] = lambda name, version: (0.0, 0.0)
        self.on_operation: Callable[[str, str], None] = lambda name, action: None

    def manage(
        self, name: str, version: str, scale: ModelScale, pool: PoolView, capacity_hint: int
    ) -> Managed:
        check_name(name)  # engines put these on command lines and into paths
        check_name(version, "model version")
        m = Managed(name, version, scale, scale.policy(), pool, capacity_hint)
        self.managed[m.key] = m
        return m

    def find(self, name: str) -> list[Managed]:
        return [m for m in self.managed.values() if m.name == name]

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.engine.start()
        self._task = asyncio.create_task(self._loop(), name="autoscaler")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        mine = [x.handle for m in self.managed.values() for x in m.launches.values()]
        await self.engine.stop(mine)

    def poke(self) -> None:
        """Look now rather than at the next tick (a request arrived for a sleeping model)."""
        self._changed.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick(time.monotonic())
            except Exception:  # a bug here must not end autoscaling for good
                log.exception("autoscaler tick failed")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), self.cfg.interval_s)
            except asyncio.TimeoutError:
                pass

    # --------------------------------------------------------------------------------- a tick

    async def tick(self, now: float) -> None:
        for m in list(self.managed.values()):
            await self._reap(m, now)
            sample = self._sample(m, now)
            if sample is None:
                continue
            m.samples.append(sample)
            if m.unloaded:
                m.desired, m.reason = 0, "unloaded by an operator"
            elif m.unavailable:
                m.desired, m.reason = 0, f"unavailable: {m.unavailable}"
            else:
                lead = m.scale.lead_s if m.scale.lead_s is not None else min(10.0, m.startup_s)
                d = decide(m.samples, m.policy, now, m.last_scale_t, lead)
                m.desired, m.reason, m.load = d.desired, d.reason, d.load
            if not self.engine.external and self.deciding():
                await self._act(m, sample, now)

    def _sample(self, m: Managed, now: float) -> LoadSample | None:
        pool = m.pool
        if m.prev is None:
            m.prev = (now, pool.arrivals, pool.busy_ms)
            return None
        t0, a0, b0 = m.prev
        dt = now - t0
        if dt <= 0:
            return None
        m.prev = (now, pool.arrivals, pool.busy_ms)
        ready = [w for w in pool.workers if w.accepting]
        caps = [w.size for w in ready]  # a worker's whole capacity, not this gateway's share of it
        if caps:
            m.capacity_hint = max(caps)
        queue, in_flight = self.peer_load(m.name, m.version)
        return LoadSample(
            t=now,
            arrivals_per_s=(pool.arrivals - a0) / dt,
            queue=len(pool.queue) + int(queue),
            in_flight=pool.in_flight + int(in_flight),
            busy=(pool.busy_ms - b0) / 1000.0 / dt,
            cpu=sum(w.cpu_rate for w in ready),
            ready=len(ready),
            starting=len(m.starting()),
            draining=len(pool.workers) - len(ready),
            worker_capacity=m.capacity_hint,
            service_s=pool.service_ms / 1000.0,
        )

    async def _act(self, m: Managed, s: LoadSample, now: float) -> None:
        present = s.present
        if m.desired > present:
            if now < m.next_launch_t:
                return  # backing off after failed starts
            n = m.desired - present
            started = 0
            for _ in range(n):
                if await self._launch(m, now):
                    started += 1
                else:
                    break
            if started:
                kind = "wake" if present == 0 and m.policy.min_workers == 0 else "up"
                self._event(m, kind, present, present + started, now)
        elif m.desired < present:
            cut = present - m.desired
            stopped = 0
            for x in sorted(m.starting(), key=lambda x: -x.launched_at)[:cut]:  # not joined yet: cheapest
                await self.engine.terminate(x.handle)
                m.launches.pop(x.handle.worker_id, None)
                stopped += 1
            mine = {wid for wid, x in m.launches.items() if x.joined and x.drain_at is None}
            views = [
                WorkerView(w.worker_id, w.in_flight, w.joined_at)
                for w in m.pool.workers
                if w.accepting and w.worker_id in mine
            ]
            chosen = set(workers_to_stop(views, cut - stopped))
            for w in m.pool.workers:
                if w.worker_id in chosen:
                    self.control.drain_worker(m.pool, w, now)
                    m.launches[w.worker_id].drain_at = now
                    stopped += 1
            if stopped:
                self._event(m, "sleep" if m.desired == 0 else "down", present, present - stopped, now)

    async def _launch(self, m: Managed, now: float) -> bool:
        wid = f"{self.prefix}-{m.name}-{m.version}-{next(self._ids)}"
        req = WorkerLaunch(wid, m.name, m.version, m.scale, self.gateway_address(), self.secret, self.repo)
        try:
            handle = await self.engine.launch(req)
        except EngineError as e:
            self._failed(m, now, f"cannot start a worker: {e}")
            return False
        m.launches[wid] = Launch(handle, now)
        return True

    async def _reap(self, m: Managed, now: float) -> None:
        joined = {w.worker_id for w in m.pool.workers}
        for wid, x in list(m.launches.items()):
            if not x.joined and wid in joined:
                if not x.rejoining:
                    m.startup_s += 0.3 * ((now - x.launched_at) - m.startup_s)
                x.joined, x.rejoining = True, False
                m.failures = m.exits_before_joining = 0
            code = x.handle.exit_code()
            if code is not None:
                del m.launches[wid]
                if not x.joined and not x.rejoining:
                    why = f"worker {wid} exited with status {code} before joining ({_where(x)})"
                    self._failed(m, now, why)
                    # A status it chose (a model that does not load exits 1 or 2) counts towards giving
                    # up; a kill (negative) or an unknown end (-1: the local engine's pre-started
                    # interpreter died with it) says nothing about the model: back-off only.
                    if code > 0:
                        m.exits_before_joining += 1
                    if m.exits_before_joining >= m.scale.max_start_failures and not m.unavailable:
                        self._give_up(m, why)
                elif x.drain_at is None and code != 0:
                    self._failed(m, now, f"worker {wid} exited with status {code} ({_where(x)})")
                continue
            if x.joined and x.drain_at is None and wid not in joined:
                # Gone from the pool yet still running: it is being restarted (Ray restarts an actor
                # whose node died) or reconnects, and rejoins by itself. Starting again, not replaced.
                x.joined, x.rejoining, x.launched_at = False, True, now
            if not x.joined and now - x.launched_at > m.policy.start_timeout_s:
                await self.engine.terminate(x.handle)
                del m.launches[wid]
                self._failed(
                    m, now, f"worker {wid} did not join within {m.policy.start_timeout_s:g} s ({_where(x)})"
                )
            elif x.drain_at is not None and now - x.drain_at > self.cfg.drain_timeout_s + 10.0:
                await self.engine.terminate(x.handle)  # it was told to leave long ago
                del m.launches[wid]

    def _failed(self, m: Managed, now: float, why: str) -> None:
        m.failures += 1
        self.counts["start_failures"] += 1
        wait = min(MAX_BACKOFF_S, 2.0 ** (m.failures - 1))
        m.next_launch_t = now + wait
        m.last_error = why
        log.warning("%s: %s; next start in %.0f s (%d failures in a row)", m.key, why, wait, m.failures)

    def _give_up(self, m: Managed, why: str) -> None:
        """Its workers cannot load the model: stop starting them, and let its requests fail at once
        with the reason (the pool answers them 503) until an operator loads it again."""
        m.unavailable = f"its workers failed to start {m.exits_before_joining} times in a row (last: {why})"
        self.control.give_up(m.pool, m.unavailable)
        self.counts["given_up"] += 1
        log.error("%s: marked unavailable: %s; load it again once it is fixed", m.key, m.unavailable)

    def _event(self, m: Managed, kind: str, before: int, after: int, now: float) -> None:
        m.last_scale_t = now
        self.counts[kind] += 1
        ev = {
            "time": time.time(),
            "model": m.name,
            "version": m.version,
            "kind": kind,
            "from": before,
            "to": after,
            "reason": m.reason,
        }
        self.events.append(ev)
        log.info("%s: %s %d -> %d workers (%s)", m.key, kind, before, after, m.reason)

    # ------------------------------------------------------------------------ model management

    def mark(self, name: str, action: str) -> list[Managed]:
        """An operator's load or unload, here or at another gateway of the cluster: served again
        (neither unloaded nor given up), or refused and drained, by whichever gateway decides."""
        ms = self.find(name)
        for m in ms:
            if action == "unload":
                m.unloaded = True
                self.control.unload(m.pool, time.monotonic())
                continue
            m.unloaded = False
            self.control.load(m.pool)
            m.unavailable = ""
            m.failures = m.exits_before_joining = 0
            m.next_launch_t = 0.0
            if m.policy.min_workers == 0:
                self.control.wake(m.pool)  # a load counts as a request: it wakes a sleeping model
        self.poke()
        return ms

    async def load(self, name: str, timeout_s: float = 60.0) -> Managed:
        """Serve a model again (after an unload, or after it was marked unavailable): at least one
        worker, and wait until it is ready. ``LoadFailed`` when its workers fail to start again."""
        ms = self.mark(name, "load")
        self.on_operation(name, "load")
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if any(m.pool.ready for m in ms):
                return ms[0]
            if all(m.unavailable for m in ms):
                raise LoadFailed(f"failed to load '{name}': {ms[0].unavailable}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no worker of '{name}' became ready within {timeout_s:g} s ({ms[0].last_error})")

    async def unload(self, name: str, timeout_s: float = 60.0) -> None:
        """Stop serving a model: its workers drain and leave; requests for it are refused."""
        ms = self.mark(name, "unload")
        self.on_operation(name, "unload")
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if not any(x.joined or x.handle.exit_code() is None for m in ms for x in m.launches.values()):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"workers of '{name}' did not leave within {timeout_s:g} s")

    # ------------------------------------------------------------------------------------ views

    def state(self, m: Managed) -> str:
        if m.unloaded or (m.unavailable and not m.pool.ready):
            return "UNAVAILABLE"
        if m.pool.ready:
            return "READY"
        if m.starting():
            return "LOADING"
        if m.asleep():
            return "ASLEEP"
        return "UNAVAILABLE"

    def describe_model(self, m: Managed) -> dict[str, Any]:
        s = m.samples[-1] if m.samples else None
        now = time.monotonic()
        return {
            "desired": m.desired,
            "reason": m.reason,
            "load_workers": round(m.load, 3),
            "startup_s": round(m.startup_s, 2),
            "min": m.policy.min_workers,
            "max": m.policy.max_workers,
            "ready": s.ready if s else 0,
            "starting": len(m.starting()),
            "draining": s.draining if s else 0,
            "asleep": m.asleep(),
            "unloaded": m.unloaded,
            "unavailable": m.unavailable,
            "start_failures": m.failures,
            "last_error": m.last_error,
            "next_start_in_s": round(max(0.0, m.next_launch_t - now), 1) if m.failures else 0.0,
        }

    def describe(self) -> dict[str, Any]:
        return {
            **self.engine.describe(),
            "interval_s": self.cfg.interval_s,
            "models": {m.key: self.describe_model(m) for m in self.managed.values()},
            "counts": dict(self.counts),
            "events": list(self.events)[-20:],
        }


def _where(x: Launch) -> str:
    d = x.handle.describe()
    return (
        f"log: {d['log']}" if "log" in d else ", ".join(f"{k}={v}" for k, v in d.items() if k != "worker_id")
    )
