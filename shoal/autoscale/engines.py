"""Where workers run: one small interface, an engine per place. The controller decides how many
workers a model needs and which to drain; an engine only starts a worker process somewhere, tells
whether it is still running, and stops it when asked (after a drain that did not end, or a start that
never joined).

* ``local``: ``shoal worker`` processes on this machine (the demo, tests, small sites).
* ``ray``: workers as Ray actors placed by resources over a Ray cluster (``ray_engine.py``).

The interface they share is ``engine.py``.
* ``kubernetes``: nothing is started here; the gateway exports the desired count as a metric and the
  cluster's own autoscaler (KEDA or the HPA, ``deploy/kubernetes``) acts on it.

Workers dial the gateway and log in like any other; the engine names each one (``--worker-id``) so
the controller knows which joined worker it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.aio import cancel_and_wait
from shoal.autoscale.config import AutoscaleConfig
from shoal.autoscale.engine import Engine, EngineError, EngineWorker, WorkerLaunch, worker_argv

log = logging.getLogger("shoal.autoscale")


# ------------------------------------------------------------------------------------------ local

ZYGOTE_ANSWER_S = 10.0  # a pre-started interpreter slower than this to answer is stuck: it is replaced
EXIT_REPORT_S = 2.0  # a worker's end is seen on its pidfd; its status comes from the zygote within this
ZYGOTE_STABLE_S = 30.0  # a zygote that lived this long before dying is restarted at once
UNKNOWN_EXIT = -1  # the exit status of a worker whose zygote died before reporting it


def zygote_restart_delay(short_lives: int) -> float:
    """Seconds before a new pre-started interpreter starts, after ``short_lives`` of them in a row
    died within ``ZYGOTE_STABLE_S`` of starting: at once for the first, then 1, 2, 4 ... 60 s, so one
    that keeps dying does not spin (fresh processes start the workers meanwhile)."""
    return 0.0 if short_lives <= 1 else min(60.0, 2.0 ** (short_lives - 2))


@dataclass(eq=False)
class _Zygote:
    proc: asyncio.subprocess.Process
    started_at: float
    pending: deque[asyncio.Future[Any]] = field(default_factory=deque)  # launches awaiting its answer
    alive: bool = True
    task: asyncio.Task | None = None


@dataclass(eq=False)
class _Forked:
    """A worker a zygote forked. Its end is seen on a pidfd whoever its parent is by then; its exit
    status comes from the zygote's report, or is ``UNKNOWN_EXIT`` when the zygote died first."""

    pid: int
    zygote: _Zygote
    pidfd: int | None = None
    ended: bool = False
    code: int | None = None
    lost: str = ""  # why the status is unknown
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class LocalWorker(EngineWorker):
    worker_id: str
    pid: int
    log_path: Path
    forked: _Forked | None = None  # started by the zygote
    proc: asyncio.subprocess.Process | None = None  # or as a fresh process

    def exit_code(self) -> int | None:
        if self.proc is not None:
            return self.proc.returncode
        return self.forked.code if self.forked is not None else None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"worker_id": self.worker_id, "pid": self.pid, "log": str(self.log_path)}
        if self.forked is not None and self.forked.lost:
            d["exit"] = self.forked.lost
        return d


class LocalEngine(Engine):
    """Worker processes on this machine, one log file each. They are forked by a pre-started
    interpreter that has imported what a worker needs (``zygote.py``), so a worker starts in tens
    of milliseconds plus its model's loading. The engine watches that interpreter: when it dies, a
    launch waiting for its answer fails over at once, each worker is started as a fresh
    ``python -m shoal worker`` process until a new one has been started (at once, then with
    back-off if it keeps dying), and its workers' ends are still seen at once (pidfds)."""

    name = "local"

    def __init__(self, cfg: AutoscaleConfig) -> None:
        self.workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="shoal-workers-"))
        self._zygote: _Zygote | None = None
        self._forked: dict[int, _Forked] = {}  # pid -> a forked worker whose status is not known yet
        self._short_lives = 0
        self._restart: asyncio.Task | None = None
        self._stopping = False
        self.zygote_starts = 0

    async def start(self) -> None:
        await self._start_zygote()

    # ------------------------------------------------------------------------------- the zygote

    async def _start_zygote(self, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._stopping:
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "shoal.worker.zygote",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as e:
            log.warning("no pre-started worker interpreter (%s): each worker starts a fresh process", e)
            return
        self.zygote_starts += 1
        z = _Zygote(proc, time.monotonic())
        self._zygote = z
        z.task = asyncio.create_task(self._supervise(z), name="zygote")

    async def _supervise(self, z: _Zygote) -> None:
        # Its end shows as end-of-file on its reports (nothing else holds that pipe) or on its
        # process handle, whichever comes first; then the other gets a moment.
        reader = asyncio.create_task(self._read(z))
        waiter = asyncio.create_task(z.proc.wait())
        done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 0.5)  # the reports it wrote before dying
        else:
            try:
                await asyncio.wait_for(waiter, 2.0)
            except asyncio.TimeoutError:  # it closed its reports but lives on: of no more use
                z.proc.kill()
                await z.proc.wait()
        self._died(z)

    async def _read(self, z: _Zygote) -> None:
        assert z.proc.stdout is not None
        while line := await z.proc.stdout.readline():
            try:
                msg = json.loads(line)
                if "exited" in msg:
                    self._exited(int(msg["exited"]), int(msg["code"]))
                    continue
                fut = z.pending.popleft()
                answer: Any = (
                    self._watch(int(msg["started"]), z) if "started" in msg else str(msg.get("error"))
                )
            except (ValueError, KeyError, TypeError, IndexError):
                log.warning("the pre-started worker interpreter said %r; ignored", line[:200])
                continue
            if not fut.done():
                fut.set_result(answer)
            elif isinstance(answer, _Forked):  # its launch gave up waiting: nobody would manage it
                self._signal(answer, signal.SIGTERM)

    def _died(self, z: _Zygote) -> None:
        z.alive = False
        if self._zygote is z:
            self._zygote = None
        why = f"the pre-started worker interpreter (pid {z.proc.pid}) ended with status {z.proc.returncode}"
        while z.pending:
            fut = z.pending.popleft()
            if not fut.done():
                fut.set_result(why)
        for rec in list(self._forked.values()):
            if rec.zygote is z and rec.ended:
                self._lost(rec)
        if self._stopping:
            return
        lived = time.monotonic() - z.started_at
        self._short_lives = self._short_lives + 1 if lived < ZYGOTE_STABLE_S else 1
        delay = zygote_restart_delay(self._short_lives)
        log.warning(
            "%s after %.1f s; a new one starts in %.0f s, fresh processes meanwhile", why, lived, delay
        )
        self._restart = asyncio.create_task(self._start_zygote(delay), name="zygote-restart")

    # ------------------------------------------------------------------------ forked workers

    def _watch(self, pid: int, z: _Zygote) -> _Forked:
        rec = _Forked(pid, z)
        try:
            rec.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # already ended and reaped: the zygote's report follows
            rec.ended = True
        except (AttributeError, OSError):  # no pidfds (not Linux 5.3+): the zygote's reports only
            pass
        else:
            asyncio.get_running_loop().add_reader(rec.pidfd, self._ended, rec)
        self._forked[pid] = rec
        return rec

    def _unwatch(self, rec: _Forked) -> None:
        if rec.pidfd is not None:
            asyncio.get_running_loop().remove_reader(rec.pidfd)
            os.close(rec.pidfd)
            rec.pidfd = None

    def _ended(self, rec: _Forked) -> None:
        self._unwatch(rec)
        rec.ended = True
        if rec.code is not None:
            return
        if rec.zygote.alive:
            asyncio.get_running_loop().call_later(EXIT_REPORT_S, self._lost, rec)
        else:
            self._lost(rec)

    def _exited(self, pid: int, code: int) -> None:
        rec = self._forked.pop(pid, None)
        if rec is not None and rec.code is None:
            self._unwatch(rec)
            rec.ended, rec.code = True, code
            rec.done.set()

    def _lost(self, rec: _Forked) -> None:
        if rec.code is not None:
            return
        self._unwatch(rec)
        if self._forked.get(rec.pid) is rec:
            del self._forked[rec.pid]
        rec.code = UNKNOWN_EXIT
        rec.lost = f"exit status unknown ({UNKNOWN_EXIT}): its pre-started interpreter did not report it"
        rec.done.set()
        log.warning("worker process %d ended; %s", rec.pid, rec.lost)

    def _signal(self, rec: _Forked, sig: int) -> None:
        try:
            if rec.pidfd is not None:  # never a process that took a reused pid
                signal.pidfd_send_signal(rec.pidfd, sig)
            elif not rec.ended:
                os.kill(rec.pid, sig)
        except ProcessLookupError:
            pass

    # ---------------------------------------------------------------------------- the engine

    async def launch(self, req: WorkerLaunch) -> EngineWorker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{req.worker_id}.log"
        extra = {"SHOAL_CLUSTER_SECRET": req.secret.decode(), "PYTHONUNBUFFERED": "1"}
        z = self._zygote
        if z is not None and z.alive and z.proc.stdin is not None:
            cmd = {"argv": worker_argv(req), "env": extra, "log": str(log_path)}
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            z.pending.append(fut)
            try:
                z.proc.stdin.write((json.dumps(cmd) + "\n").encode())
                await z.proc.stdin.drain()
                answer = await asyncio.wait_for(fut, ZYGOTE_ANSWER_S)
            except (OSError, ConnectionError) as e:  # it is dying; its end is being noticed
                answer = f"the pre-started worker interpreter cannot be reached: {e}"
            except asyncio.TimeoutError:
                answer = f"the pre-started worker interpreter did not answer within {ZYGOTE_ANSWER_S:g} s"
                with contextlib.suppress(ProcessLookupError):
                    z.proc.kill()  # stuck: replaced like a dead one
            finally:
                fut.cancel()  # an answer that comes after all is not left running unmanaged
            if isinstance(answer, _Forked):
                return LocalWorker(req.worker_id, answer.pid, log_path, forked=answer)
            log.warning("%s; starting a fresh process instead", answer)
        try:
            with open(log_path, "ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "shoal",
                    *worker_argv(req),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, **extra},
                )
        except OSError as e:
            raise EngineError(f"cannot start a worker process: {e}") from None
        return LocalWorker(req.worker_id, proc.pid, log_path, proc=proc)

    async def _until_ended(self, w: LocalWorker, timeout: float) -> bool:
        try:
            if w.proc is not None:
                await asyncio.wait_for(w.proc.wait(), timeout)
            elif w.forked is not None:
                await asyncio.wait_for(w.forked.done.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _kill(self, w: LocalWorker, sig: int) -> None:
        if w.forked is not None:
            self._signal(w.forked, sig)
        elif w.proc is not None and w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(sig)

    async def terminate(self, w: EngineWorker) -> None:
        assert isinstance(w, LocalWorker)
        if w.exit_code() is not None:
            return
        self._kill(w, signal.SIGTERM)  # it drains what it still holds (nothing, normally)
        if not await self._until_ended(w, 10.0):
            self._kill(w, signal.SIGKILL)

    async def stop(self, workers: list[EngineWorker]) -> None:
        self._stopping = True
        if self._restart is not None:
            await cancel_and_wait([self._restart])
        await asyncio.gather(*(self.terminate(w) for w in workers))
        z = self._zygote
        if z is not None and z.alive and z.proc.stdin is not None:
            z.proc.stdin.close()  # it asks the children it still has to drain, then exits
            try:
                await asyncio.wait_for(z.proc.wait(), 10.0)
            except asyncio.TimeoutError:
                z.proc.kill()
        if z is not None and z.task is not None:
            await asyncio.wait({z.task}, timeout=3.0)  # its last reports read
            await cancel_and_wait([z.task])
        for rec in list(self._forked.values()):
            self._unwatch(rec)

    def describe(self) -> dict[str, Any]:
        z = self._zygote
        return {
            "engine": self.name,
            "workdir": str(self.workdir),
            "zygote_pid": z.proc.pid if z is not None and z.alive else None,
            "zygote_starts": self.zygote_starts,
        }


# ------------------------------------------------------------------------------------- kubernetes


class ExternalEngine(Engine):
    """Kubernetes (or any orchestrator that reads the desired count from the gateway's metrics)."""

    name = "kubernetes"
    external = True

    async def launch(self, req: WorkerLaunch) -> EngineWorker:
        raise EngineError("workers are started by the cluster's autoscaler, not by the gateway")

    async def terminate(self, w: EngineWorker) -> None:
        return None


def make_engine(cfg: AutoscaleConfig) -> Engine:
    if cfg.engine == "local":
        return LocalEngine(cfg)
    if cfg.engine == "kubernetes":
        return ExternalEngine()
    from shoal.autoscale.ray_engine import RayEngine  # imports ray: only when configured

    return RayEngine(cfg)
