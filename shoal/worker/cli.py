"""``shoal worker``: serve one model version from a model repository through a cluster gateway."""

from __future__ import annotations

import argparse
import sys
from typing import Annotated

from shoal.config import LOG_FORMAT, LOG_LEVEL, LogFormat, LogLevel, Opt, Settings, add_settings

HELP = "Serve one model version: dial a cluster gateway, batch requests, run the model."
EXAMPLE = """
shoal worker --gateway 127.0.0.1:8003 --repo ./models --model mnist-cnn --secret s3cret
shoal worker --gateway gw.example.org:8003 --tls-ca ca.pem --model mnist-cnn --version 2 --device cuda:0
shoal worker --gateway gw-a:8003,gw-b:8003 --model mnist-cnn        # a cluster served by two gateways
"""


class WorkerSettings(Settings, kw_only=True):
    """``shoal worker``: its flags, the keys of its --config file, its SHOAL_WORKER_* variables."""

    COMMAND = "worker"

    gateway: Annotated[
        str,
        Opt(
            "the cluster's gateways' worker port, host:port, or several comma separated; a name that "
            "resolves to several addresses names a gateway at each, and the gateways reached name the "
            "others: the worker links to every one (default %(default)s)"
        ),
    ] = "127.0.0.1:8003"
    repo: Annotated[
        str | None,
        Opt("model repository folder (default: the models bundled with shoal)", env=("SHOAL_MODEL_REPO",)),
    ] = None
    model: Annotated[str, Opt("model name (a folder of the repository)")]
    version: Annotated[str | None, Opt("model version (default: the newest in the repository)")] = None
    secret: Annotated[
        str | None,
        Opt("cluster secret (default: $SHOAL_CLUSTER_SECRET)", secret=True, env=("SHOAL_CLUSTER_SECRET",)),
    ] = None
    device: Annotated[
        str,
        Opt(
            "cpu, cuda, cuda:N or auto (CUDA when there is one); a device not here is refused "
            "(default %(default)s)"
        ),
    ] = "cpu"
    capacity: Annotated[
        int, Opt("requests this worker may hold, running plus queued (default: 2 x max batch)")
    ] = 0
    threads: Annotated[int, Opt("framework threads for one batch (default %(default)s)")] = 1
    max_batch_size: Annotated[int | None, Opt("override the manifest's max batch size")] = None
    batch_delay_ms: Annotated[float | None, Opt("override the manifest's batch delay")] = None
    worker_id: Annotated[str, Opt("name shown in status and metrics (default host-pid-model-version)")] = ""
    tls: Annotated[bool, Opt("TLS to the gateway, verified with the system CAs")] = False
    tls_ca: Annotated[str | None, Opt("TLS to the gateway, verified with this CA file")] = None
    tls_server_name: Annotated[str | None, Opt("expected name in the gateway's certificate")] = None
    drain_timeout: Annotated[float, Opt("seconds SIGTERM waits for held requests")] = 30.0
    health: Annotated[
        str | None,
        Opt(
            "serve GET /live and /ready here for an orchestrator's probes (default: off)", metavar="HOST:PORT"
        ),
    ] = None
    max_frame_mb: Annotated[
        float,
        Opt(
            "largest request this worker accepts from the gateway, in MB; told to the gateway, which "
            "answers larger requests 413 itself (default %(default)s)"
        ),
    ] = 64.0
    log_level: Annotated[LogLevel, LOG_LEVEL] = "info"
    log_format: Annotated[LogFormat, LOG_FORMAT] = "text"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_settings(p, WorkerSettings)


def bundled_repo() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent / "bundled" / "models")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from shoal.aio import run as aio_run
    from shoal.aio import setup_logging, split_hostport
    from shoal.modelrepo.manifest import ManifestError, resolve
    from shoal.runtime.runtimes import RuntimeError_, load_runtime
    from shoal.worker.link import Worker, WorkerConfig

    setup_logging(args.log_level, "worker", args.log_format)
    secret = args.secret or ""
    if not secret:
        print("shoal worker: no cluster secret; pass --secret or set SHOAL_CLUSTER_SECRET", file=sys.stderr)
        return 2
    repo = args.repo or bundled_repo()
    try:
        model_dir, manifest = resolve(repo, args.model, args.version)
        if args.max_batch_size is not None:
            manifest = dataclasses.replace(manifest, max_batch_size=args.max_batch_size)
        if args.batch_delay_ms is not None:
            manifest = dataclasses.replace(manifest, batch_delay_ms=args.batch_delay_ms)
        runtime = load_runtime(Path(model_dir), manifest, args.device, args.threads)
    except (ManifestError, RuntimeError_, ValueError) as e:
        print(f"shoal worker: {e}", file=sys.stderr)
        return 2
    gateways = [g.strip() for g in args.gateway.split(",") if g.strip()]
    try:
        for g in gateways:
            split_hostport(g, 8003)
    except ValueError as e:
        print(f"shoal worker: --gateway: {e}", file=sys.stderr)
        return 2
    if not gateways:
        print("shoal worker: --gateway names no gateway", file=sys.stderr)
        return 2
    cfg = WorkerConfig(
        gateways=gateways,
        secret=secret.encode(),
        worker_id=args.worker_id,
        device=runtime.device,  # what it resolved to ("auto" -> cpu or cuda:0)
        capacity=args.capacity,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_server_name=args.tls_server_name,
        drain_timeout_s=args.drain_timeout,
        max_frame_size=int(args.max_frame_mb * 1024 * 1024),
        health=split_hostport(args.health, 8002) if args.health else None,
    )

    async def main() -> int:
        return await Worker(cfg, Path(model_dir), manifest, runtime).run()

    return aio_run(main())
