"""``shoal worker``: serve one model version from a model repository through a cluster gateway."""

from __future__ import annotations

import argparse
import os

from shoal.aio import add_logging_arguments
from shoal.config import add_config_arguments

HELP = "Serve one model version: dial a cluster gateway, batch requests, run the model."
EXAMPLE = """
shoal worker --gateway 127.0.0.1:8001 --repo ./models --model mnist-cnn --secret s3cret
shoal worker --gateway gw.example.org:8001 --tls-ca ca.pem --model mnist-cnn --version 2 --device cuda:0
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument(
        "--gateway", default="127.0.0.1:8001", help="gateway worker port, host:port (default %(default)s)"
    )
    p.add_argument(
        "--repo", default=None, help="model repository folder (default: the models bundled with shoal)"
    )
    p.add_argument("--model", required=True, help="model name (a folder of the repository)")
    p.add_argument("--version", default=None, help="model version (default: the newest in the repository)")
    p.add_argument("--secret", default=None, help="cluster secret (default: $SHOAL_CLUSTER_SECRET)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, cuda:N or auto (CUDA when there is one); a device not here is refused (default %(default)s)",
    )
    p.add_argument(
        "--capacity",
        type=int,
        default=0,
        help="requests this worker may hold, running plus queued (default: 2 x max batch)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="framework threads for one batch (default %(default)s)"
    )
    p.add_argument("--max-batch-size", type=int, default=None, help="override the manifest's max batch size")
    p.add_argument("--batch-delay-ms", type=float, default=None, help="override the manifest's batch delay")
    p.add_argument(
        "--worker-id", default="", help="name shown in status and metrics (default host-pid-model-version)"
    )
    p.add_argument("--tls", action="store_true", help="TLS to the gateway, verified with the system CAs")
    p.add_argument("--tls-ca", default=None, help="TLS to the gateway, verified with this CA file")
    p.add_argument("--tls-server-name", default=None, help="expected name in the gateway's certificate")
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for held requests"
    )
    p.add_argument(
        "--health",
        default=None,
        metavar="HOST:PORT",
        help="serve GET /live and /ready here for an orchestrator's probes (default: off)",
    )
    p.add_argument(
        "--max-frame-mb",
        type=float,
        default=64.0,
        help="largest request this worker accepts from the gateway, in MB; told to the gateway, which "
        "answers larger requests 413 itself (default %(default)s)",
    )
    add_logging_arguments(p)


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
    secret = args.secret or os.environ.get("SHOAL_CLUSTER_SECRET", "")
    if not secret:
        print("shoal worker: no cluster secret; pass --secret or set SHOAL_CLUSTER_SECRET")
        return 2
    repo = args.repo or os.environ.get("SHOAL_MODEL_REPO") or bundled_repo()
    try:
        model_dir, manifest = resolve(repo, args.model, args.version)
        if args.max_batch_size is not None:
            manifest = dataclasses.replace(manifest, max_batch_size=args.max_batch_size)
        if args.batch_delay_ms is not None:
            manifest = dataclasses.replace(manifest, batch_delay_ms=args.batch_delay_ms)
        runtime = load_runtime(Path(model_dir), manifest, args.device, args.threads)
    except (ManifestError, RuntimeError_, ValueError) as e:
        print(f"shoal worker: {e}")
        return 2
    host, port = split_hostport(args.gateway, 8001)
    cfg = WorkerConfig(
        gateway_host=host,
        gateway_port=port,
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
