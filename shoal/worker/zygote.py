"""A pre-started interpreter that forks workers: the local engine's way to start a worker in tens of
milliseconds instead of the second or two an interpreter takes to import numpy, ONNX Runtime and
shoal before it can load its model (most of a new worker's start-up, and so of the time a scale-up
or a wake from zero takes).

Run as ``python -m shoal.worker.zygote`` by the engine, which speaks to it in JSON lines over the
pipes it gave as stdin and stdout:

* in: ``{"argv": [...], "env": {...}, "log": "path"}``: start ``shoal`` with these arguments
  (``worker ...``), these environment variables added, its output in that file;
* out: ``{"started": pid}`` or ``{"error": "why"}`` for each command, in order, and
  ``{"exited": pid, "code": n}`` when a child ends.

At start it moves both pipes off descriptors 0 and 1 and closes every other descriptor it inherited;
each child closes the two pipes first thing after the fork. So a worker holds no copy of them: it can
neither read the commands nor write a report, and when this process dies the engine reads end-of-file
at once. A child becomes a worker only once its start is reported, so none runs unknown to the
engine. It imports, then forks for each command; it starts no thread and no event loop itself, so a
child starts from a clean state and creates its own. It ignores SIGINT (Ctrl+C reaches the whole
process group; the gateway decides when it stops): when its stdin closes, it asks its children to
drain (SIGTERM), waits for them and exits.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
from typing import Any


def _take_channel() -> tuple[int, int]:
    """The command and report pipes, moved off stdin and stdout; nothing else inherited stays open
    (uvloop, for one, leaves a copy of each pipe end in the child it spawns)."""
    try:
        inherited = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: the usual range
        inherited = list(range(3, 1024))
    for fd in inherited:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:  # the listing's own descriptor, already closed
                pass
    cmd, rep = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # a stray print while importing goes to the gateway's log, never into the reports
    return cmd, rep


def _preload() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy  # noqa: F401

    import shoal.command  # noqa: F401
    import shoal.runtime.runtimes  # noqa: F401
    import shoal.worker.batching  # noqa: F401
    import shoal.worker.cli  # noqa: F401
    import shoal.worker.link  # noqa: F401

    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # workers of other runtimes import theirs themselves
        pass


def _child(cmd: dict[str, Any]) -> None:
    """In the forked process, once the zygote's own descriptors are closed: become the worker.
    Never returns."""
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
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):  # SIGINT: ignored by the zygote
            signal.signal(sig, signal.SIG_DFL)
        os.environ.update(cmd.get("env") or {})
        import shoal.worker.cli
        from shoal.command import run_command

        argv = list(cmd["argv"])
        if argv[:1] == ["worker"]:
            code = run_command("worker", shoal.worker.cli, argv[1:])
        else:  # the engine runs workers only
            print(f"the pre-started interpreter runs 'worker ...', not {argv[:1]}", file=sys.stderr)
            code = 2
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


def _say(fd: int, msg: dict[str, Any]) -> bool:
    """Write one report; False once the engine has gone."""
    data = (json.dumps(msg) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:  # EPIPE: the gateway has gone
        return False
    return True


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cmd_fd, rep_fd = _take_channel()
    _preload()
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(cmd_fd, selectors.EVENT_READ)
    buf = b""
    open_ = True

    def close() -> None:  # the gateway has gone, or stops: its workers drain and leave
        nonlocal open_
        if not open_:
            return
        open_ = False
        sel.unregister(cmd_fd)
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    while open_ or children:
        for _key, _ in sel.select(timeout=0.05 if children else 1.0):
            chunk = os.read(cmd_fd, 65536)
            if not chunk:
                close()
                break
            buf += chunk
            while open_ and b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    cmd = json.loads(line)
                    gate, go = os.pipe()
                    try:
                        pid = os.fork()
                    except OSError:
                        os.close(gate)
                        os.close(go)
                        raise
                except (ValueError, OSError) as e:
                    if not _say(rep_fd, {"error": f"{type(e).__name__}: {e}"}):
                        close()
                    continue
                if pid == 0:
                    # Before anything else runs in the child: it must hold neither pipe...
                    os.close(cmd_fd)
                    os.close(rep_fd)
                    os.close(go)
                    sel.close()
                    # ...and it goes on only once its start is reported: if this process died
                    # first, it would run with nobody to manage it.
                    if os.read(gate, 1) != b"1":
                        os._exit(1)
                    os.close(gate)
                    _child(cmd)
                os.close(gate)
                children.add(pid)
                reported = _say(rep_fd, {"started": pid})
                if reported:
                    os.write(go, b"1")
                os.close(go)
                if not reported:
                    close()
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            _say(rep_fd, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
