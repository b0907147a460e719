"""Dynamic batching: the prefetch queue (paper 000's data cache queue) and the inference thread.

The event loop puts decoded requests on a queue and goes back to I/O at once; one inference thread
takes what is queued, up to ``max_batch_size`` rows, runs one batch, splits the outputs per request
and hands them back to the loop. So the model never waits for the network, and heartbeats never wait
for the model. Requests that arrive while a batch runs form the next one; the thread waits for more
(at most ``batch_delay``) only when the recent arrival rate says the batch will fill within that time
(``batch_policy.py``): an idle model with one request runs it at once. A lone request that finds
the inference thread holding nothing and the model quick runs on the event loop's thread itself
(``run_now``), sparing the two hand-offs between the threads.

``take_batch``, ``concat_inputs`` and ``split_outputs`` are pure and tested on their own.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.modelrepo.manifest import Manifest, pixel_budget
from shoal.runtime.images import ImageError, decode_images
from shoal.runtime.runtimes import Runtime
from shoal.worker.batch_policy import ArrivalRate, wait_s

# A lone request runs on the event loop's thread (``run_now``) only while the model's batches take
# less than this: heartbeats and reads wait that long at most.
INLINE_MAX_S = 0.002
MAX_CANCELLED = 10_000  # (connection, id) pairs of cancelled requests kept for their batch


@dataclass(slots=True)
class Item:
    """One request inside the worker."""

    id: int
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    conn: Any  # the gateway connection it came on; results for a dead connection are dropped
    rows: int = 1
    t_received: float = 0.0
    signature: tuple = ()
    request_id: str | None = None  # the device's request id, for logs
    # Several requests joined into one item (a REQUESTS frame): their ids and rows, in order.
    joined: tuple[list[int], list[int]] | None = None
    decode_ms: float = 0.0  # decoding its images, when it had any


@dataclass(slots=True)
class Done:
    item: Item
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    status: int = 200
    compute_ms: float = 0.0  # the model's run on the batch
    batch_rows: int = 0
    # For the gateway's statistics: waiting in this worker for its batch; decoding its inputs and
    # joining the batch's; cutting the batch's outputs.
    queue_ms: float = 0.0
    input_ms: float = 0.0
    output_ms: float = 0.0


def signature(inputs: dict[str, np.ndarray]) -> tuple:
    """Requests can share a batch when every input has the same dtype and non-batch dimensions."""
    return tuple((k, a.dtype.str, a.shape[1:]) for k, a in inputs.items())


def take_batch(pending: deque[Item], max_rows: int) -> list[Item]:
    """Take from the head of the queue, in order, while requests fit and are alike.

    With ``max_rows`` 0 (the model does not batch) one request is taken. A request larger than
    ``max_rows`` on its own still runs, alone (the gateway refuses those; this keeps the worker safe).
    """
    first = pending.popleft()
    batch = [first]
    if max_rows <= 0:
        return batch
    rows = first.rows
    sig = first.signature
    while pending:
        nxt = pending[0]
        if nxt.signature != sig or rows + nxt.rows > max_rows:
            break
        batch.append(pending.popleft())
        rows += nxt.rows
    return batch


def concat_inputs(batch: list[Item]) -> dict[str, np.ndarray]:
    if len(batch) == 1:
        return batch[0].inputs
    return {k: np.concatenate([it.inputs[k] for it in batch]) for k in batch[0].inputs}


def split_outputs(outputs: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Cut each output along its first dimension back into pieces of ``rows`` rows each."""
    if len(rows) == 1:
        return [outputs]
    total = sum(rows)
    for k, v in outputs.items():
        if v.ndim == 0 or v.shape[0] != total:
            raise ValueError(f"output '{k}' has shape {list(v.shape)}; expected {total} rows for the batch")
    cuts = np.cumsum(rows)[:-1]
    pieces = {k: np.split(v, cuts) for k, v in outputs.items()}
    return [{k: pieces[k][i] for k in outputs} for i in range(len(rows))]


@dataclass
class EngineStats:
    batches: int = 0
    rows: int = 0
    requests: int = 0
    busy_s: float = 0.0
    errors: int = 0
    last_batch_rows: int = 0
    started: float = field(default_factory=time.monotonic)


class InferenceEngine:
    """The inference thread. ``submit`` is called from the event loop; ``on_done(list[Done])`` is
    called back on the event loop (through ``post``, normally ``loop.call_soon_threadsafe``)."""

    def __init__(
        self,
        runtime: Runtime,
        manifest: Manifest,
        post: Callable[..., Any],
        on_done: Callable[[list[Done]], None],
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.manifest = manifest
        self.max_rows = manifest.max_batch_size
        self.delay_s = manifest.batch_delay_ms / 1000.0
        self.image = manifest.image
        self.pixel_budget = pixel_budget(manifest.image, manifest.max_batch_size) if manifest.image else None
        self.post = post
        self.on_done = on_done
        self.on_fatal = on_fatal or (lambda reason: None)
        self.dead: str | None = None  # why the inference thread stopped, if it failed
        self._running: list[Item] = []  # the batch in the model right now
        self.q: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self.stats = EngineStats()
        self.arrivals = ArrivalRate()
        # Items submitted and not yet done: two counters, each written by one thread only (the
        # event loop's, which submits, and the inference thread's, which finishes; ``run_now`` writes
        # both on the loop's thread, when the inference thread holds nothing), so neither thread
        # ever waits on the other for a lock.
        self._submitted = 0
        self._finished = 0
        # Requests whose clients left, by (connection, id): dropped when their batch is formed.
        self.cancelled: set[tuple[Any, int]] = set()
        self.batch_s: float | None = None  # recent time of one batch in the model (moving average)
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.q.put(None)
        self._thread.join(timeout=5)

    @property
    def queued(self) -> int:
        return self._submitted - self._finished

    def cancel(self, conn: Any, ids: list[int]) -> None:
        """Requests whose clients left (from the event loop's thread): those not yet in a running
        batch are dropped when their batch is formed, answered 499; the others run as usual."""
        c = self.cancelled
        if len(c) + len(ids) > MAX_CANCELLED:  # ids of requests long answered: forget them
            c.clear()
        c.update((conn, i) for i in ids)

    def _drop_cancelled(self, batch: list[Item]) -> list[Item]:
        """The batch without its requests whose clients left (those are answered 499 now)."""
        c = self.cancelled
        keep, gone = [], []
        for it in batch:
            ids = it.joined[0] if it.joined is not None else [it.id]
            if all((it.conn, i) in c for i in ids):
                gone.append(Done(it, error="cancelled: its client left before it ran", status=499))
                c.difference_update((it.conn, i) for i in ids)
            else:
                keep.append(it)
        if gone:
            self._finish(gone)
        return keep

    def submit(self, item: Item) -> None:
        self._submitted += 1
        self.q.put(item)

    def run_now(self, item: Item) -> bool:
        """Run a lone request on the caller's thread (the event loop's) and hand back its answer at
        once, when the inference thread holds nothing and the model's batches are quick: a request
        that finds the model idle then skips two thread hand-offs (to the inference thread and back,
        about 0.1 ms). The caller is the only one who submits, so the inference thread, which holds
        nothing, stays waiting meanwhile and the model is never run by two threads at once. False
        (nothing done): submit it as usual. Models that decode images never run here (a large image
        takes longer than the event loop may be held)."""
        if (
            self._finished != self._submitted
            or self.batch_s is None
            or self.batch_s > INLINE_MAX_S
            or self.image is not None
            or self.dead is not None
        ):
            return False
        self._submitted += 1
        done: list[Done] = []
        try:
            if self._prepare(item, done):  # else ``done`` holds its error
                self.arrivals.observe(item.t_received, item.rows)
                done = self._run_batch([item])
        except Exception as e:  # never lose the request, whatever broke
            done = [Done(item, error=f"cannot run the request: {type(e).__name__}: {e}", status=500)]
        except BaseException as e:  # the model ended its thread (SystemExit): as if the thread died
            if isinstance(e, KeyboardInterrupt):
                raise
            self._running = [item]
            self._fatal(e, deque())  # fails this request, hands the rest back, takes the worker out
            return True
        self._finished += len(done)
        self.on_done(done)
        return True

    # ------------------------------------------------------------------------------ the thread

    def _prepare(self, item: Item, errors: list[Done]) -> bool:
        """Decode images into the input tensor; compute the batch signature. False when it failed:
        whatever goes wrong here is that request's 400, and the thread goes on."""
        img = self.image
        try:
            if img is not None:
                a = item.inputs.get(img.input)
                if a is not None and a.dtype == object:
                    t = time.perf_counter()
                    try:
                        item.inputs[img.input] = decode_images(a, img, self.pixel_budget)
                    except ImageError as e:
                        errors.append(Done(item, error=f"input '{img.input}': {e}", status=e.status))
                        return False
                    item.decode_ms = (time.perf_counter() - t) * 1000.0
            first = next(iter(item.inputs.values()), None)
            item.rows = int(first.shape[0]) if first is not None and first.ndim else 1
            if item.rows == 0:
                errors.append(Done(item, error="the request has no rows (an empty batch)", status=400))
                return False
            item.signature = signature(item.inputs)
        except Exception as e:
            errors.append(Done(item, error=f"cannot prepare the inputs: {type(e).__name__}: {e}", status=400))
            return False
        return True

    def _pull(self, pending: deque[Item], errors: list[Done], block: bool, timeout: float | None) -> bool:
        """Move one item from the queue to ``pending``; False on stop signal or nothing arrived."""
        try:
            it = self.q.get(block, timeout) if block else self.q.get_nowait()
        except queue.Empty:
            return True
        if it is None:
            return False
        if self._prepare(it, errors):
            pending.append(it)
            self.arrivals.observe(it.t_received, it.rows)
        return True

    def _run(self) -> None:
        pending: deque[Item] = deque()
        try:
            self._serve(pending)
        except BaseException as e:  # a bug in this thread: never die silently with requests held
            self._fatal(e, pending)

    def _serve(self, pending: deque[Item]) -> None:
        running = True
        while running or pending:
            errors: list[Done] = []
            if not pending and running:
                running = self._pull(pending, errors, True, None)
            # Everything already waiting joins at once (no cost to latency).
            while running and not self.q.empty():
                running = self._pull(pending, errors, False, None)
            # Not a full batch yet: wait for more only if they are about to come.
            if running and pending:
                now = time.monotonic()
                rows = sum(i.rows for i in pending)
                wait = wait_s(rows, self.max_rows, self.delay_s, self.arrivals.rate(now))
                end = now + wait
                while running and wait > 0 and rows < self.max_rows:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    running = self._pull(pending, errors, True, left)
                    rows = sum(i.rows for i in pending)
            if errors:
                self._finish(errors)
            if not pending:
                continue
            batch = take_batch(pending, self.max_rows)
            if self.cancelled:
                batch = self._drop_cancelled(batch)
                if not batch:
                    continue
            self._running = batch
            done = self._run_batch(batch)
            self._running = []
            if self.cancelled:  # cancelled while running: forget them
                self.cancelled.difference_update((it.conn, it.id) for it in batch)
            self._finish(done)

    def _fatal(self, e: BaseException, pending: deque[Item]) -> None:
        """Last resort: fail the batch that was running (it may be what broke the thread), hand every
        other held request back to be sent elsewhere (503), and tell the worker, which takes itself
        out of service."""
        reason = f"inference thread failed: {type(e).__name__}: {e}"
        running = {id(it) for it in self._running}
        done = [Done(it, error=reason, status=500) for it in self._running]
        held = [it for it in pending if id(it) not in running]
        while True:
            try:
                it = self.q.get_nowait()
            except queue.Empty:
                break
            if it is not None:
                held.append(it)
        done += [Done(it, error="worker out of service", status=503) for it in held]
        self._running = []
        self.dead = reason
        try:
            self._finish(done)
            self.post(self.on_fatal, reason)
        except RuntimeError:  # the event loop is gone too: the process is ending anyway
            pass

    def _run_batch(self, batch: list[Item]) -> list[Done]:
        started = time.monotonic()  # the clock of ``Item.t_received``
        t = time.perf_counter()
        rows = sum(i.rows for i in batch)
        t_in = t_out = t
        try:
            inputs = concat_inputs(batch)
            t_in = time.perf_counter()
            out = self.runtime.infer(inputs)
            t_out = time.perf_counter()
            parts = split_outputs(out, [it.rows for it in batch])
        except Exception as e:  # a model error fails this batch's requests, never the worker
            ms = (time.perf_counter() - t) * 1000.0
            self.stats.errors += len(batch)
            return [
                Done(it, error=f"model failed: {type(e).__name__}: {e}", status=500, compute_ms=ms)
                for it in batch
            ]
        end = time.perf_counter()
        step_s = end - t  # joining, the model, cutting: the batch's time on this thread
        self.batch_s = step_s if self.batch_s is None else 0.8 * self.batch_s + 0.2 * step_s
        s = self.stats
        s.batches += 1
        s.rows += rows
        s.requests += len(batch)
        s.busy_s += step_s
        s.last_batch_rows = rows
        ms = (t_out - t_in) * 1000.0
        join_ms, cut_ms = (t_in - t) * 1000.0, (end - t_out) * 1000.0
        done = []
        for it, o in zip(batch, parts, strict=True):
            if it.outputs is not None:
                o = {k: o[k] for k in it.outputs if k in o}
            queue_ms = max(0.0, (started - it.t_received) * 1000.0)
            done.append(Done(it, o, None, 200, ms, rows, queue_ms, it.decode_ms + join_ms, cut_ms))
        return done

    def _finish(self, done: list[Done]) -> None:
        self._finished += len(done)
        self.post(self.on_done, done)
