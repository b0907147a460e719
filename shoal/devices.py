"""``shoal devices``: what this machine can compute on, and how a ``--device`` choice is checked.

- CPUs: how many the OS has and how many this process may use, and their model.
- CUDA GPUs, through torch when it is installed: name, memory, compute capability.
- ONNX Runtime's execution providers (what a worker serving an ONNX model can run on).

The choice functions are pure (they take what is installed as arguments) so the rules are tested
without a GPU: ``cpu``, ``cuda`` (the first GPU), ``cuda:N`` and ``auto`` (CUDA when there is one,
else CPU). A device that is not there is refused with the reason and what to install, never
silently replaced by the CPU. Importing this module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = "list what this machine can compute on: CPUs, CUDA GPUs (through torch), ONNX Runtime providers"
EXAMPLE = """\
shoal devices                 # a table
shoal devices --json          # one JSON object (cpus, cuda, onnxruntime)
shoal train mnist --device auto          # then train on the first GPU when there is one"""

_SPEC = re.compile(r"^(cpu|auto|cuda)(?::(\d+))?$")
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


class DeviceError(ValueError):
    """A device that cannot be used here; the message says why and what to do."""


@dataclass(frozen=True)
class Choice:
    kind: str  # "cpu" or "cuda"
    index: int | None = None  # the CUDA device index

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``cpu`` / ``auto`` / ``cuda`` / ``cuda:N`` -> (kind, index); anything else is refused."""
    m = _SPEC.match(spec.strip().lower())
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"unknown device '{spec}': use cpu, cuda, cuda:N or auto")
    return m.group(1), (int(m.group(2)) if m.group(2) is not None else None)


def choose_torch(spec: str, cuda_count: int, cuda_built: bool, torch_version: str = "") -> Choice:
    """The torch device for ``spec`` given what torch reports (``torch.cuda.device_count()`` and
    whether the build has CUDA at all)."""
    kind, index = parse_spec(spec)
    if kind == "cpu":
        return Choice("cpu")
    if kind == "auto":
        return Choice("cuda", 0) if cuda_count > 0 else Choice("cpu")
    if not cuda_built:
        raise DeviceError(
            f"device {spec}: this torch ({torch_version or 'installed'}) is a CPU-only build; "
            "install a CUDA build of torch on a machine with an NVIDIA GPU, or use --device cpu"
        )
    if cuda_count == 0:
        raise DeviceError(
            f"device {spec}: torch has CUDA but sees no GPU (no NVIDIA driver, or CUDA_VISIBLE_DEVICES "
            "hides them); 'shoal devices' lists what is here"
        )
    index = 0 if index is None else index
    if index >= cuda_count:
        raise DeviceError(
            f"device {spec}: this machine has {cuda_count} CUDA device(s), cuda:0 to cuda:{cuda_count - 1}"
        )
    return Choice("cuda", index)


def choose_onnx(spec: str, providers: list[str]) -> tuple[Choice, list[Any]]:
    """The ONNX Runtime providers for ``spec`` given ``onnxruntime.get_available_providers()``."""
    kind, index = parse_spec(spec)
    has_cuda = CUDA_EP in providers
    if kind == "cpu" or (kind == "auto" and not has_cuda):
        return Choice("cpu"), [CPU_EP]
    if not has_cuda:
        raise DeviceError(
            f"device {spec}: this onnxruntime has no CUDA execution provider (it has "
            f"{', '.join(providers) or 'none'}); install onnxruntime-gpu (pip install 'shoal[onnx-gpu]') "
            "on a machine with an NVIDIA GPU, or use --device cpu"
        )
    index = index or 0
    return Choice("cuda", index), [(CUDA_EP, {"device_id": index}), CPU_EP]


def torch_device(spec: str):  # noqa: ANN201 (torch is imported here, not at module level)
    """A ``torch.device`` for ``spec``, refused with the reason when it is not there."""
    import torch

    built = bool(torch.backends.cuda.is_built())
    count = torch.cuda.device_count() if built else 0
    choice = choose_torch(spec, count, built, torch.__version__)
    return torch.device(str(choice))


# ------------------------------------------------------------------------------------------- listing


def cpu_info() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"count": os.cpu_count(), "usable": usable, "model": model, "machine": platform.machine()}


def cuda_info() -> dict[str, Any]:
    """CUDA GPUs as torch sees them; says why there are none."""
    try:
        import torch
    except ImportError:
        return {"available": False, "devices": [], "note": "torch is not installed (pip install 'shoal[torch]')"}
    out: dict[str, Any] = {"torch": torch.__version__, "built_with_cuda": bool(torch.backends.cuda.is_built())}
    if not out["built_with_cuda"]:
        return {**out, "available": False, "devices": [], "note": "this torch is a CPU-only build"}
    n = torch.cuda.device_count()
    devices = []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "device": f"cuda:{i}",
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 2),
                "compute_capability": f"{p.major}.{p.minor}",
                "multiprocessors": p.multi_processor_count,
            }
        )
    out.update(available=n > 0, devices=devices, cuda=torch.version.cuda)
    if n == 0:
        out["note"] = "torch has CUDA but sees no GPU (driver, or CUDA_VISIBLE_DEVICES)"
    return out


def onnx_info() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"providers": [], "note": "onnxruntime is not installed (pip install 'shoal[onnx]')"}
    return {"version": ort.__version__, "device": ort.get_device(), "providers": ort.get_available_providers()}


def describe() -> dict[str, Any]:
    import shoal  # noqa: F401  (ORT_DISABLE_TELEMETRY before onnxruntime is imported)

    return {"cpus": cpu_info(), "cuda": cuda_info(), "onnxruntime": onnx_info()}


def render(d: dict[str, Any]) -> str:
    c = d["cpus"]
    lines = [f"cpu      {c['usable']} of {c['count']} cores usable, {c['model']} ({c['machine']})"]
    cu = d["cuda"]
    if cu.get("devices"):
        for g in cu["devices"]:
            lines.append(
                f"{g['device']:8} {g['name']}, {g['memory_gib']} GiB, compute capability "
                f"{g['compute_capability']} (torch {cu['torch']}, CUDA {cu.get('cuda')})"
            )
    else:
        lines.append(f"cuda     none: {cu.get('note', '')}")
    o = d["onnxruntime"]
    if o.get("providers"):
        lines.append(f"onnx     onnxruntime {o['version']}: {', '.join(o['providers'])}")
    else:
        lines.append(f"onnx     none: {o.get('note', '')}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    d = describe()
    print(json.dumps(d) if args.json else render(d))
    return 0
