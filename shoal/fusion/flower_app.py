"""Cooperative learning across sites on Flower's application model: a ServerApp and a ClientApp.

Flower runs these under its deployment runtime (``shoal federation`` starts it): the SuperLink runs
:data:`server_app` in a process of its own, and each site's SuperNode runs :data:`client_app` for
every message it gets. One Flower round is one fusion round:

1. the ServerApp sends every site that is online **its own** last fused weights (Flower's
   strategies send one global model; fusion keeps one model per site) and the local work of the
   round: ``fuse_every`` optimizer steps or epochs (``PeerFusion.local_work``);
2. each site trains on its own data (``sources.load_site``) and replies with its weights and its
   error on its own held-out rows;
3. the strategy fuses the weights it got with the round's schedule (``PeerFusion.fuse``); a site that
   did not answer (offline, dropped out, timed out) sits the round out and keeps its weights on the
   server, which it gets back when it returns.

After the last round the ServerApp averages the sites' models into one, asks every site for its
accuracy on its own held-out rows, and publishes that model into a model repository as a new
version (``export.export_fused``) with the sites, schedule, rounds and metric as provenance.

**What the server sees**: each site's model weights after every round, the site's registered name,
and two numbers per site and round (its held-out error and how many held-out rows it has); at the
end, each site's held-out accuracy and row count. **What it never sees**: any input, any label, any
count of training rows, any gradient of a single example. The weights are a function of the
site's data, so they are not anonymous; fusion shares models, not data.

The strategy is :class:`PeerFusionStrategy`, a Flower ``Strategy`` around the transport-free
:class:`shoal.fusion.strategy.PeerFusion` (schedule and rule as parameters). Importing this module
imports flwr; ``import shoal`` first turns Flower's telemetry and update check off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import shoal  # noqa: F401  (FLWR_TELEMETRY_ENABLED=0 and FLWR_DISABLE_UPDATE_CHECK=1 before flwr)
from shoal.fusion import peer as one_peer
from shoal.fusion.strategy import Interval, PeerFusion

# isort: split
# flwr reads its telemetry setting when imported, so it comes after shoal.
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

PeerWeights = list[np.ndarray]

# Keys of the run configuration (``shoal federation run`` sets them; pyproject's [tool.flwr.app.config]).
RUN_DEFAULTS: dict[str, Any] = {
    "sites": "",  # registered site names, space separated: site i is peer i
    "rounds": 10,
    "topology": "ring",
    "rate": 0.55,
    "update": "sequential",
    "hypercube-edges": "twice",
    "fuse-every": "1epoch",
    "seed": 0,
    "hidden": "80 30",
    "lr": 0.01,
    "batch": 10,
    "split": "random",  # for paper:<data set> sources
    "template": "",  # the manifest (JSON) whose input, outputs and labels the model takes
    "wait": 30.0,  # seconds to wait at the start for every site to be online
    "round-wait": 10.0,  # seconds to wait at each later round for sites that are missing
    "round-timeout": 600.0,
    "log": "",  # a JSON-lines file with one line per round
    "export-repo": "",
    "export-name": "",
    "command": "",
}


def _f32(ws: Iterable[np.ndarray]) -> PeerWeights:
    return [np.ascontiguousarray(w, np.float32) for w in ws]


PUSH_ATTEMPTS = 3


def exchange(
    grid: Grid, make: Callable[[], list[Message]], timeout: float, poll: float = 0.5
) -> list[Message]:
    """Send ``make()``'s messages and wait for replies; give up on a site once it is offline or
    ``timeout`` passes.

    Flower's ``send_and_receive`` polls every 3 seconds and waits the whole timeout for a site that
    went away; rounds here are seconds long, and a site that left will not answer. A push the
    SuperLink does not take (overloaded, restarting) is tried again with fresh messages, a failed
    poll is simply polled again: one slow moment must not end a federation's run.
    """
    for attempt in range(PUSH_ATTEMPTS):
        messages = make()
        if not messages:
            return []
        try:
            ids = [i for i in grid.push_messages(messages) if i]
            break
        except Exception as e:
            if attempt + 1 == PUSH_ATTEMPTS:
                raise
            print(
                f"pushing {len(messages)} messages failed ({type(e).__name__}: {e}); trying again", flush=True
            )
            time.sleep(2.0 * (attempt + 1))
    dest = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=False)}
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    last_check = time.monotonic()
    while pending and time.monotonic() < deadline:
        try:
            got = list(grid.pull_messages(list(pending)))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending and time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                online = {n.node_id for n in grid.get_nodes() if n.status == "online"}
                pending = {mid for mid in pending if dest[mid] in online}
        except Exception as e:
            print(f"polling for replies failed ({type(e).__name__}: {e}); polling again", flush=True)
        if pending:
            time.sleep(poll)
    return replies


class PeerFusionStrategy(Strategy):
    """Paper 003's fusion as a Flower ``Strategy``: one model per site, fused pairwise each round.

    ``fusion`` is the schedule and rule; ``sites`` the registered names in peer order (site ``i`` is
    peer ``i``); ``initial`` the shared initial weights; ``train_config`` what every site needs to
    train (the model's template, hidden sizes, learning rate, batch, seed).
    """

    def __init__(
        self,
        fusion: PeerFusion,
        sites: Sequence[str],
        initial: PeerWeights,
        train_config: dict[str, Any],
        round_timeout: float = 600.0,
        log_path: str | Path | None = None,
        round_wait: float = 0.0,
    ) -> None:
        if len(sites) != fusion.peers or len(set(sites)) != len(sites):
            raise ValueError(f"need {fusion.peers} distinct site names, got {list(sites)}")
        self.fusion = fusion
        self.sites = list(sites)
        self.weights: dict[int, PeerWeights] = {p: _f32(initial) for p in range(fusion.peers)}
        self.train_config = dict(train_config)
        self.round_timeout = round_timeout
        self.round_wait = round_wait
        self.log_path = Path(log_path) if log_path else None
        self.node_peer: dict[int, int] = {}
        self.rounds: list[dict[str, Any]] = []
        self.evaluation: dict[str, Any] | None = None  # the published model on the sites' held-out rows

    # ------------------------------------------------------------------------------ who is there

    def online_peers(self, grid: Grid) -> dict[int, int]:
        """``{node id: peer}`` of the online nodes that are enrolled sites of this federation.

        A node's site is the name it was registered with (``flwr supernode register --name``), bound
        to its key; nodes registered without a name are asked for the ``site`` of their settings.
        """
        nodes = [n for n in grid.get_nodes() if n.status == "online"]
        unnamed = []
        for n in nodes:
            if n.node_id in self.node_peer:
                continue
            if n.name:
                if n.name in self.sites:
                    self.node_peer[n.node_id] = self.sites.index(n.name)
            else:
                unnamed.append(n.node_id)
        if unnamed:

            def ask() -> list[Message]:
                return [Message(RecordDict(), dst_node_id=i, message_type="query") for i in unnamed]

            for reply in exchange(grid, ask, timeout=60):
                if reply.has_content() and "site" in reply.content:
                    site = str(reply.content["site"]["name"])
                    if site in self.sites:
                        self.node_peer[reply.metadata.src_node_id] = self.sites.index(site)
        online = {n.node_id for n in nodes}
        out: dict[int, int] = {}
        for node, peer in self.node_peer.items():
            if node in online and peer not in out.values():
                out[node] = peer
        return out

    def wait_for_sites(self, grid: Grid, wait: float) -> None:
        deadline = time.monotonic() + wait
        while len(self.online_peers(grid)) < len(self.sites) and time.monotonic() < deadline:
            time.sleep(0.5)

    # ------------------------------------------------------------------------------ Strategy API

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        work = self.fusion.local_work(server_round - 1)
        out = []
        for node, peer in sorted(self.online_peers(grid).items(), key=lambda kv: kv[1]):
            cfg = ConfigRecord(
                {
                    **config,
                    **self.train_config,
                    "round": server_round,
                    "peer": peer,
                    "peers": self.fusion.peers,
                    "work-unit": str(work["unit"]),
                    "work-start": int(work["start"]),
                    "work-count": int(work["count"]),
                }
            )
            content = RecordDict({"arrays": ArrayRecord(self.weights[peer]), "config": cfg})
            out.append(Message(content, dst_node_id=node, message_type="train"))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        received: dict[int, PeerWeights] = {}
        errors: dict[int, float] = {}
        failures = 0
        for reply in replies:
            if reply.has_error() or not reply.has_content():
                failures += 1
                continue
            peer = int(reply.content["metrics"]["peer"])
            received[peer] = _f32(reply.content["arrays"].to_numpy_ndarrays())
            errors[peer] = float(reply.content["metrics"]["test-error"])
        self.weights.update({p: _f32(w) for p, w in self.fusion.fuse(server_round - 1, received).items()})
        entry = {
            "round": server_round,
            "peers": sorted(received),
            "sites": [self.sites[p] for p in sorted(received)],
            "failures": failures,
            "pairs": self.fusion.pairs(server_round - 1, set(received)),
            "local_errors": {str(p): e for p, e in sorted(errors.items())},
            "time": time.time(),
        }
        self.rounds.append(entry)
        self._log(entry)
        mean_err = float(np.mean(list(errors.values()))) if errors else float("nan")
        return None, MetricRecord({"sites": len(received), "mean-local-error": mean_err})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask every online site to measure ``arrays`` (the model to publish) on its held-out rows."""
        cfg = ConfigRecord({**config, **self.train_config, "peers": self.fusion.peers})
        out = []
        for node, peer in self.online_peers(grid).items():
            c = ConfigRecord({**cfg, "peer": peer})
            out.append(
                Message(
                    RecordDict({"arrays": arrays, "config": c}), dst_node_id=node, message_type="evaluate"
                )
            )
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        per_site: dict[str, dict[str, float]] = {}
        for reply in replies:
            if reply.has_error() or not reply.has_content():
                continue
            m = reply.content["metrics"]
            per_site[self.sites[int(m["peer"])]] = {
                "accuracy": float(m["accuracy"]),
                "examples": int(m["examples"]),
            }
        total = sum(s["examples"] for s in per_site.values())
        if not total:
            return None
        acc = sum(s["accuracy"] * s["examples"] for s in per_site.values()) / total
        self.evaluation = {"accuracy": acc, "examples": total, "sites": per_site}
        return MetricRecord({"accuracy": acc, "examples": total})

    def summary(self) -> None:
        print(f"PeerFusionStrategy: {self.fusion.describe()}, sites {self.sites}", flush=True)

    def consensus(self) -> PeerWeights:
        """The published model: the plain mean of the sites' last fused weights."""
        return [
            np.mean(np.stack(ws), axis=0).astype(np.float32)
            for ws in zip(*self.weights.values(), strict=True)
        ]

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Run ``num_rounds`` fusion rounds, then evaluate the consensus model on every site."""
        result = Result()
        timeout = self.round_timeout if timeout is None else timeout
        self.summary()
        for rnd in range(1, num_rounds + 1):
            if rnd > 1 and self.round_wait > 0:
                self.wait_for_sites(grid, self.round_wait)  # a site that is restarting gets a moment
            cfg = train_config or ConfigRecord()

            def train_messages(rnd: int = rnd, cfg: ConfigRecord = cfg) -> list[Message]:
                return list(self.configure_train(rnd, ArrayRecord(), cfg, grid))

            _, metrics = self.aggregate_train(rnd, exchange(grid, train_messages, timeout))
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
            print(f"round {rnd}/{num_rounds}: {dict(metrics or {})}", flush=True)
        result.arrays = ArrayRecord(self.consensus())
        arrays, ecfg = result.arrays, evaluate_config or ConfigRecord()

        def evaluate_messages() -> list[Message]:
            return list(self.configure_evaluate(num_rounds, arrays, ecfg, grid))

        metrics = self.aggregate_evaluate(num_rounds, exchange(grid, evaluate_messages, timeout))
        if metrics is not None:
            result.evaluate_metrics_clientapp[num_rounds] = metrics
            print(f"consensus model on the sites' held-out rows: {dict(metrics)}", flush=True)
        return result

    def _log(self, entry: dict[str, Any]) -> None:
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------------------------------------- server

server_app = ServerApp()


def strategy_from_config(run_config: dict[str, Any]) -> PeerFusionStrategy:
    """Build the strategy, the shared initial weights and the sites' training settings from a run config."""
    from shoal.fusion.export import classes, input_size
    from shoal.modelrepo.manifest import parse_manifest

    cfg = {**RUN_DEFAULTS, **run_config}
    sites = str(cfg["sites"]).split()
    if not sites:
        raise ValueError("the run config names no sites: set sites = 'name-0 name-1 ...'")
    if not cfg["template"]:
        raise ValueError("the run config has no template manifest (the model's input and classes)")
    template = parse_manifest(json.loads(str(cfg["template"])), "template")
    hidden = [int(h) for h in str(cfg["hidden"]).split()]
    fusion = PeerFusion(
        len(sites),
        str(cfg["topology"]),
        float(cfg["rate"]),
        str(cfg["update"]),
        str(cfg["hypercube-edges"]),
        Interval.parse(str(cfg["fuse-every"])),
        int(cfg["seed"]),
    )
    sizes = one_peer.layer_sizes(input_size(template), hidden, len(classes(template)))
    initial = one_peer.init_weights(sizes, fusion.seed)
    train_config = {
        "template": str(cfg["template"]),
        "hidden": " ".join(map(str, hidden)),
        "lr": float(cfg["lr"]),
        "batch": int(cfg["batch"]),
        "seed": fusion.seed,
        "split": str(cfg["split"]),
    }
    return PeerFusionStrategy(
        fusion,
        sites,
        initial,
        train_config,
        float(cfg["round-timeout"]),
        cfg["log"] or None,
        float(cfg["round-wait"]),
    )


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from shoal.fusion.export import export_fused
    from shoal.modelrepo.manifest import parse_manifest

    cfg = {**RUN_DEFAULTS, **dict(context.run_config)}
    strategy = strategy_from_config(cfg)
    strategy.wait_for_sites(grid, float(cfg["wait"]))
    result = strategy.start(grid, num_rounds=int(cfg["rounds"]))
    if not any(r["peers"] for r in strategy.rounds):
        raise RuntimeError(
            f"no site of {strategy.sites} took part in any round: nothing trained, nothing published"
        )
    if not cfg["export-repo"]:
        return
    template = parse_manifest(json.loads(str(cfg["template"])), "template")
    provenance = {
        "command": str(cfg["command"]),
        "trained_by": "cooperative learning (paper 003): weighted-average model fusion on Flower",
        "sites": strategy.sites,
        "schedule": strategy.fusion.describe(),
        "rounds": len(strategy.rounds),
        "rounds_with_every_site": sum(len(r["peers"]) == len(strategy.sites) for r in strategy.rounds),
        "model": {
            "hidden": strategy.train_config["hidden"],
            "activation": "tanh",
            "published": "mean of the sites' models",
        },
        "metric": strategy.evaluation or {"accuracy": None, "note": "no site answered the evaluation"},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "flwr": _flwr_version(),
    }
    path = export_fused(
        str(cfg["export-repo"]),
        str(cfg["export-name"]) or template.name,
        result.arrays.to_numpy_ndarrays(),
        template,
        provenance,
    )
    print(f"published {path}", flush=True)
    strategy._log({"published": str(path), "metric": provenance["metric"]})


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


# ---------------------------------------------------------------------------------------------- site

client_app = ClientApp()

# The site's own settings (``flower-supernode --node-config``): where its data is.
SITE_KEYS = ("site", "data", "test-data", "holdout", "results-dir", "labels", "model")


def site_options(context: Context) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in dict(context.node_config).items() if k in SITE_KEYS}


def _site_data(cfg: ConfigRecord, context: Context) -> Any:
    from shoal.fusion.sources import load_site
    from shoal.modelrepo.manifest import parse_manifest

    template = parse_manifest(json.loads(str(cfg["template"])), "template")
    return load_site(
        site_options(context),
        template,
        int(cfg["peer"]),
        int(cfg["peers"]),
        int(cfg["seed"]),
        str(cfg["split"]),
    )


@client_app.query()
def site_identity(msg: Message, context: Context) -> Message:
    """Which site this node is (asked only of nodes registered without a name)."""
    return Message(
        RecordDict({"site": ConfigRecord({"name": str(context.node_config.get("site", ""))})}), reply_to=msg
    )


@client_app.train()
def site_train(msg: Message, context: Context) -> Message:
    """Train this site's model from the weights the server sent, on this site's data only (numpy)."""
    cfg = msg.content["config"]
    data = _site_data(cfg, context)
    weights = _f32(msg.content["arrays"].to_numpy_ndarrays())
    work = {"unit": str(cfg["work-unit"]), "start": int(cfg["work-start"]), "count": int(cfg["work-count"])}
    shard = np.arange(len(data.y_train))
    new = _f32(
        one_peer.train_local(
            data,
            shard,
            weights,
            int(cfg["seed"]),
            int(cfg["peer"]),
            work,
            float(cfg["lr"]),
            int(cfg["batch"]),
        )
    )
    error = one_peer.error(new, data.x_test, data.y_test)
    metrics = MetricRecord({"peer": int(cfg["peer"]), "test-error": error, "test-examples": len(data.y_test)})
    return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def site_evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the given model on this site's held-out rows."""
    cfg = msg.content["config"]
    data = _site_data(cfg, context)
    error = one_peer.error(_f32(msg.content["arrays"].to_numpy_ndarrays()), data.x_test, data.y_test)
    metrics = MetricRecord({"peer": int(cfg["peer"]), "accuracy": 1.0 - error, "examples": len(data.y_test)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
