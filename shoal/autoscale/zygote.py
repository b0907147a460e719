"""A pre-started interpreter that forks workers: the local engine's way to start a worker in tens of
milliseconds instead of the second or two an interpreter takes to import numpy, ONNX Runtime and
shoal before it can load its model (most of a new worker's start-up, and so of the time a scale-up
or a wake from zero takes).

Run as ``python -m shoal.autoscale.zygote`` by the engine, which speaks to it in JSON lines:

* in, on stdin: ``{"argv": [...], "env": {...}, "log": "path"}``: start ``shoal`` with these
  arguments (``worker ...``), these environment variables added, its output in that file;
* out, on stdout: ``{"started": pid}`` or ``{"error": "why"}`` for each command, in order, and
  ``{"exited": pid, "code": n}`` when a child ends.

It imports, then forks for each command; it starts no thread and no event loop itself, so a child
starts from a clean state and creates its own. When its stdin closes (the gateway has gone), it
asks its children to drain (SIGTERM) and exits.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
from typing import Any


def _preload() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy  # noqa: F401

    import shoal.cli  # noqa: F401
    import shoal.worker.batching  # noqa: F401
    import shoal.worker.cli  # noqa: F401
    import shoal.worker.link  # noqa: F401
    import shoal.worker.runtimes  # noqa: F401

    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # workers of other runtimes import theirs themselves
        pass


def _child(cmd: dict[str, Any]) -> None:
    """In the forked process: become the worker. Never returns."""
    code = 1
    try:
        fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.update(cmd.get("env") or {})
        from shoal.cli import main

        code = int(main(list(cmd["argv"])) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _say(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def main() -> int:
    _preload()
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    buf = b""
    stdin = sys.stdin.buffer
    open_ = True
    while open_ or children:
        for _key, _ in sel.select(timeout=0.05 if children else 1.0):
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                open_ = False
                sel.unregister(sys.stdin)
                for pid in children:  # the gateway has gone: its workers drain and leave
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    cmd = json.loads(line)
                    pid = os.fork()
                except (ValueError, OSError) as e:
                    _say({"error": f"{type(e).__name__}: {e}"})
                    continue
                if pid == 0:
                    sel.close()
                    _child(cmd)
                children.add(pid)
                _say({"started": pid})
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            _say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
