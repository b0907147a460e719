"""The ``ray`` engine: each worker is a Ray actor, placed by resources anywhere on a Ray cluster.

```yaml
autoscale:
  engine: ray
  ray: {address: auto, namespace: shoal}   # auto: the cluster this machine is a node of
  worker_gateway: 10.0.0.5:8003             # where actors on other machines reach this gateway
  models:
    mnist-cnn:
      max: 8
      resources: {cpus: 1, memory_mb: 512, custom: {site-a: 1}}
```

One actor per worker, named after the worker id in the namespace, holding the model's resources for
its whole life. Its constructor starts ``shoal worker`` (the same command line as every engine) in a
thread, so an actor Ray restarts after its node or process died serves again by itself: it dials the
gateway with the same worker id. Actors are not detached: they end with the gateway's driver.

The gateway's event loop never waits on Ray: actors are created and killed in threads, and whether a
worker still runs is read from a pending ``ping`` call with ``ray.wait(timeout=0)``. ``ping`` returns
the worker's exit status when its ``run`` ends (a drain completed, or it was refused); an actor that is
dead for good fails it. Ray retries ``ping`` on a restarted actor, so a restart is not an exit.

An actor no node can host waits for placement (Ray's autoscaler adds a node if it is set up); the
controller gives it up after ``start_timeout_s`` and the reason, such as ``no node offers
{"site-a": 1}``, reaches the status.

Ray stays on loopback and silent where shoal starts it: ``quiet_ray_env`` and ``ray_home`` (used by
this engine, the tests and the benchmarks; see docs/elastic.md, "Ray").
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.aio import split_hostport
from shoal.autoscale.config import AutoscaleConfig, Resources
from shoal.autoscale.engine import Engine, EngineError, EngineWorker, WorkerLaunch, worker_argv

log = logging.getLogger("shoal.autoscale")

# Set before Ray is imported, in every process that imports or starts it (values already set win).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    # On Linux, 0 makes a node whose address is not given use 127.0.0.1 rather than probing for its
    # outward address; nodes of a multi-machine cluster are started with --node-ip-address.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # With usage stats off, Ray's dashboard still posts a "disabled" notice to usage-stats.ray.io when a
    # cluster starts: a URL requests has no adapter for keeps that inside the process.
    "RAY_USAGE_STATS_REPORT_URL": "file:///dev/null",
}

STOP_TIMEOUT_S = 10.0  # the longest a stopping gateway waits on Ray (a lost head makes it wait minutes)

BOOTSTRAP_NAME = "ray_bootstrap_config.yaml"
BOOTSTRAP_TEXT = """\
# Written by shoal. Ray reads ~/ray_bootstrap_config.yaml when a cluster starts; where the file is
# missing it asks cloud metadata services (169.254.169.254, metadata.google.internal) which cloud it
# runs on. An empty cluster description: a manually started cluster, no cloud.
{}
"""


def quiet_ray_env(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Keep Ray on loopback and silent: ``RAY_ENV`` set in ``env`` (default: this process's
    environment) wherever it is not set already. Returns ``env``."""
    env = os.environ if env is None else env
    for k, v in RAY_ENV.items():
        env.setdefault(k, v)
    return env


def ray_home(home: str | Path) -> Path:
    """Make sure ``home`` (the HOME of a process that starts Ray) holds a
    ``ray_bootstrap_config.yaml``; one already there is left as it is. Returns its path."""
    path = Path(home).expanduser() / BOOTSTRAP_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(BOOTSTRAP_TEXT)
    return path


def import_ray() -> Any:
    """``import ray`` after ``quiet_ray_env``; EngineError saying what to install if it is missing."""
    quiet_ray_env()
    try:
        import ray
    except ImportError:
        raise EngineError("engine: ray needs Ray on the gateway and every node: pip install 'shoal[ray]'") from None
    return ray


# ------------------------------------------------------------------------------------ placement


def ray_resources(r: Resources) -> dict[str, float]:
    """A worker's resources in Ray's names (CPU, GPU, memory in bytes, custom as given)."""
    out: dict[str, float] = {"CPU": float(r.cpus)}
    if r.gpus:
        out["GPU"] = float(r.gpus)
    if r.memory_mb:
        out["memory"] = float(r.memory_mb) * 1024 * 1024
    out.update({k: float(v) for k, v in r.custom.items()})
    return out


def _config_names(demand: dict[str, float]) -> dict[str, float]:
    """Ray's resource names back in the configuration's (cpus, gpus, memory_mb, custom names)."""
    names = {"CPU": "cpus", "GPU": "gpus", "memory": "memory_mb"}
    return {
        names.get(k, k): (round(v / 1024 / 1024) if k == "memory" else (int(v) if v == int(v) else v))
        for k, v in demand.items()
    }


def placement_problem(demand: dict[str, float], nodes: list[dict[str, Any]]) -> str:
    """Why no live node of the cluster could ever host an actor asking for ``demand`` (Ray's resource
    names); "" when one could (it may still wait for another actor to leave). ``nodes`` as
    ``ray.nodes()`` lists them."""
    totals = [n.get("Resources") or {} for n in nodes if n.get("Alive")]
    if any(all(t.get(k, 0.0) >= v for k, v in demand.items() if v > 0) for t in totals):
        return ""
    nowhere = {k: v for k, v in demand.items() if v > 0 and not any(t.get(k, 0.0) >= v for t in totals)}
    if not totals:
        what = "the cluster has no live node"
    elif nowhere:
        what = f"no node offers {json.dumps(_config_names(nowhere))}"
    else:
        what = f"no node offers all of {json.dumps(_config_names(demand))} at once"
    return f"{what}; Ray's autoscaler adds one if configured"


# --------------------------------------------------------------------------------------- engine


@dataclass
class RayWorker(EngineWorker):
    worker_id: str
    actor: Any
    ping: Any  # ObjectRef of the pending ping
    where_ref: Any
    demand: dict[str, float]
    engine: RayEngine
    waiting: str = ""  # why it is not placed, while it is not
    where: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    code: int | None = None

    def exit_code(self) -> int | None:
        if self.code is not None:
            return self.code
        ray = self.engine.ray
        if not self.where and ray.wait([self.where_ref], timeout=0)[0]:
            try:
                self.where = ray.get(self.where_ref, timeout=0)
                self.waiting = ""
            except ray.exceptions.RayError:
                self.where = {"node": "?"}
        if not ray.wait([self.ping], timeout=0)[0]:
            return None
        try:
            code, output = ray.get(self.ping, timeout=0)
            self.code = int(code)
            if self.code != 0:
                self.error = output
        except ray.exceptions.RayError as e:  # an actor dead for good (killed, or it could not start)
            # Its node, its owner or Ray killed it: nothing the model chose, so -1 (an unknown end),
            # which the controller replaces with back-off but never counts towards marking the model
            # unavailable. (A worker whose model does not load ends its run with 1 or 2: ping's answer.)
            self.code, self.error = -1, _first_line(e)
        self.engine.kill_soon(self)  # its worker has ended: free the actor's resources
        return self.code

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"worker_id": self.worker_id, **self.where}
        if self.waiting and not self.where:
            d["placement"] = self.waiting
        if self.error:
            d["error"] = self.error
        return d


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray waits minutes on a ``host:port`` where no cluster answers: find out first."""
    if address == "auto" or "://" in address:
        return  # auto fails at once when there is no cluster; Ray Client has its own timeout
    host, port = split_hostport(address, 6379)
    try:
        socket.create_connection((host, port), timeout_s).close()
    except OSError as e:
        raise EngineError(f"cannot join the Ray cluster at {address!r}: nothing answers there ({e})") from None


def local_address_towards(address: str) -> str | None:
    """The address of this machine from which ``address`` (the head's ``host:port``) is reached: the
    node the gateway's Ray driver must attach to. A UDP socket's ``connect`` only looks the route up
    (nothing is sent). None for ``auto``, Ray Client, or a host that cannot be looked up.

    Ray itself, given no address, picks among the raylets it sees in the process table, preferring the
    head's: where several machines' raylets share one (containers or namespaces sharing a process
    view, as in ``shoal lab``), the gateway's driver attached to the head's raylet over the network,
    so the head's loss took the driver with it and Ray killed every actor it owned, even with GCS
    fault tolerance."""
    if address == "auto" or "://" in address:
        return None
    host, port = split_hostport(address, 6379)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return None


async def off_loop(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a daemon thread of its own, awaited. Not ``asyncio.to_thread``: the default
    executor's threads are joined when the process exits, and a call into a Ray cluster whose head is
    lost waits a minute or more for its control store, so a stopping gateway waited for it (found by
    ``shoal lab --scenario ray``)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def run() -> None:
        try:
            ok, value = True, fn(*args)
        except BaseException as e:  # handed to the awaiting coroutine
            ok, value = False, e
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=run, name="ray-call", daemon=True).start()
    return await fut


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class RayEngine(Engine):
    name = "ray"

    def __init__(self, cfg: AutoscaleConfig) -> None:
        self.cfg = cfg
        self.ray: Any = None
        self._remote: Any = None
        self._background: set[asyncio.Future] = set()
        self._nodes = 0
        self._here = ""  # the node this driver attached to
        self._resources: dict[str, float] = {}

    async def start(self) -> None:
        ray = import_ray()
        opts = self.cfg.ray

        def connect() -> None:
            _check_reachable(opts.address)
            here = opts.node_ip_address or local_address_towards(opts.address)
            # In a thread: Ray then leaves this process's SIGTERM handler (the gateway's drain) alone,
            # and says so; that is what is wanted here.
            logging.getLogger("ray._private.worker").addFilter(lambda r: "SIGTERM handler" not in r.getMessage())
            ray.init(
                address=opts.address,
                namespace=opts.namespace,
                log_to_driver=True,  # workers' log lines appear in the gateway's log, marked with their actor
                logging_level=logging.WARNING,
                ignore_reinit_error=True,
                **({"_node_ip_address": here} if here else {}),
            )
            self._here = ray.get_runtime_context().get_node_id()[:12] + (f" at {here}" if here else "")
            self._nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            self._resources = ray.cluster_resources()

        try:
            await off_loop(connect)
        except EngineError:
            raise
        except Exception as e:  # ConnectionError, ValueError, RuntimeError from Ray
            raise EngineError(f"cannot join the Ray cluster at {opts.address!r}: {_first_line(e)}") from None
        self.ray = ray
        # The actor runs a worker, in a process of its own: the engine names its class for Ray and
        # never runs it here (as the local engine names ``python -m shoal.worker.zygote``).
        actor = importlib.import_module("shoal.worker.ray_actor").WorkerActor
        self._remote = ray.remote(actor)
        log.info(
            "ray engine: joined %s (namespace %s, %d nodes, %s; this driver on node %s)",
            opts.address,
            opts.namespace,
            self._nodes,
            json.dumps(_config_names({k: v for k, v in self._resources.items() if ":" not in k and "object_store" not in k})),
            self._here,
        )

    async def launch(self, req: WorkerLaunch) -> EngineWorker:
        if self.ray is None:
            raise EngineError("the Ray engine is not connected")
        ray = self.ray
        r = req.scale.resources
        demand = ray_resources(r)
        argv = worker_argv(req)

        def create() -> RayWorker:
            actor = self._remote.options(
                # max_restarts -1: Ray restarts the actor wherever it can when its node or process
                # dies. max_task_retries -1: a pending ping follows it across restarts.
                max_restarts=-1,
                max_task_retries=-1,
                max_concurrency=4,
                name=req.worker_id,
                namespace=self.cfg.ray.namespace,
                num_cpus=r.cpus,
                num_gpus=r.gpus,
                memory=int(r.memory_mb * 1024 * 1024) if r.memory_mb else None,
                resources=dict(r.custom) or None,
            ).remote(argv, req.secret.decode())
            w = RayWorker(req.worker_id, actor, actor.ping.remote(), actor.where.remote(), demand, self)
            w.waiting = placement_problem(demand, ray.nodes())
            return w

        try:
            w = await off_loop(create)
        except Exception as e:  # a taken name, a resource Ray refuses, a lost cluster
            raise EngineError(f"Ray refused actor {req.worker_id}: {_first_line(e)}") from None
        if w.waiting:
            log.warning("%s: %s", req.worker_id, w.waiting)
        return w

    def _kill(self, w: RayWorker) -> None:
        try:
            self.ray.kill(w.actor, no_restart=True)
        except Exception as e:  # already gone, or the cluster is: nothing more to free
            log.debug("ray.kill %s: %s", w.worker_id, e)

    def kill_soon(self, w: RayWorker) -> None:
        """Kill the actor without waiting (from ``exit_code``, on the event loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop running here: do it now
            self._kill(w)
            return
        fut = loop.create_task(off_loop(self._kill, w))
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    async def terminate(self, w: EngineWorker) -> None:
        assert isinstance(w, RayWorker)
        if w.code is None and not w.where:
            # Never placed: say why, as the cluster stands now (the controller reports it).
            try:
                # ray.nodes() in the thread too: it waits for the control store, which may be lost
                w.waiting = await off_loop(lambda: placement_problem(w.demand, self.ray.nodes())) or (
                    "not placed yet: the nodes that could host it are busy"
                )
            except Exception as e:
                w.waiting = f"not placed; the Ray cluster did not answer: {_first_line(e)}"
        await off_loop(self._kill, w)
        if w.code is None:
            w.code = -int(signal.SIGKILL)

    async def stop(self, workers: list[EngineWorker], timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Kill the actors and leave the cluster, waiting at most ``timeout_s``: where the head is
        lost, each of Ray's calls waits for its control store (a minute or more), and a gateway told
        to stop must not wait with it (found by ``shoal lab --scenario ray``: the gateway outlived its
        SIGTERM). The calls go on in a daemon thread, which does not hold the process's exit; the
        actors are not detached, so Ray ends them with this driver."""
        if self.ray is None:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        ray = self.ray

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def end_all() -> None:
            try:
                for w in workers:
                    assert isinstance(w, RayWorker)
                    self._kill(w)
                    if w.code is None:
                        w.code = -int(signal.SIGKILL)
                ray.shutdown()
            except Exception as e:  # the cluster is gone: nothing more to free here
                log.debug("ray engine stop: %s", e)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop already closed: nobody waits
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=end_all, name="ray-engine-stop", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.gather(done, *self._background, return_exceptions=True), timeout_s)
        except asyncio.TimeoutError:
            # Ray's own exit hook would call shutdown again at the interpreter's exit and wait, with
            # the lock the stuck call holds, for the lost control store: the process would outlive
            # its stop (the lab: 60 s and more after its SIGTERM). Not registered any more.
            atexit.unregister(ray.shutdown)
            log.warning(
                "ray engine: the Ray cluster did not answer within %g s while stopping; leaving it "
                "(the actors end with this driver)",
                timeout_s,
            )

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "address": self.cfg.ray.address,
            "namespace": self.cfg.ray.namespace,
            "nodes_at_start": self._nodes,
        }


# --------------------------------------------------------------------------- a local Ray head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRayHead:
    """A Ray head on loopback for tests and benchmarks: ``ray start --head --block`` with a HOME of its
    own (holding the bootstrap file) and ``quiet_ray_env``; stopped by its own process id, which takes
    Ray's processes with it."""

    workdir: Path
    cpus: int = 2
    resources: dict[str, float] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment of every process that starts Ray or joins it as a driver here."""
        env = dict(os.environ)
        env["HOME"] = str(self.workdir / "home")
        ray_home(env["HOME"])
        return dict(quiet_ray_env(env))

    def start(self, timeout: float = 90.0) -> LocalRayHead:
        ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if ray_cli is None:
            raise RuntimeError("the ray command is not installed (pip install 'shoal[ray]')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        # Ray's socket paths must stay short: its temporary folder goes under /tmp, not workdir.
        self.temp_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"ray-{os.getpid()}-{self.port}"
        cmd = [
            ray_cli, "start", "--head", "--block", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
            "--include-dashboard", "false", "--disable-usage-stats", "--num-cpus", str(self.cpus),
            "--num-gpus", "0", "--temp-dir", str(self.temp_dir),
        ]
        # Ports Ray would otherwise take at fixed numbers (10001, 8265, 52365 ...): free ones, so that
        # two heads on one machine do not collide.
        for opt in ("ray-client-server", "dashboard", "dashboard-agent-listen", "dashboard-agent-grpc",
                    "runtime-env-agent", "metrics-export", "node-manager", "object-manager"):
            cmd += [f"--{opt}-port", str(free_port())]
        if self.resources:
            cmd += ["--resources", json.dumps(self.resources)]
        self.log = self.workdir / "ray-head.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(),
                start_new_session=True,
            )
        end = time.monotonic() + timeout
        while b"will now block" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"the Ray head did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)  # `ray start --block` ends the processes it started
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: only Ray's processes
            p.wait(5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
