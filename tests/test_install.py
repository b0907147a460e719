"""``pip install shoal`` with no extras is the device side: a fresh virtual environment gets the
client and ``shoal infer`` with their small dependencies only, infers through a real cluster (started
from the test's own environment), and a server command says which extra it needs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shoal.local import LocalCentral

ROOT = Path(__file__).resolve().parent.parent
# What the base install may bring: shoal, its five dependencies and theirs (httpx's are pure Python).
BASE = {"shoal", "numpy", "msgspec", "orjson", "httpx", "zstandard", "httpcore", "h11", "anyio", "idna",
        "certifi", "sniffio", "typing_extensions", "exceptiongroup"}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def device_env(tmp_path_factory) -> Path:
    """A virtual environment with ``pip install <wheel of this tree>`` and nothing else."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "shoal", src / "shoal", ignore=shutil.ignore_patterns("__pycache__"))
    # The wheel is built with this environment's setuptools (no network for build tools), installed
    # with this environment's pip into a venv that has none: dependencies come from the registry.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    r = _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work / "wheel"), str(src)])
    assert r.returncode == 0, r.stderr[-3000:]
    venv = work / "venv"
    r = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert r.returncode == 0, r.stderr
    wheel = next((work / "wheel").glob("shoal-*.whl"))
    r = _run([*pip, "--python", str(venv / "bin" / "python"), "install", "-q", str(wheel)])
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def test_the_base_install_holds_the_device_side_only(device_env):
    code = "import importlib.metadata as m; print(sorted({d.metadata['Name'].lower().replace('-', '_') for d in m.distributions()}))"
    r = _run([str(device_env / "bin" / "python"), "-c", code])
    installed = set(json.loads(r.stdout.replace("'", '"')))
    assert installed <= BASE and {"shoal", "numpy", "httpx", "msgspec", "zstandard"} <= installed, installed
    r = _run([str(device_env / "bin" / "shoal"), "infer", "--help"])
    assert r.returncode == 0 and "example:" in r.stdout and "shoal infer" in r.stdout, r.stderr
    # Commands name the extra to install instead of failing with a traceback, whatever their arguments
    # (an option the base install's parser does not know included), and print nothing before it.
    for argv, extra in (
        (["central"], "central"),
        (["central", "--http", "127.0.0.1:7000", "--bootstrap-operator", "admin"], "central"),
        (["cluster", "--name", "site-a", "--http", "127.0.0.1:8000"], "gateway"),
        (["worker", "--gateway", "127.0.0.1:8003", "--model", "mnist-cnn"], "worker"),
        (["bench", "latency"], "demo"),
        (["predict", "--count", "2"], "predict"),
        (["certs", "--out", "pki"], "tls"),
    ):
        r = _run([str(device_env / "bin" / "shoal"), *argv])
        assert r.returncode == 2 and f"pip install 'shoal[{extra}]'" in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr and r.stdout == "", (argv, r.stdout, r.stderr)
    r = _run([str(device_env / "bin" / "shoal"), "--help"])
    assert r.returncode == 0 and "needs 'shoal[gateway]'" in r.stdout
    # Every command's line in the overview says what it needs.
    from shoal.cli import COMMANDS, EXTRAS

    overview = " ".join(r.stdout.split())  # as wrapped to any width
    for name in COMMANDS:
        assert (f"shoal[{EXTRAS[name]}]" if name in EXTRAS else "[base install]") in overview, name


def test_the_base_install_infers_through_a_running_cluster(device_env, tmp_path, model_repo):
    central = LocalCentral(tmp_path / "central").start()
    lc = central.start_cluster(tmp_path / "site", "site-a")
    try:
        lc.add_worker("echo", repo=model_repo)
        central.add_account("device", "pi-cam", "pi-password")
        lc.wait_workers("echo", 1)
        central.wait_routable({"site-a"}, "echo")
        x = tmp_path / "x.npy"
        np.save(x, np.arange(4, dtype=np.float32).reshape(1, 4))
        env = {**os.environ, "SHOAL_DEVICE_PASSWORD": "pi-password"}
        cmd = [str(device_env / "bin" / "shoal"), "infer", "--central", central.url, "--device", "pi-cam"]
        r = _run([*cmd, "--model", "echo", "--input", "x", "--full", str(x)], env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        answer = json.loads(r.stdout.strip().splitlines()[-1])
        assert answer["cluster"] == "site-a" and answer["outputs"]["y"] == [[0, 1, 2, 3]]
        # The asyncio client of the same install: many requests in flight over one pool.
        code = (
            "import asyncio, numpy as np; from shoal.client import AsyncClient\n"
            "async def main():\n"
            f"    async with AsyncClient({central.url!r}, 'pi-cam', 'pi-password') as c:\n"
            "        rs = await asyncio.gather(*(c.infer('echo', {'x': np.full((1, 4), i, np.float32)}) for i in range(20)))\n"
            "        print([float(r.outputs['y'][0, 0]) for r in rs])\n"
            "asyncio.run(main())\n"
        )
        r = _run([str(device_env / "bin" / "python"), "-c", code], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout) == [float(i) for i in range(20)]
    finally:
        lc.stop()
        central.stop()
