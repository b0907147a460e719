"""Cooperative learning across machines on Flower: every peer is a Flower node, the server runs the schedule.

Each node holds its own shard and its own model; raw data never leaves it, only weights cross the
network, over TLS. One Flower round is one fusion period: the server sends every connected peer *its
own* last fused weights (not one global model), each peer trains ``every`` epochs on its shard, sends
its weights back, and the server runs the round's fusion schedule (``topology.schedule``) over the
peers that answered with the pure rule ``algorithm.apply_schedule``. A pair with a peer that did not
answer (dropped out, crashed, timed out) is skipped for that round; the missing peer keeps its last
fused weights on the server and gets them back when it rejoins.

Peers run the same code path as the in-process runner (``runner.train_peer``: same initial weights,
data order and SGD step), so for the same seeds the weights match ``shoal fuse``'s to float tolerance.

Processes (the server binds to the address it is given; use a routable one between machines)::

    python -m shoal.fusion.flower_app certs --out certs --host server.example.org
    python -m shoal.fusion.flower_app server --address 0.0.0.0:9092 --certs certs --peers 8 --rounds 50
    python -m shoal.fusion.flower_app node --server server.example.org:9092 --ca certs/ca.pem --peer 3 --peers 8

Flower is imported inside the functions, after ``shoal`` (which turns Flower's telemetry off).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import shoal  # noqa: F401  (sets FLWR_TELEMETRY_ENABLED=0 before flwr is imported)
from shoal.fusion import datasets
from shoal.fusion.algorithm import apply_schedule
from shoal.fusion.topology import schedule

PeerWeights = list[np.ndarray]


def round_schedule(
    topology: str, n_peers: int, seed: int, server_round: int, present: set[int]
) -> list[tuple[int, int]]:
    """Flower round ``r`` (1-based) is the runner's fusion round ``r-1``; pairs with an absent peer are skipped."""
    return [
        (a, b)
        for a, b in schedule(topology, n_peers, seed, server_round - 1)
        if a in present and b in present
    ]


def fuse_round(
    topology: str, n_peers: int, seed: int, rate: float, server_round: int, received: dict[int, PeerWeights]
) -> dict[int, PeerWeights]:
    """The server's work in one round: fuse the weights the peers sent; returns each present peer's new weights."""
    pairs = round_schedule(topology, n_peers, seed, server_round, set(received))
    table: list[Sequence[np.ndarray]] = [received.get(p, []) for p in range(n_peers)]
    fused = apply_schedule(table, pairs, rate)
    return {p: fused[p] for p in received}


def reference_rounds(
    data: Any,
    shards: Sequence[np.ndarray],
    seed: int,
    topology: str,
    rate: float,
    every: int,
    rounds: int,
    hidden: Sequence[int],
    lr: float,
    batch: int,
    absent: dict[int, set[int]] | None = None,
) -> dict[int, PeerWeights]:
    """What the Flower engine computes, in one process: ``absent[r]`` are the peers missing in round ``r``."""
    from shoal.fusion import runner

    sizes = runner.layer_sizes(data.x_train.shape[1], hidden, data.n_classes)
    weights = {p: _f32(runner.init_weights(sizes, seed, p)) for p in range(len(shards))}
    for r in range(1, rounds + 1):
        present = [p for p in range(len(shards)) if p not in (absent or {}).get(r, set())]
        epochs = range((r - 1) * every + 1, r * every + 1)
        received = {
            p: _f32(runner.train_peer(data, shards[p], weights[p], seed, p, epochs, hidden, lr, batch))
            for p in present
        }
        weights.update(fuse_round(topology, len(shards), seed, rate, r, received))
    return weights


def _f32(ws: Sequence[np.ndarray]) -> PeerWeights:
    # Weights travel as float32, the dtype the engines train in.
    return [np.asarray(w, np.float32) for w in ws]


# ---------------------------------------------------------------------------------------------- server


def make_strategy(n_peers: int, topology: str, rate: float, every: int, seed: int, wait_s: float) -> Any:
    """A Flower ``Strategy`` that keeps one model per peer and fuses them with the round's schedule."""
    from flwr.common import (
        FitIns,
        GetPropertiesIns,
        Parameters,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.server.strategy import Strategy

    class FusionStrategy(Strategy):
        def __init__(self) -> None:
            self.weights: dict[int, PeerWeights] = {}  # each peer's last fused weights
            self.peer_of: dict[str, int] = {}  # Flower client id -> peer index
            self.rounds: list[dict[str, Any]] = []

        def _peer(self, client: Any) -> int | None:
            if client.cid not in self.peer_of:
                try:
                    res = client.get_properties(GetPropertiesIns(config={}), timeout=30, group_id=None)
                    self.peer_of[client.cid] = int(res.properties["peer"])
                except Exception:  # a node that cannot say who it is sits the round out
                    return None
            return self.peer_of[client.cid]

        def initialize_parameters(self, client_manager: Any) -> Parameters:
            return Parameters(tensors=[], tensor_type="numpy.ndarray")  # no global model

        def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
            # Give dropped peers a moment to come back, then go on with whoever is there.
            client_manager.wait_for(n_peers, timeout=wait_s)
            config = {"round": server_round, "first_epoch": (server_round - 1) * every + 1, "epochs": every}
            out = []
            for client in client_manager.all().values():
                peer = self._peer(client)
                if peer is None or not 0 <= peer < n_peers:
                    continue
                out.append((client, FitIns(ndarrays_to_parameters(self.weights.get(peer, [])), dict(config))))
            return out

        def aggregate_fit(
            self, server_round: int, results: list[Any], failures: list[Any]
        ) -> tuple[None, dict]:
            received = {
                int(res.metrics["peer"]): _f32(parameters_to_ndarrays(res.parameters)) for _, res in results
            }
            self.weights.update(fuse_round(topology, n_peers, seed, rate, server_round, received))
            self.rounds.append(
                {
                    "round": server_round,
                    "peers": sorted(received),
                    "failures": len(failures),
                    "pairs": round_schedule(topology, n_peers, seed, server_round, set(received)),
                    "local_errors": {
                        int(res.metrics["peer"]): float(res.metrics["error"]) for _, res in results
                    },
                }
            )
            return None, {"peers": len(received)}

        def configure_evaluate(
            self, server_round: int, parameters: Parameters, client_manager: Any
        ) -> list[Any]:
            return []  # peers report their test error with their fit results

        def aggregate_evaluate(
            self, server_round: int, results: list[Any], failures: list[Any]
        ) -> tuple[None, dict]:
            return None, {}

        def evaluate(self, server_round: int, parameters: Parameters) -> None:
            return None  # the server holds no data

    return FusionStrategy()


def run_server(args: argparse.Namespace) -> int:
    import flwr

    strategy = make_strategy(args.peers, args.topology, args.rate, args.every, args.seed, args.wait)
    certs = None
    if args.certs:
        d = Path(args.certs)
        certs = (
            (d / "ca.pem").read_bytes(),
            (d / "server.pem").read_bytes(),
            (d / "server.key").read_bytes(),
        )
    flwr.server.start_server(
        server_address=args.address,
        strategy=strategy,
        config=flwr.server.ServerConfig(num_rounds=args.rounds, round_timeout=args.round_timeout),
        certificates=certs,
    )
    if args.out:
        out = Path(args.out)
        np.savez(out, **{f"peer{p}_{k}": w for p, ws in strategy.weights.items() for k, w in enumerate(ws)})
        out.with_suffix(".json").write_text(json.dumps({"rounds": strategy.rounds}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- node


def make_node(args: argparse.Namespace) -> Any:
    """A Flower ``NumPyClient`` for one peer: its shard, its own weights, local training and test error."""
    import torch
    from flwr.client import NumPyClient

    from shoal.fusion import runner

    torch.set_num_threads(args.threads)
    data = datasets.load(args.dataset)
    # The node derives its own shard; only this peer's rows are ever used here.
    shard = datasets.shard(data.y_train, args.split, args.peers, seed=args.seed, alpha=args.alpha)[args.peer]
    hidden = args.hidden or list(datasets.HIDDEN[args.dataset])
    lr = args.lr if args.lr is not None else datasets.LEARNING_RATE[args.dataset]
    batch = args.batch if args.batch is not None else datasets.BATCH[args.dataset]
    sizes = runner.layer_sizes(data.n_features, hidden, data.n_classes)
    x_test = torch.tensor(data.x_test)
    y_test = torch.tensor(data.y_test)

    class FusionNode(NumPyClient):
        def __init__(self) -> None:
            self.weights = _f32(runner.init_weights(sizes, args.seed, args.peer))

        def get_properties(self, config: dict) -> dict:
            return {"peer": args.peer}

        def get_parameters(self, config: dict) -> list[np.ndarray]:
            return self.weights

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
            if args.crash_in_round == int(config["round"]):
                os._exit(3)  # a site that dies mid-round (for tests of dropping out)
            if parameters:  # the server's fused weights for this peer; none before its first fusion
                self.weights = _f32(parameters)
            first = int(config["first_epoch"])
            epochs = range(first, first + int(config["epochs"]))
            self.weights = _f32(
                runner.train_peer(data, shard, self.weights, args.seed, args.peer, epochs, hidden, lr, batch)
            )
            error = float(runner.BatchedEngine([self.weights], lr).errors(x_test, y_test)[0])
            return self.weights, len(shard), {"peer": args.peer, "error": error}

    return FusionNode()


def run_node(args: argparse.Namespace) -> int:
    import flwr

    root = Path(args.ca).read_bytes() if args.ca else None
    flwr.client.start_client(
        server_address=args.server,
        client=make_node(args).to_client(),
        root_certificates=root,
        insecure=root is None,
        max_retries=args.max_retries,
        max_wait_time=args.max_wait,
    )
    return 0


# ---------------------------------------------------------------------------------------------- TLS


def make_certificates(out: Path, hosts: Sequence[str], days: int = 365) -> None:
    """Write ``ca.pem`` (give it to the nodes), ``server.pem`` and ``server.key`` for the given host names/IPs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal fusion CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = out / "server.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shoal.fusion.flower_app", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="role", required=True)

    s = sub.add_parser("server", help="run the fusion schedule over the peers' weights")
    s.add_argument("--address", default="127.0.0.1:9092", help="host:port to listen on")
    s.add_argument(
        "--certs", help="folder with ca.pem, server.pem, server.key (TLS); omit only for local tests"
    )
    s.add_argument("--peers", type=int, required=True)
    s.add_argument("--rounds", type=int, default=10, help="fusion rounds")
    s.add_argument("--every", type=int, default=1, help="local epochs per round (fusion frequency)")
    s.add_argument("--topology", choices=["ring", "random", "hypercube"], default="ring")
    s.add_argument("--rate", type=float, default=0.55)
    s.add_argument("--seed", type=int, default=0, help="seed of the random topology (same as the nodes')")
    s.add_argument("--wait", type=float, default=30.0, help="seconds to wait for all peers at each round")
    s.add_argument(
        "--round-timeout", type=float, default=600.0, help="seconds before a silent peer is skipped"
    )
    s.add_argument("--out", help="write every peer's final weights here (.npz) and a round log (.json)")

    n = sub.add_parser("node", help="one peer: its shard, its model, local training")
    n.add_argument("--server", default="127.0.0.1:9092", help="server host:port")
    n.add_argument("--ca", help="the server's CA certificate (ca.pem); omit only for local tests")
    n.add_argument("--peer", type=int, required=True, help="this peer's index, 0..peers-1")
    n.add_argument("--peers", type=int, required=True)
    n.add_argument("--dataset", choices=datasets.DATASETS, default="mnist")
    n.add_argument("--split", choices=datasets.SPLITS, default="random")
    n.add_argument("--alpha", type=float, default=0.5)
    n.add_argument("--seed", type=int, default=0, help="initial weights, shards and data order")
    n.add_argument("--hidden", type=int, nargs="+", default=None)
    n.add_argument("--lr", type=float, default=None)
    n.add_argument("--batch", type=int, default=None)
    n.add_argument("--threads", type=int, default=1)
    n.add_argument("--max-retries", type=int, default=None, help="connection attempts before giving up")
    n.add_argument("--max-wait", type=float, default=None, help="seconds of retrying before giving up")
    n.add_argument("--crash-in-round", type=int, default=0, help=argparse.SUPPRESS)

    c = sub.add_parser("certs", help="make a CA and a server certificate for TLS")
    c.add_argument("--out", default="certs")
    c.add_argument(
        "--host", action="append", default=None, help="server name or IP (repeat); default 127.0.0.1"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "server":
        return run_server(args)
    if args.role == "node":
        return run_node(args)
    make_certificates(Path(args.out), args.host or ["127.0.0.1", "localhost"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
