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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec
import numpy as np

from shoal.gateway.dispatch import Admission, Dispatcher
from shoal.gateway.pool import ModelPool, ModelTable, RequestFailed
from shoal.modelrepo.manifest import TensorSpec
from shoal.protocol.interface import ModelInterface
from shoal.protocol.model_config import model_config
from shoal.protocol.names import RULE, valid_name
from shoal.typed import convert

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


class _StepDoc(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    inputs: dict[str, str]
    name: str | None = None
    version: str | int | None = None
    fanout: str | None = None


class _PipelineDoc(msgspec.Struct, forbid_unknown_fields=True):
    steps: list[_StepDoc]
    outputs: dict[str, str] = {}
    version: str | int = "1"
    max_in_flight_per_step: int = DEFAULT_STEP_IN_FLIGHT


def _ref(value: str, where: str, known: set[str]) -> tuple[str, str]:
    if value.count(".") < 1:
        raise PipelineError(f"{where}: '{value}' must be 'request.<input>' or '<step>.<output>'")
    src, _, tensor = value.partition(".")
    if src != REQUEST and src not in known:
        raise PipelineError(f"{where}: '{src}' is not the request or an earlier step")
    if not tensor:
        raise PipelineError(f"{where}: '{value}' names no tensor")
    return src, tensor


def parse_pipelines(block: Any, where: str = "pipelines") -> dict[str, PipelineSpec]:
    """Validate the ``pipelines`` block of a gateway configuration: types by msgspec (errors name the
    key), then the meaning (names, references to earlier steps, fan-out)."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise PipelineError(f"{where}: must map pipeline names to their declarations")
    out: dict[str, PipelineSpec] = {}
    for pname, decl in block.items():
        w = f"{where}.{pname}"
        if not valid_name(pname):
            raise PipelineError(f"{w}: a pipeline name must be {RULE}")
        doc = convert(decl, _PipelineDoc, w, PipelineError)
        if not doc.steps:
            raise PipelineError(f"{w}.steps: must be a non-empty list")
        steps: list[Step] = []
        seen: set[str] = set()
        for i, s in enumerate(doc.steps):
            sw = f"{w}.steps[{i}]"
            if not valid_name(s.model):
                raise PipelineError(f"{sw}.model: a model name must be {RULE}")
            name = s.name or s.model
            if name in seen or name == REQUEST:
                raise PipelineError(f"{sw}.name: '{name}' is used twice or reserved")
            if not s.inputs:
                raise PipelineError(f"{sw}.inputs: must map the model's inputs to sources")
            refs = {k: _ref(v, f"{sw}.inputs.{k}", seen) for k, v in s.inputs.items()}
            if s.fanout is not None and s.fanout not in refs:
                raise PipelineError(f"{sw}.fanout: '{s.fanout}' is not one of the step's inputs")
            version = str(s.version) if s.version is not None else None
            if version is not None and not valid_name(version):
                raise PipelineError(f"{sw}.version: a model version must be {RULE}")
            steps.append(Step(name, s.model, version, refs, s.fanout))
            seen.add(name)
        if not doc.outputs:
            raise PipelineError(f"{w}.outputs: must map output names to '<step>.<output>'")
        outputs = {k: _ref(v, f"{w}.outputs.{k}", seen) for k, v in doc.outputs.items()}
        if doc.max_in_flight_per_step < 1:
            raise PipelineError(f"{w}.max_in_flight_per_step: must be a positive integer")
        if not valid_name(str(doc.version)):
            raise PipelineError(f"{w}.version: a version must be {RULE}")
        out[pname] = PipelineSpec(pname, str(doc.version), tuple(steps), outputs, doc.max_in_flight_per_step)
    return out


CallModel = Callable[[ModelPool, dict[str, np.ndarray], float], Awaitable[dict[str, np.ndarray]]]


@dataclass
class Pipeline:
    spec: PipelineSpec
    models: ModelTable
    dispatcher: Dispatcher
    _limits: dict[str, Admission] = field(default_factory=dict)

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

    def interface(self) -> ModelInterface:
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
        return ModelInterface(
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

    def config(self) -> dict[str, Any]:
        """Triton's configuration of the pipeline: an ensemble, its steps mapping each model's tensor
        names to the pipeline's (``request.x`` is the request's ``x``, ``step.y`` a step's ``y``)."""
        exposed = {(src, tensor): name for name, (src, tensor) in self.spec.outputs.items()}
        steps = []
        for step in self.spec.steps:
            pool = self._pool(step)
            ins = {k: (t if src == REQUEST else f"{src}.{t}") for k, (src, t) in step.inputs.items()}
            outs = {t.name: exposed.get((step.name, t.name), f"{step.name}.{t.name}") for t in pool.spec.outputs}
            steps.append((step.model, step.version, ins, outs))
        return model_config(self.interface(), steps)

    async def run(
        self, request: dict[str, np.ndarray], deadline: float, call: CallModel
    ) -> dict[str, np.ndarray]:
        env: dict[str, dict[str, np.ndarray]] = {REQUEST: request}
        for step in self.spec.steps:
            pool = self._pool(step)
            inputs = {k: env[src][tensor] for k, (src, tensor) in step.inputs.items()}
            limit = self._limits.get(step.name)
            if limit is None:
                limit = self._limits[step.name] = self.dispatcher.admission(self.spec.max_in_flight_per_step)
            try:
                if step.fanout is None:
                    env[step.name] = await self._admitted(limit, deadline, partial(call, pool, inputs, deadline))
                else:
                    env[step.name] = await self._fan_out(step, pool, inputs, deadline, call, limit)
            except RequestFailed as e:
                raise RequestFailed(
                    f"pipeline '{self.spec.name}' step '{step.name}' ({step.model}): {e}", e.status
                ) from None
        return {name: env[src][tensor] for name, (src, tensor) in self.spec.outputs.items()}

    async def _admitted(self, limit: Admission, deadline: float, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()`` once the step has a place for it (waiting at most until ``deadline``)."""
        await self.dispatcher.admit(limit, deadline)
        try:
            return await call()
        finally:
            self.dispatcher.release(limit)

    async def _fan_out(
        self,
        step: Step,
        pool: ModelPool,
        inputs: dict[str, np.ndarray],
        deadline: float,
        call: CallModel,
        limit: Admission,
    ) -> dict[str, np.ndarray]:
        fan = step.fanout
        assert fan is not None
        rows = inputs[fan]
        n = int(rows.shape[0])

        async def one(i: int) -> dict[str, np.ndarray]:
            return await self._admitted(limit, deadline, lambda: call(pool, {**inputs, fan: rows[i : i + 1]}, deadline))

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
