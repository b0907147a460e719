"""Many keep-alive clients sending requests to one cluster at once: the helper the cluster tests
share (not a test module)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np


def infer_concurrently(
    lc: Any,
    n: int,
    model: str,
    inputs_of: Callable[[int], dict[str, np.ndarray]],
    threads: int = 8,
    on_answer: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> tuple[dict[int, dict[str, np.ndarray]], list[str]]:
    """Send requests 0..n-1 (request i's inputs: ``inputs_of(i)``) from ``threads`` clients at once.
    ``on_answer(i, outputs)`` runs in the client's thread; what it raises counts as a failure.
    Returns the answers by request and the failures."""
    answers: dict[int, dict[str, np.ndarray]] = {}
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def run() -> None:
        with lc.client() as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    out = c.infer(model, inputs_of(i))
                    if on_answer is not None:
                        on_answer(i, out)
                    with lock:
                        answers[i] = out
                except Exception as e:  # collected for the test to assert on
                    with lock:
                        failures.append(repr(e))

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return answers, failures
