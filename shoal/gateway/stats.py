"""Per-model statistics as Triton keeps them (``GET /v2/models/{m}[/versions/{v}]/stats``, gRPC
ModelStatistics): counters added to on the request path, read only when asked.

What each counts, per model version (a pipeline counts under its own name too):

* ``success`` / ``fail``: requests answered at the front (HTTP or gRPC) with outputs, or with an
  error once they reached the model's queue (timed out, refused for a full queue, a worker's or the
  model's error); ``ns`` sums their time from arrival to answer. A request refused for its own
  content before that (400, 413) is counted by ``shoal_http_errors`` instead.
* ``queue``: time waiting for a worker with room at the gateway, plus, when the worker reports it,
  time in the worker's queue until its batch started (the dynamic batcher's wait).
* ``compute_input`` / ``compute_infer`` / ``compute_output``: the worker's decoding of the request's
  inputs (images) and joining of its batch, the model's run on the batch, and cutting the batch's
  outputs; each request counts its whole batch's model time, as Triton does.
* ``inference_count``: rows inferred; ``execution_count``: model runs, each request counting its
  share of its batch (its rows over the batch's), so a batch whose requests all came through this
  gateway counts once; ``batch_stats`` likewise per batch size.

Each request adds to a few floats and integers of one object (found with the metrics' per-model
lookup it shares): no lock, no allocation but a batch size's first row.
"""

from __future__ import annotations

import time
from typing import Any

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
MAX_BATCH_SIZES = 1024  # distinct batch sizes kept per model version (a batch is at most a worker's)


class ModelStats:
    __slots__ = (
        "success_count",
        "success_s",
        "fail_count",
        "fail_s",
        "queue_count",
        "queue_ms",
        "input_count",
        "input_ms",
        "infer_count",
        "infer_ms",
        "output_count",
        "output_ms",
        "rows",
        "last_inference",
        "batches",
    )

    def __init__(self) -> None:
        self.success_count = self.fail_count = 0
        self.success_s = self.fail_s = 0.0
        self.queue_count = self.input_count = self.infer_count = self.output_count = 0
        self.queue_ms = self.input_ms = self.infer_ms = self.output_ms = 0.0
        self.rows = 0
        self.last_inference = 0.0  # wall clock, seconds
        # batch size -> [rows, input ms, model ms, output ms], the times weighted by rows
        self.batches: dict[int, list[Any]] = {}

    def response(self, ok: bool, seconds: float) -> None:
        """A request answered at the front: with outputs (``ok``) or an error."""
        if ok:
            self.success_count += 1
            self.success_s += seconds
            self.last_inference = time.time()
        else:
            self.fail_count += 1
            self.fail_s += seconds

    def result(
        self,
        rows: int,
        gateway_queue_s: float,
        batch: int,
        compute_ms: float | None,
        queue_ms: float | None,
        input_ms: float | None,
        output_ms: float | None,
    ) -> None:
        """A worker's result for a request of ``rows`` rows that ran in a batch of ``batch`` rows."""
        self.rows += rows
        self.queue_count += 1
        self.queue_ms += gateway_queue_s * 1000.0 + (queue_ms or 0.0)
        if compute_ms is not None:
            self.infer_count += 1
            self.infer_ms += compute_ms
        else:
            compute_ms = 0.0
        if input_ms is not None:  # a worker that reports its timings (RESULT's optional fields)
            self.input_count += 1
            self.input_ms += input_ms
        else:
            input_ms = 0.0
        if output_ms is not None:
            self.output_count += 1
            self.output_ms += output_ms
        else:
            output_ms = 0.0
        # Per batch size: rows, and times weighted by rows; divided by the size when read (so a
        # request's share of its batch is its rows over the batch's, with no division here).
        b = self.batches.get(batch)
        if b is None:
            if len(self.batches) >= MAX_BATCH_SIZES:
                return
            b = self.batches[batch] = [0, 0.0, 0.0, 0.0]
        b[0] += rows
        if rows == 1:
            b[1] += input_ms
            b[2] += compute_ms
            b[3] += output_ms
        else:
            b[1] += input_ms * rows
            b[2] += compute_ms * rows
            b[3] += output_ms * rows

    def _per_batch(self) -> dict[int, tuple[float, float, float, float]]:
        """Each batch size's runs and their input, model and output ms (this gateway's shares). A
        worker that does not say its batch (0) counts each request as a run of its own size."""
        out: dict[int, tuple[float, float, float, float]] = {}
        for size, (rows, i, c, o) in self.batches.items():
            if size > 0:
                out[size] = (rows / size, i / size, c / size, o / size)
        return out

    def triton(self, name: str, version: str) -> dict[str, Any]:
        """This model version's entry of Triton's ``model_stats`` list."""

        def d(count: float, ns: float) -> dict[str, int]:
            return {"count": int(round(count)), "ns": int(round(ns))}

        ms = NS_PER_MS
        per_batch = self._per_batch()
        unsized = self.batches.get(0)
        executions = sum(b[0] for b in per_batch.values()) + (unsized[0] if unsized else 0)
        return {
            "name": name,
            "version": version,
            "last_inference": int(self.last_inference * 1000),  # ms since the epoch, 0: never
            "inference_count": self.rows,
            "execution_count": int(round(executions)),
            "inference_stats": {
                "success": d(self.success_count, self.success_s * NS_PER_S),
                "fail": d(self.fail_count, self.fail_s * NS_PER_S),
                "queue": d(self.queue_count, self.queue_ms * ms),
                "compute_input": d(self.input_count, self.input_ms * ms),
                "compute_infer": d(self.infer_count, self.infer_ms * ms),
                "compute_output": d(self.output_count, self.output_ms * ms),
                "cache_hit": d(0, 0),  # shoal has no response cache
                "cache_miss": d(0, 0),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": d(b[0], b[1] * ms),
                    "compute_infer": d(b[0], b[2] * ms),
                    "compute_output": d(b[0], b[3] * ms),
                }
                for size, b in sorted(per_batch.items())
                if round(b[0]) > 0
            ],
            "memory_usage": [],
        }


class StatsTable:
    """Every model version's statistics, made on first use."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, str], ModelStats] = {}

    def of(self, name: str, version: str) -> ModelStats:
        s = self.models.get((name, version))
        if s is None:
            s = self.models[(name, version)] = ModelStats()
        return s

    def document(self, versions: list[tuple[str, str]]) -> dict[str, Any]:
        """Triton's statistics answer for these model versions (zeros for one not used yet)."""
        return {"model_stats": [self.of(n, v).triton(n, v) for n, v in versions]}
