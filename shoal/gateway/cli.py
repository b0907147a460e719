"""``shoal cluster``: run a cluster gateway (the site's only public face)."""

from __future__ import annotations

import argparse
import os

from shoal.aio import add_logging_arguments
from shoal.config import add_config_arguments

HELP = "Run a cluster gateway: devices over HTTP (Open Inference Protocol), workers dial in."
EXAMPLE = """
SHOAL_CLUSTER_SECRET=s3cret SHOAL_API_KEYS=operator:opkey,scrape:promkey shoal cluster --http 0.0.0.0:8000 --workers 0.0.0.0:8001
SHOAL_CENTRAL_PASSWORD=pw shoal cluster --name site-a --central https://central:7000 --public-url https://gw-a:8000 ...
curl -H 'Authorization: Bearer opkey' localhost:8000/v2/health/ready

Workers started and stopped by load (gw.yaml, then shoal cluster --config gw.yaml):
  autoscale:
    engine: local            # local | ray | kubernetes
    models:
      mnist-cnn: {min: 1, max: 4, target_utilisation: 0.7}
      echo: {min: 0, max: 2, idle_to_zero_s: 60}     # sleeps when idle, woken by a request
"""


CONFIG_BLOCKS = ("pipelines", "versions", "autoscale")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--name", default="cluster", help="cluster name (the audience of route tokens)")
    p.add_argument("--http", default="127.0.0.1:8000", help="HTTP address for devices (default %(default)s)")
    p.add_argument("--workers", default="127.0.0.1:8001", help="address workers dial (default %(default)s)")
    p.add_argument("--secret", default=None, help="worker secret (default: $SHOAL_CLUSTER_SECRET)")
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="static bearer key with its role: operator:KEY, scrape:KEY (metrics only) or "
        "device:MODEL[+MODEL...]:KEY (repeatable; also $SHOAL_API_KEYS, comma separated)",
    )
    p.add_argument(
        "--token-key",
        default=None,
        help="key shared with central to verify route tokens (default: $SHOAL_TOKEN_KEY)",
    )
    p.add_argument(
        "--no-auth", action="store_true", help="accept requests without credentials (local development only)"
    )
    p.add_argument("--tls-cert", default=None, help="certificate (PEM) for HTTP and the worker port")
    p.add_argument("--tls-key", default=None, help="private key (PEM) for --tls-cert")
    p.add_argument(
        "--max-body-mb", type=float, default=64.0, help="largest request body (default %(default)s MB)"
    )
    p.add_argument(
        "--max-frame-mb",
        type=float,
        default=64.0,
        help="largest result a worker may send back, in MB (default %(default)s)",
    )
    p.add_argument(
        "--max-queue", type=int, default=1024, help="requests per model waiting for a worker before 503"
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send one whole request (408 after)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="request deadline in seconds")
    p.add_argument(
        "--central",
        action="append",
        default=[],
        help="central server URL to report to every second (repeatable, one per replica)",
    )
    p.add_argument(
        "--central-password",
        default=None,
        help="this cluster's central account password (default: $SHOAL_CENTRAL_PASSWORD); the account name is --name",
    )
    p.add_argument("--central-ca", default=None, help="CA file to verify central's certificate")
    p.add_argument(
        "--public-url",
        default=None,
        help="address devices reach this gateway at, as told to central (default: the --http address)",
    )
    p.add_argument(
        "--store-results",
        default=None,
        metavar="DB_URL",
        help="store every request's inputs and outputs: metadata in this database (sqlite:///results.db, "
        "postgresql://user@host/db; password in $PGPASSWORD), tensors as files in --results-dir (default: off)",
    )
    p.add_argument(
        "--results-dir", default="shoal-results", help="folder for stored tensors (default %(default)s)"
    )
    p.add_argument(
        "--results-max-age",
        type=duration,
        default=None,
        help="delete stored results older than this: seconds, or 30m, 12h, 7d (default: keep)",
    )
    p.add_argument(
        "--results-max-mb",
        type=float,
        default=None,
        help="keep stored results' files under this many MB, deleting the oldest (default: no limit)",
    )
    p.add_argument(
        "--state-dir",
        default=None,
        help="folder where the gateway keeps central's route-token key across restarts "
        "(default: $XDG_STATE_HOME/shoal or ~/.local/state/shoal; 'none' keeps nothing)",
    )
    p.add_argument(
        "--startup-grace",
        type=float,
        default=10.0,
        help="seconds after start during which an unknown model is 503 'try again' (its workers are "
        "rejoining), not 404 (default %(default)s)",
    )
    p.add_argument(
        "--ports-file", default=None, help="write the bound ports as JSON here (useful with port 0)"
    )
    add_logging_arguments(p)


def duration(value: str | float) -> float:
    """Seconds from a number or a number with a unit: 90, 90s, 30m, 12h, 7d."""
    if isinstance(value, (int, float)):
        return float(value)
    v = value.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(v[-1:])
    try:
        return float(v[:-1]) * scale if scale else float(v)
    except ValueError:
        raise ValueError(f"not a duration: {value!r} (e.g. 3600, 30m, 12h, 7d)") from None


def run(args: argparse.Namespace) -> int:
    from shoal.aio import run as aio_run
    from shoal.aio import setup_logging, split_hostport
    from shoal.autoscale.config import AutoscaleError, parse_autoscale
    from shoal.gateway.central_link import CentralConfig
    from shoal.gateway.pipeline import PipelineError, parse_pipelines
    from shoal.gateway.policy import parse_version_policy
    from shoal.gateway.server import Gateway, GatewayConfig
    from shoal.gateway.state import default_state_dir
    from shoal.httpserver import wait_for_stop_signal, write_ports_file

    setup_logging(args.log_level, "cluster", args.log_format)
    secret = args.secret or os.environ.get("SHOAL_CLUSTER_SECRET", "")
    keys = list(args.api_key) + [k for k in os.environ.get("SHOAL_API_KEYS", "").split(",") if k]
    token_key = args.token_key or os.environ.get("SHOAL_TOKEN_KEY") or None
    central = None
    if args.central:
        pw = args.central_password or os.environ.get("SHOAL_CENTRAL_PASSWORD", "")
        if not pw:
            print(
                "shoal cluster: --central needs this cluster's password: --central-password or SHOAL_CENTRAL_PASSWORD"
            )
            return 2
        central = CentralConfig(
            urls=args.central,
            user=args.name,
            password=pw,
            public_url=args.public_url or "",
            ca_file=args.central_ca,
        )
    blocks = getattr(args, "_blocks", {})
    try:
        pipelines = parse_pipelines(blocks.get("pipelines"))
        versions_block = blocks.get("versions") or {}
        if not isinstance(versions_block, dict):
            raise PipelineError("versions: must map model names to version policies")
        policies = {str(m): parse_version_policy(d, f"versions.{m}") for m, d in versions_block.items()}
        autoscale = parse_autoscale(blocks["autoscale"]) if "autoscale" in blocks else None
    except (PipelineError, AutoscaleError, ValueError) as e:
        print(f"shoal cluster: {args.config}: {e}")
        return 2
    hh, hp = split_hostport(args.http, 8000)
    wh, wp = split_hostport(args.workers, 8001)
    cfg = GatewayConfig(
        name=args.name,
        http_host=hh,
        http_port=hp,
        worker_host=wh,
        worker_port=wp,
        secret=secret.encode(),
        api_keys=keys,
        token_key=token_key.encode() if token_key else None,
        no_auth=args.no_auth,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_body_size=int(args.max_body_mb * 1024 * 1024),
        max_frame_size=int(args.max_frame_mb * 1024 * 1024),
        max_queue=args.max_queue,
        request_timeout_s=args.timeout,
        read_timeout_s=args.read_timeout,
        central=central,
        pipelines=pipelines,
        version_policies=policies,
        results_db=args.store_results,
        results_dir=args.results_dir,
        results_max_age_s=args.results_max_age,
        results_max_bytes=int(args.results_max_mb * 1024 * 1024) if args.results_max_mb is not None else None,
        state_dir=None if args.state_dir == "none" else (args.state_dir or default_state_dir()),
        startup_grace_s=args.startup_grace,
        autoscale=autoscale,
    )
    try:
        gw = Gateway(cfg)
    except ValueError as e:
        print(f"shoal cluster: {e}")
        return 2

    async def main() -> int:
        from shoal.autoscale.engine import EngineError

        try:
            await gw.start()
        except EngineError as e:  # the engine cannot reach where workers run (a Ray cluster)
            print(f"shoal cluster: {e}")
            await gw.stop()
            return 2
        write_ports_file(args.ports_file, {"http": gw.http_port, "workers": gw.worker_port})
        await wait_for_stop_signal()
        await gw.stop()
        return 0

    return aio_run(main())
