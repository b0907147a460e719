"""A worker as a Ray actor: ``shoal worker`` in a thread of the actor's process, with the last lines
it wrote kept for the engine (``autoscale/ray_engine.py``), which creates these actors by this
module's name and never runs them in the gateway's process."""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
import threading
from collections import deque
from typing import Any


class _Tail(io.TextIOBase):
    """Writes through to ``stream`` and keeps the last lines written: why a worker ended, for the
    status, as the local engine points at its log file."""

    def __init__(self, stream: Any, lines: deque[str], lock: threading.Lock) -> None:
        self.stream = stream
        self.lines = lines
        self.lock = lock

    def write(self, text: str) -> int:
        self.stream.write(text)
        with self.lock:
            self.lines.extend(line.strip() for line in text.splitlines() if line.strip())
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class WorkerActor:
    """The body of each worker's Ray actor: ``shoal worker`` in a thread of the actor's process.

    Threaded (the actor is created with ``max_concurrency`` above 1) so that ``ping``, which waits for
    the worker to end, does not keep ``where`` from answering."""

    def __init__(self, argv: list[str], secret: str) -> None:
        os.environ["SHOAL_CLUSTER_SECRET"] = secret  # this process runs this one worker only
        self.code: int | None = None
        self.done = threading.Event()
        self.lines: deque[str] = deque(maxlen=4)
        self.lock = threading.Lock()
        # The worker's log handler is made after this, on sys.stderr: it writes through the tail too.
        sys.stdout = _Tail(sys.stdout, self.lines, self.lock)
        sys.stderr = _Tail(sys.stderr, self.lines, self.lock)
        threading.Thread(target=self._run, args=(argv,), name="shoal-worker", daemon=True).start()

    def _run(self, argv: list[str]) -> None:
        import shoal.worker.cli
        from shoal.command import run_command

        try:
            code = run_command("worker", shoal.worker.cli, argv[1:]) if argv[:1] == ["worker"] else 2
        except SystemExit as e:  # argparse refusing an option
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:  # reported through ping, never a silent actor
            logging.getLogger("shoal.worker").exception("worker ended with an error")
            code = 1
        self.code = int(code or 0)
        self.done.set()

    def ping(self) -> tuple[int, str]:
        """Answers once the worker has ended: its exit status and its last lines of output."""
        self.done.wait()
        with self.lock:
            output = " | ".join(self.lines)[-600:]
        return (self.code if self.code is not None else 1), output

    def where(self) -> dict[str, Any]:
        import ray

        return {"node": ray.get_runtime_context().get_node_id()[:12], "pid": os.getpid(), "host": socket.gethostname()}
