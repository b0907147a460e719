"""A worker started before its gateway says so once, at INFO: an expected wait is not a warning."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

from waiting import wait_for


def test_a_worker_before_its_gateway_logs_its_retry_once_at_info(model_repo, tmp_path):
    # Where the gateway will be: a socket that takes each dial and hangs up, counting the attempts.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    attempts = 0

    def take() -> None:
        nonlocal attempts
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            attempts += 1
            conn.close()

    threading.Thread(target=take, daemon=True).start()
    err = tmp_path / "worker.err"
    with err.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shoal", "worker", "--gateway", f"127.0.0.1:{srv.getsockname()[1]}",
             "--repo", str(model_repo), "--model", "echo", "--secret", "s3cret"],
            stdout=subprocess.DEVNULL, stderr=f, env={**os.environ, "SHOAL_TRACEBACK": ""},
        )
    try:
        wait_for(lambda: attempts >= 4, "four dials of the absent gateway", 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        srv.close()
    lines = err.read_text().splitlines()
    retry = [line for line in lines if "not reachable yet" in line]
    assert len(retry) == 1 and " INFO " in retry[0], lines
    assert not [line for line in lines if " WARNING " in line or " ERROR " in line], lines
