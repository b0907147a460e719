"""A model's configuration in Triton's shape (``GET /v2/models/{m}/config``, gRPC ModelConfig), made
from its interface as the model repository's manifest declares it. Pure data: the document uses the
field names of Triton's ``model_config.proto`` (snake case, enums by name), so the gRPC front turns it
into the protobuf message with ``json_format.ParseDict`` and ``tritonclient`` reads either.

Triton's conventions: with ``max_batch_size > 0`` the first dimension is the batch and ``dims`` leave
it out; datatypes are ``TYPE_FP32``-style (``BYTES`` is ``TYPE_STRING``); a model that batches has
a ``dynamic_batching`` block whose ``max_queue_delay_microseconds`` is the manifest's batch delay.
"""

from __future__ import annotations

from typing import Any

from shoal.protocol.interface import ModelInterface, TensorSpec

# Open Inference Protocol datatypes as Triton's configuration spells them.
CONFIG_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}

# shoal's runtimes as Triton's platform and backend names (those Triton has; the others keep ours).
PLATFORMS = {
    "onnx": ("onnxruntime_onnx", "onnxruntime"),
    "torchscript": ("pytorch_libtorch", "pytorch"),
    "python": ("", "python"),
    "sklearn": ("", "sklearn"),
    "pipeline": ("ensemble", ""),
}


def _tensor(t: TensorSpec, batched: bool, labels: list[str] | None) -> dict[str, Any]:
    dims = list(t.shape[1:] if batched and t.shape else t.shape)
    doc: dict[str, Any] = {"name": t.name, "data_type": CONFIG_TYPES.get(t.datatype, "TYPE_INVALID"), "dims": dims}
    if labels:
        doc["label_filename"] = f"{t.name}.labels"  # served as the manifest's labels, in order
    return doc


def _version_number(version: str | None) -> int:
    """A pipeline step's version as Triton's int64 (-1: the newest, as shoal's default is)."""
    return int(version) if version is not None and version.isdigit() and len(version) < 19 else -1


def model_config(
    spec: ModelInterface, steps: list[tuple[str, str | None, dict[str, str], dict[str, str]]] | None = None
) -> dict[str, Any]:
    """Triton's model configuration of ``spec``. A pipeline gives its ``steps`` as (model, version,
    input map, output map): Triton's ensemble scheduling, maps from the step model's tensor names
    to the pipeline's."""
    platform, backend = PLATFORMS.get(spec.runtime, ("", spec.runtime))
    batched = spec.max_batch_size > 0
    doc: dict[str, Any] = {
        "name": spec.name,
        "platform": platform,
        "backend": backend,
        "version_policy": {"specific": {"versions": [_version_number(spec.version)]}}
        if spec.version.isdigit() and len(spec.version) < 19
        else {"latest": {"num_versions": 1}},
        "max_batch_size": max(0, spec.max_batch_size),
        "input": [_tensor(t, batched, None) for t in spec.inputs],
        "output": [_tensor(t, batched, spec.labels.get(t.name)) for t in spec.outputs],
        "parameters": {},
    }
    if batched:
        doc["dynamic_batching"] = {"max_queue_delay_microseconds": int(round(spec.batch_delay_ms * 1000))}
    if spec.image_input is not None:
        doc["parameters"]["image_input"] = {"string_value": spec.image_input}
    if steps is not None:
        doc["ensemble_scheduling"] = {
            "step": [
                {"model_name": m, "model_version": _version_number(v), "input_map": ins, "output_map": outs}
                for m, v, ins, outs in steps
            ]
        }
    return doc
