"""The ``autoscale`` block of a gateway's configuration: which engine starts workers, and each
model's scaling policy. Declared once as typed structures and validated by msgspec, so an error
names the field path (``autoscale.models.mnist-cnn.min: Expected `int`, got `str```).

```yaml
autoscale:
  engine: local              # local | ray | kubernetes
  repo: /models              # the model repository workers load from (default: the bundled models)
  models:
    mnist-cnn:
      version: "1"           # default: the newest in the repository
      min: 1
      max: 4
      target_utilisation: 0.7
      idle_to_zero_s: null   # with min 0: seconds without a request before the model sleeps
```
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from shoal.autoscale.policy import ScalePolicy
from shoal.protocol.names import RULE, valid_name
from shoal.typed import convert


class Resources(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What one worker needs where an engine places workers by resources (Ray)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int | None = None
    custom: dict[str, float] = {}  # e.g. {site-a: 1}: only nodes that offer the resource


class ModelScale(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    version: str | None = None
    min: int = 1
    max: int = 4
    target_utilisation: float = 0.7
    scale_up_window_s: float = 1.0
    scale_down_window_s: float = 30.0
    cooldown_s: float = 10.0
    max_step: int = 2
    idle_to_zero_s: float | None = None
    start_timeout_s: float = 60.0
    # Workers that exit before joining this many times in a row (the model fails to load: a corrupt or
    # truncated file, a handler that raises): the model is marked unavailable, its requests answered
    # 503 with the reason, and nothing is started again until an operator loads it.
    max_start_failures: int = 3
    lead_s: float | None = None  # scale up for the load this far ahead (None: a worker's measured start-up; 0: off)
    worker_args: list[str] = []  # extra `shoal worker` options (e.g. --threads 2, --tls-ca ca.pem)
    resources: Resources = Resources()

    def policy(self) -> ScalePolicy:
        return ScalePolicy(
            min_workers=self.min,
            max_workers=self.max,
            target_utilisation=self.target_utilisation,
            scale_up_window_s=self.scale_up_window_s,
            scale_down_window_s=self.scale_down_window_s,
            cooldown_s=self.cooldown_s,
            max_step=self.max_step,
            idle_to_zero_s=self.idle_to_zero_s,
            start_timeout_s=self.start_timeout_s,
        )


class RayOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    address: str = "auto"  # the Ray cluster to join ("auto": the one this machine is part of)
    namespace: str = "shoal"
    # The address of this machine's own Ray node (the raylet the gateway's driver attaches to);
    # default: the local address from which the head at `address` is reached.
    node_ip_address: str | None = None


class AutoscaleConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    engine: Literal["local", "ray", "kubernetes"] = "local"
    repo: str | None = None
    interval_s: float = 0.5  # how often load is sampled and the policy consulted
    worker_gateway: str | None = None  # address workers dial (default: the worker port as bound)
    workdir: str | None = None  # local engine: where worker logs go (default: a temporary folder)
    drain_timeout_s: float = 30.0  # a drained worker that has not left by then is stopped
    ray: RayOptions = RayOptions()
    models: dict[str, ModelScale] = {}


class AutoscaleError(ValueError):
    pass


def parse_autoscale(block: Any, where: str = "autoscale") -> AutoscaleConfig:
    """The validated block; ``AutoscaleError`` naming the field otherwise."""
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise AutoscaleError(f"{where}: must be a map (engine, repo, models ...)")
    raw_models = block.get("models") or {}
    if not isinstance(raw_models, dict):
        raise AutoscaleError(f"{where}.models: must map model names to their policies")
    cfg = convert({k: v for k, v in block.items() if k != "models"}, AutoscaleConfig, where, AutoscaleError)
    models = {}
    for name, m in raw_models.items():
        at = f"{where}.models.{name}"
        if not valid_name(name):
            raise AutoscaleError(f"{where}.models: {name!r:.80} is not a model name ({RULE})")
        scale = convert(m or {}, ModelScale, at, AutoscaleError)
        if scale.version is not None and not valid_name(scale.version):
            raise AutoscaleError(f"{at}.version: {scale.version!r:.80} is not a model version ({RULE})")
        problems = scale.policy().problems()
        if scale.max_start_failures < 1:
            problems.append("max_start_failures: must be 1 or more")
        if problems:
            raise AutoscaleError(f"{at}.{problems[0]}")
        models[str(name)] = scale
    if cfg.interval_s <= 0 or cfg.drain_timeout_s <= 0:
        raise AutoscaleError(f"{where}: interval_s and drain_timeout_s must be positive")
    return msgspec.structs.replace(cfg, models=models)
