"""The lab's device load driver, a program run on a device machine:

    python -m shoal.lab.device --central URL --device cam-0,cam-1 --in-flight 4 --log dev.jsonl --seed 1 \
        [--model echo]

Each device account gets one ``shoal.client.AsyncClient`` (routes through central, fail-over as the
client does it) and ``--in-flight`` requests at once, each sent as soon as the one before it in its
slot ends. Every request is the echo model (``--model``: another identity model) with an input of its own (seeded random numbers), so its
answer can be checked against it. Two JSON lines a request go to ``--log``:

    {"e": "send", "id": "cam-0/2/17", "t": 1712.3, "in": "9f...", "model": "echo"}
    {"e": "done", "id": "cam-0/2/17", "t": 1712.4, "ok": true, "gateway": "http://10.77.1.2:8000",
     "out": "9f...", "correct": true}                       (or "ok": false, "error": "InferError: ...")

and a ``step`` line for each step of the client worth seeing (``TracingClient``): a call to central,
a call that did not end in a 200 or was slow, a back-off sleep; each call of a race of central's
replicas (``race POST``: its outcome, "abandoned" when another answered first), and the liveness probes
of silent gateways (``GET .../v2/health/live``, when not answered 200 or slow).

``in`` and ``out`` are digests of the input and the output (a wrong answer is traced to the request it
belonged to), times are the wall clock (the lab's fault records use it too). SIGTERM: no new
requests; those in flight finish; the log is flushed; exit 0. The password is ``$SHOAL_DEVICE_PASSWORD``
(one for all the accounts named).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from shoal.client import AsyncClient
from shoal.client.core import SHARED_POLL_S, Call, Compute, Finished, Race, Reply, resume
from shoal.client.http import arace

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("lab_request", default="")
STEP_SLOW_S = 0.5  # a step of the client this slow (or not a 200, or a route asked for) is logged


class TracingClient(AsyncClient):
    """``AsyncClient`` whose steps worth seeing are logged as ``step`` lines under the request they
    served (a context variable each slot sets): the calls to central, every call that did not end in
    a 200 or took ``STEP_SLOW_S``, every back-off sleep; each with when it began, how long it took,
    the wait it was given and its outcome. (The same driver loop as ``AsyncClient._run``.)"""

    log: Log | None = None

    async def _run(self, flow: Any) -> Any:
        outcome: Any = None
        while not isinstance(step := resume(flow, outcome), Finished):
            if self.core.to_probe:  # a probe starts as soon as its gateway fell silent
                self._background()
            t = time.time()
            if isinstance(step, Call):
                outcome = await self._send(step)
                what: Any = outcome.status if isinstance(outcome, Reply) else f"{type(outcome).__name__}: {outcome}"
                took = time.time() - t
                if "/v1/" in step.url or what != 200 or took > STEP_SLOW_S:
                    self._step(t, took, step.method, step.url, step.timeout, what)
            elif isinstance(step, Race):  # central's replicas at once: one line each, as it ended
                outcome = await arace(self._http, step.calls)
                took = time.time() - t
                for c, o in zip(step.calls, outcome, strict=True):
                    what = "abandoned" if o is None else o.status if isinstance(o, Reply) else f"{type(o).__name__}: {o}"
                    self._step(t, took, f"race {c.method}", c.url, c.timeout, what)
            elif isinstance(step, Compute):
                outcome = await asyncio.to_thread(step.fn)
            else:
                await asyncio.sleep(step.seconds)
                outcome = None
                if step.seconds > SHARED_POLL_S:  # not each look for a route another request asks for
                    self._step(t, time.time() - t, "sleep", "", step.seconds, None)
        self._background()  # routes due again, probes: beside the requests, none waits for them
        return step.value

    def _step(self, t: float, took: float, method: str, url: str, wait: float | None, what: Any) -> None:
        if self.log is not None:
            self.log.emit(e="step", id=REQUEST.get(), t=t, took=round(took, 4), call=f"{method} {url}",
                          wait=wait, outcome=what)  # fmt: skip

MODEL = "echo"


def digest(a: np.ndarray | None) -> str:
    return "" if a is None else hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=8).hexdigest()


class LogTail:
    """The lab's live view of device logs (one per driver) while the run goes on: the requests still
    outstanding (id -> time sent), when the last answer came, and the answers so far per device."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self.pos = dict.fromkeys(paths, 0)
        self.outstanding: dict[str, float] = {}
        self.last_answer = 0.0
        self.answered: dict[str, int] = {}

    def read(self) -> LogTail:
        for path in self.paths:
            if path.exists():
                self._read(path)
        return self

    def _read(self, path: Path) -> None:
        with open(path, "rb") as f:
            f.seek(self.pos[path])
            chunk = f.read()
        whole = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self.pos[path] += len(whole)
        for line in whole.splitlines():
            r = json.loads(line)
            if r["e"] == "send":
                self.outstanding[r["id"]] = r["t"]
            elif r["e"] == "done":
                self.outstanding.pop(r["id"], None)
                if r["ok"]:
                    self.last_answer = max(self.last_answer, r["t"])
                    device = r["id"].split("/")[0]
                    self.answered[device] = self.answered.get(device, 0) + 1

    def oldest(self) -> float | None:
        """When the oldest request still outstanding was sent."""
        return min(self.outstanding.values(), default=None)


class Log:
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1 << 20)  # noqa: SIM115 (closed in close)

    def emit(self, **rec: Any) -> None:
        self.f.write(json.dumps(rec, separators=(",", ":")) + "\n")

    async def flush_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.f.flush()

    def close(self) -> None:
        self.f.close()


async def slot(
    c: AsyncClient,
    device: str,
    k: int,
    rng: np.random.Generator,
    log: Log,
    stop: asyncio.Event,
    first: asyncio.Event | None = None,
    model: str = MODEL,
) -> None:
    """Requests one after the other until ``stop``; ``first`` is set when the first one ended."""
    n = 0
    while not stop.is_set():
        if n == 1 and first is not None:
            first.set()
        x = rng.standard_normal((1, 16)).astype(np.float32)
        rid = f"{device}/{k}/{n}"
        REQUEST.set(rid)
        n += 1
        log.emit(e="send", id=rid, t=time.time(), model=model, **{"in": digest(x)})
        try:
            r = await c.infer(model, {"x": x})
        except Exception as e:  # every failure the device sees is recorded
            log.emit(e="done", id=rid, t=time.time(), ok=False, error=f"{type(e).__name__}: {e}"[:300])
            continue
        y = r.outputs.get("y")
        log.emit(
            e="done",
            id=rid,
            t=time.time(),
            ok=True,
            gateway=r.gateway,
            out=digest(y),
            correct=bool(y is not None and y.shape == x.shape and np.array_equal(y, x)),
        )


async def drive(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    password = os.environ.get("SHOAL_DEVICE_PASSWORD", "")
    log = Log(args.log)
    flusher = asyncio.create_task(log.flush_every(0.2))
    centrals = args.central.split(",")  # every replica: the client asks the next when one fails
    clients = [TracingClient(centrals, d, password, timeout=args.timeout) for d in args.device.split(",")]
    for c in clients:
        c.log = log
    tasks = []
    try:
        # The devices come up one after another: each sends one request alone (it gets its route from
        # central, so a device's concurrent first requests do not each ask central, the last answer
        # winning) and then keeps its requests in flight; central spreads them over the gateways.
        for i, c in enumerate(clients):
            first = asyncio.Event()
            rngs = [np.random.default_rng([args.seed, i, k]) for k in range(args.in_flight)]
            tasks.append(asyncio.create_task(slot(c, c.core.device, 0, rngs[0], log, stop, first, args.model)))
            waiter = asyncio.create_task(first.wait())
            await asyncio.wait([waiter, tasks[-1]], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            tasks += [
                asyncio.create_task(slot(c, c.core.device, k, rngs[k], log, stop, None, args.model))
                for k in range(1, args.in_flight)
            ]
        await asyncio.gather(*tasks)
    finally:
        flusher.cancel()
        for c in clients:
            await c.close()
        log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shoal.lab.device", description=__doc__.split("\n\n")[0])
    p.add_argument("--central", required=True, help="central's URLs, comma separated (one a replica)")
    p.add_argument("--device", required=True, help="device accounts, comma separated")
    p.add_argument("--in-flight", type=int, default=4, help="requests at once per device")
    p.add_argument("--timeout", type=float, default=10.0, help="the client's timeout (default 10 s, its own)")
    p.add_argument("--model", default=MODEL, help=f"an identity model (default {MODEL})")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log", required=True)
    return asyncio.run(drive(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
