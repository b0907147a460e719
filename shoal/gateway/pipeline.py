"""Pipelines: the context list of paper 000. A pipeline is a named, ordered list of steps, each a model
(with an optional version); each step's inputs come from the request or from earlier steps' outputs,
and a step may fan out over the rows of one input (one request per detected object, say), each row
going to the least-loaded worker of its model. A pipeline is served like a model.

Declared in the gateway's configuration::

    pipelines:
      read-digits:
        steps:
          - {name: detect, model: digit-detector, inputs: {image: request.image}}
          - {name: classify, model: mnist-cnn, inputs: {image: detect.crops}, fanout: image}
          - {name: join, model: digits-to-number, inputs: {logits: classify.logits}}
        outputs: {number: join.number, boxes: detect.boxes, logits: classify.logits}

``parse_pipelines`` (pure) validates such a block; ``Pipeline.run`` executes one request.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.gateway.pool import ModelPool, ModelSpec, ModelTable, RequestFailed
from shoal.modelrepo.manifest import TensorSpec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
REQUEST = "request"
DEFAULT_STEP_IN_FLIGHT = 256


class PipelineError(ValueError):
    """A pipeline declaration that cannot run; the message names the key."""


@dataclass(frozen=True)
class Step:
    name: str
    model: str
    version: str | None
    inputs: dict[str, tuple[str, str]]  # step input -> (source: "request" or a step name, tensor name)
    fanout: str | None = None


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    version: str
    steps: tuple[Step, ...]
    outputs: dict[str, tuple[str, str]]
    max_in_flight_per_step: int = DEFAULT_STEP_IN_FLIGHT


def _ref(value: Any, where: str, known: set[str]) -> tuple[str, str]:
    if not isinstance(value, str) or value.count(".") < 1:
        raise PipelineError(f"{where}: '{value}' must be 'request.<input>' or '<step>.<output>'")
    src, _, tensor = value.partition(".")
    if src != REQUEST and src not in known:
        raise PipelineError(f"{where}: '{src}' is not the request or an earlier step")
    if not tensor:
        raise PipelineError(f"{where}: '{value}' names no tensor")
    return src, tensor


def parse_pipelines(block: Any, where: str = "pipelines") -> dict[str, PipelineSpec]:
    """Validate the ``pipelines`` block of a gateway configuration."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise PipelineError(f"{where}: must map pipeline names to their declarations")
    out: dict[str, PipelineSpec] = {}
    for pname, decl in block.items():
        w = f"{where}.{pname}"
        if not isinstance(pname, str) or not _NAME.match(pname):
            raise PipelineError(f"{w}: pipeline names are 1-128 letters, digits, '_', '.', '-'")
        if not isinstance(decl, dict):
            raise PipelineError(f"{w}: must be a map with steps and outputs")
        unknown = set(decl) - {"version", "steps", "outputs", "max_in_flight_per_step"}
        if unknown:
            raise PipelineError(f"{w}: unknown key(s) {', '.join(sorted(unknown))}")
        steps_raw = decl.get("steps")
        if not isinstance(steps_raw, list) or not steps_raw:
            raise PipelineError(f"{w}.steps: must be a non-empty list")
        steps: list[Step] = []
        seen: set[str] = set()
        for i, s in enumerate(steps_raw):
            sw = f"{w}.steps[{i}]"
            if not isinstance(s, dict):
                raise PipelineError(f"{sw}: must be a map with model and inputs")
            unknown = set(s) - {"name", "model", "version", "inputs", "fanout"}
            if unknown:
                raise PipelineError(f"{sw}: unknown key(s) {', '.join(sorted(unknown))}")
            model = s.get("model")
            if not isinstance(model, str) or not _NAME.match(model):
                raise PipelineError(f"{sw}.model: must name a model")
            name = str(s.get("name") or model)
            if name in seen or name == REQUEST:
                raise PipelineError(f"{sw}.name: '{name}' is used twice or reserved")
            inputs = s.get("inputs")
            if not isinstance(inputs, dict) or not inputs:
                raise PipelineError(f"{sw}.inputs: must map the model's inputs to sources")
            refs = {str(k): _ref(v, f"{sw}.inputs.{k}", seen) for k, v in inputs.items()}
            fanout = s.get("fanout")
            if fanout is not None and fanout not in refs:
                raise PipelineError(f"{sw}.fanout: '{fanout}' is not one of the step's inputs")
            version = s.get("version")
            steps.append(Step(name, model, str(version) if version is not None else None, refs, fanout))
            seen.add(name)
        outs = decl.get("outputs")
        if not isinstance(outs, dict) or not outs:
            raise PipelineError(f"{w}.outputs: must map output names to '<step>.<output>'")
        outputs = {str(k): _ref(v, f"{w}.outputs.{k}", seen) for k, v in outs.items()}
        mif = decl.get("max_in_flight_per_step", DEFAULT_STEP_IN_FLIGHT)
        if not isinstance(mif, int) or mif < 1:
            raise PipelineError(f"{w}.max_in_flight_per_step: must be a positive integer")
        out[pname] = PipelineSpec(pname, str(decl.get("version", "1")), tuple(steps), outputs, mif)
    return out


CallModel = Callable[[ModelPool, dict[str, np.ndarray], float], Awaitable[dict[str, np.ndarray]]]


@dataclass
class Pipeline:
    spec: PipelineSpec
    models: ModelTable
    _limits: dict[str, asyncio.Semaphore] = field(default_factory=dict)

    def _pool(self, step: Step) -> ModelPool:
        try:
            return self.models.find(step.model, step.version)
        except RequestFailed as e:
            raise RequestFailed(f"pipeline '{self.spec.name}' step '{step.name}': {e}", e.status) from None

    @property
    def ready(self) -> bool:
        try:
            return all(self._pool(s).ready for s in self.spec.steps)
        except RequestFailed:
            return False

    def interface(self) -> ModelSpec:
        """The pipeline's inputs and outputs, from its steps' models as their workers announced them."""
        inputs: dict[str, TensorSpec] = {}
        produced: dict[tuple[str, str], TensorSpec] = {}
        image_input = None
        labels: dict[str, list[str]] = {}
        for step in self.spec.steps:
            pool = self._pool(step)
            specs = {t.name: t for t in pool.spec.inputs}
            for k, (src, tensor) in step.inputs.items():
                if k not in specs:
                    raise RequestFailed(
                        f"pipeline '{self.spec.name}' step '{step.name}': model '{step.model}' has no input '{k}'",
                        500,
                    )
                if src == REQUEST:
                    inputs[tensor] = TensorSpec(tensor, specs[k].datatype, specs[k].shape)
                    if pool.spec.image_input == k:
                        image_input = tensor
            for t in pool.spec.outputs:
                shape = (-1, *t.shape[1:]) if step.fanout else t.shape
                produced[(step.name, t.name)] = TensorSpec(t.name, t.datatype, shape)
                if t.name in pool.spec.labels:
                    labels[f"{step.name}.{t.name}"] = pool.spec.labels[t.name]
        outputs = []
        out_labels = {}
        for name, (src, tensor) in self.spec.outputs.items():
            t = produced.get((src, tensor))
            if t is None:
                raise RequestFailed(
                    f"pipeline '{self.spec.name}': output '{name}' refers to unknown '{src}.{tensor}'", 500
                )
            outputs.append(TensorSpec(name, t.datatype, t.shape))
            if f"{src}.{tensor}" in labels:
                out_labels[name] = labels[f"{src}.{tensor}"]
        return ModelSpec(
            name=self.spec.name,
            version=self.spec.version,
            inputs=tuple(inputs.values()),
            outputs=tuple(outputs),
            max_batch_size=0,
            image_input=image_input,
            labels=out_labels,
            runtime="pipeline",
        )

    def metadata(self) -> dict[str, Any]:
        md = self.interface().metadata([self.spec.version])
        md["parameters"]["steps"] = [
            {"name": s.name, "model": s.model, "version": s.version, "fanout": s.fanout}
            for s in self.spec.steps
        ]
        return md

    async def run(
        self, request: dict[str, np.ndarray], deadline: float, call: CallModel
    ) -> dict[str, np.ndarray]:
        env: dict[str, dict[str, np.ndarray]] = {REQUEST: request}
        for step in self.spec.steps:
            pool = self._pool(step)
            inputs = {k: env[src][tensor] for k, (src, tensor) in step.inputs.items()}
            limit = self._limits.get(step.name)
            if limit is None:
                limit = self._limits[step.name] = asyncio.Semaphore(self.spec.max_in_flight_per_step)
            try:
                if step.fanout is None:
                    async with limit:
                        env[step.name] = await call(pool, inputs, deadline)
                else:
                    env[step.name] = await self._fan_out(step, pool, inputs, deadline, call, limit)
            except RequestFailed as e:
                raise RequestFailed(
                    f"pipeline '{self.spec.name}' step '{step.name}' ({step.model}): {e}", e.status
                ) from None
        return {name: env[src][tensor] for name, (src, tensor) in self.spec.outputs.items()}

    @staticmethod
    async def _fan_out(
        step: Step,
        pool: ModelPool,
        inputs: dict[str, np.ndarray],
        deadline: float,
        call: CallModel,
        limit: asyncio.Semaphore,
    ) -> dict[str, np.ndarray]:
        rows = inputs[step.fanout]  # type: ignore[index]
        n = int(rows.shape[0])

        async def one(i: int) -> dict[str, np.ndarray]:
            async with limit:
                return await call(pool, {**inputs, step.fanout: rows[i : i + 1]}, deadline)  # type: ignore[dict-item]

        results = await asyncio.gather(*(one(i) for i in range(n)))
        if not results:
            return {
                t.name: np.zeros((0, *[max(d, 0) for d in t.shape[1:]]), dtype=_dtype(t.datatype))
                for t in pool.spec.outputs
            }
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def _dtype(datatype: str) -> Any:
    from shoal.protocol.tensors import NP_DTYPES

    return NP_DTYPES.get(datatype, np.float32)
