"""Devices: what ``shoal devices`` lists, the rules that turn ``--device`` into a torch device or ONNX
Runtime providers, and a device that is not there refused with the reason, by training and by a
worker alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shoal.devices import CPU_EP, CUDA_EP, Choice, DeviceError, choose_onnx, choose_torch, parse_spec


def test_device_specs() -> None:
    assert parse_spec("cpu") == ("cpu", None) and parse_spec("CUDA:1") == ("cuda", 1)
    assert parse_spec("auto") == ("auto", None) and parse_spec("cuda") == ("cuda", None)
    for bad in ("gpu", "cuda:", "cpu:0", "cuda:x", ""):
        with pytest.raises(DeviceError, match="use cpu, cuda, cuda:N or auto"):
            parse_spec(bad)


def test_torch_device_choice() -> None:
    assert choose_torch("auto", 0, False) == Choice("cpu")
    assert choose_torch("auto", 2, True) == Choice("cuda", 0)
    assert choose_torch("cuda", 2, True) == Choice("cuda", 0)
    assert choose_torch("cuda:1", 2, True) == Choice("cuda", 1)
    assert choose_torch("cpu", 2, True) == Choice("cpu")
    with pytest.raises(DeviceError, match="CPU-only build"):
        choose_torch("cuda", 0, False, "2.13.0+cpu")
    with pytest.raises(DeviceError, match="sees no GPU"):
        choose_torch("cuda:0", 0, True)
    with pytest.raises(DeviceError, match="cuda:0 to cuda:1"):
        choose_torch("cuda:2", 2, True)


def test_onnx_provider_choice() -> None:
    assert choose_onnx("cpu", [CUDA_EP, CPU_EP]) == (Choice("cpu"), [CPU_EP])
    assert choose_onnx("auto", [CPU_EP]) == (Choice("cpu"), [CPU_EP])
    choice, providers = choose_onnx("cuda:1", [CUDA_EP, CPU_EP])
    assert choice == Choice("cuda", 1) and providers == [(CUDA_EP, {"device_id": 1}), CPU_EP]
    assert choose_onnx("auto", [CUDA_EP, CPU_EP])[0] == Choice("cuda", 0)
    with pytest.raises(DeviceError, match=r"shoal\[onnx-gpu\]"):
        choose_onnx("cuda", [CPU_EP])


def test_devices_lists_cpus_cuda_and_onnx_providers() -> None:
    r = subprocess.run([sys.executable, "-m", "shoal", "devices", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["cpus"]["count"] == os.cpu_count() and 1 <= d["cpus"]["usable"] <= d["cpus"]["count"]
    assert "available" in d["cuda"] and isinstance(d["cuda"]["devices"], list)
    if not d["cuda"]["devices"]:
        assert d["cuda"]["note"]  # says why there is none
    assert CPU_EP in d["onnxruntime"]["providers"]
    table = subprocess.run([sys.executable, "-m", "shoal", "devices"], capture_output=True, text=True, timeout=120)
    assert table.stdout.startswith("cpu ") and "\nonnx " in table.stdout


def test_training_refuses_a_device_that_is_not_here_and_auto_says_what_it_ran_on(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from shoal.cli import main

    if torch.cuda.device_count() == 0:
        assert main(["train", "linear", "--device", "cuda", "--out", str(tmp_path / "a")]) == 2
        assert not (tmp_path / "a").exists()  # refused before anything was written
    assert main(["train", "linear", "--device", "auto", "--epochs", "2", "--no-plot", "--out", str(tmp_path / "b")]) == 0
    result = json.loads((tmp_path / "b" / "result.json").read_text())
    assert result["device"] == ("cuda:0" if torch.cuda.device_count() else "cpu")


def test_worker_refuses_cuda_without_the_cuda_provider() -> None:
    ort = pytest.importorskip("onnxruntime")
    if CUDA_EP in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "worker", "--model", "mnist-cnn", "--secret", "x", "--device", "cuda:0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "no CUDA execution provider" in r.stderr and "onnx-gpu" in r.stderr
