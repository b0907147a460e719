"""``shoal cluster``: run a cluster gateway (the site's only public face)."""

from __future__ import annotations

import argparse
import sys
from typing import Annotated, Any

from shoal.config import LOG_FORMAT, LOG_LEVEL, LogFormat, LogLevel, Opt, Settings, add_settings

HELP = "Run a cluster gateway: devices over HTTP (Open Inference Protocol), workers dial in."
EXAMPLE = """
SHOAL_CLUSTER_SECRET=s3cret SHOAL_API_KEYS=operator:opkey,scrape:promkey shoal cluster --http 0.0.0.0:8000 --grpc 0.0.0.0:8001 --workers 0.0.0.0:8003
SHOAL_CENTRAL_PASSWORD=pw shoal cluster --name site-a --central https://central:7000 --public-url https://gw-a:8000 ...
curl -H 'Authorization: Bearer opkey' localhost:8000/v2/health/ready

Workers started and stopped by load (gw.yaml, then shoal cluster --config gw.yaml):
  autoscale:
    engine: local            # local | ray | kubernetes
    models:
      mnist-cnn: {min: 1, max: 4, target_utilisation: 0.7}
      echo: {min: 0, max: 2, idle_to_zero_s: 60}     # sleeps when idle, woken by a request
"""


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


class ClusterSettings(Settings, kw_only=True):
    """``shoal cluster``: its flags, the keys of its --config file, its SHOAL_CLUSTER_* variables."""

    COMMAND = "cluster"

    name: Annotated[str, Opt("cluster name (the audience of route tokens)")] = "cluster"
    http: Annotated[str, Opt("HTTP address for devices (default %(default)s)")] = "127.0.0.1:8000"
    grpc: Annotated[
        str,
        Opt(
            "gRPC address for devices (the Open Inference Protocol's GRPCInferenceService, as "
            "tritonclient.grpc speaks it; needs shoal[grpc]); none: no gRPC (default %(default)s)"
        ),
    ] = "127.0.0.1:8001"
    workers: Annotated[
        str,
        Opt(
            "address workers dial, the worker link (default %(default)s; it was 8001 before gRPC took "
            "Triton's port)"
        ),
    ] = "127.0.0.1:8003"
    gateway_id: Annotated[
        str | None,
        Opt("this gateway's name among its cluster's gateways (default: host:worker-port)"),
    ] = None
    advertise_workers: Annotated[
        str | None,
        Opt(
            "host:port where workers and the cluster's other gateways reach this gateway's worker port "
            "(default: --workers, a wildcard host replaced by this host's name)"
        ),
    ] = None
    peer: Annotated[
        list[str],
        Opt(
            "another gateway of this cluster, as host:port of its worker port (repeatable; also "
            "$SHOAL_CLUSTER_PEERS, comma separated); a name resolving to several addresses names them "
            "all. Workers are told of every gateway and link to each",
            env=("SHOAL_CLUSTER_PEERS",),
        ),
    ] = []
    processes: Annotated[
        int,
        Opt(
            "run this many gateway processes on this machine: one HTTP port shared (SO_REUSEPORT), "
            "worker ports from --workers up, each process a gateway of the cluster (default %(default)s)"
        ),
    ] = 1
    reuse_port: Annotated[
        bool,
        Opt(
            "share the HTTP port with other processes bound the same way (SO_REUSEPORT), as "
            "--processes runs its gateways"
        ),
    ] = False
    secret: Annotated[str | None, Opt("worker secret (default: $SHOAL_CLUSTER_SECRET)", secret=True)] = None
    api_key: Annotated[
        list[str],
        Opt(
            "static bearer key with its role: operator:KEY, scrape:KEY (metrics only) or "
            "device:MODEL[+MODEL...]:KEY (repeatable; also $SHOAL_API_KEYS, comma separated)",
            secret=True,
            env=("SHOAL_API_KEYS",),
        ),
    ] = []
    token_key: Annotated[
        str | None,
        Opt(
            "key shared with central to verify route tokens (default: $SHOAL_TOKEN_KEY)",
            secret=True,
            env=("SHOAL_TOKEN_KEY",),
        ),
    ] = None
    no_auth: Annotated[bool, Opt("accept requests without credentials (local development only)")] = False
    tls_cert: Annotated[str | None, Opt("certificate (PEM) for HTTP and the worker port")] = None
    tls_key: Annotated[str | None, Opt("private key (PEM) for --tls-cert")] = None
    max_body_mb: Annotated[float, Opt("largest request body (default %(default)s MB)")] = 64.0
    max_frame_mb: Annotated[
        float, Opt("largest result a worker may send back, in MB (default %(default)s)")
    ] = 64.0
    max_queue: Annotated[int, Opt("requests per model waiting for a worker before 503")] = 1024
    quota: Annotated[
        list[str],
        Opt(
            "rate limit on inference per credential: WHO=RATE[/BURST], WHO a role (device, operator) or "
            "an account (device:NAME, key:HASH as logged), RATE requests a second, BURST at once "
            "(repeatable; also $SHOAL_CLUSTER_QUOTAS, comma separated); over it: 429 with Retry-After",
            env=("SHOAL_CLUSTER_QUOTAS",),
        ),
    ] = []
    trace_endpoint: Annotated[
        str | None,
        Opt(
            "send traces of inference requests to this OTLP/HTTP endpoint (e.g. "
            "http://collector:4318/v1/traces; needs shoal[trace]); default: no tracing"
        ),
    ] = None
    trace_ratio: Annotated[
        float,
        Opt(
            "share of requests traced among those that come without a traceparent (those that come "
            "with one follow the device's choice); default %(default)s"
        ),
    ] = 1.0
    priority_levels: Annotated[
        int,
        Opt(
            "priority levels of the queues (a request's 'priority' parameter: 1 the highest); "
            "default %(default)s"
        ),
    ] = 2
    default_priority: Annotated[
        int,
        Opt(
            "the level of a request that names none (default %(default)s; per model in the file's "
            "priorities block)"
        ),
    ] = 2
    read_timeout: Annotated[float, Opt("seconds a client has to send one whole request (408 after)")] = 30.0
    timeout: Annotated[float, Opt("request deadline in seconds")] = 30.0
    drain_timeout: Annotated[
        float, Opt("on stop, seconds requests in flight get to finish before they are answered 503")
    ] = 10.0
    dead_after: Annotated[
        float,
        Opt(
            "seconds of silence after which a worker is dead and its requests go to others (default %(default)s)"
        ),
    ] = 5.0
    unserved_wait: Annotated[
        float,
        Opt(
            "seconds queued requests wait for a model that has no live worker (one restarting) before "
            "503 (default %(default)s)"
        ),
    ] = 3.0
    central: Annotated[
        list[str], Opt("central server URL to report to every second (repeatable, one per replica)")
    ] = []
    central_password: Annotated[
        str | None,
        Opt(
            "this cluster's central account password (default: $SHOAL_CENTRAL_PASSWORD); the account "
            "name is --name",
            secret=True,
            env=("SHOAL_CENTRAL_PASSWORD",),
        ),
    ] = None
    central_ca: Annotated[str | None, Opt("CA file to verify central's certificate")] = None
    public_url: Annotated[
        str | None,
        Opt("address devices reach this gateway at, as told to central (default: the --http address)"),
    ] = None
    store_results: Annotated[
        str | None,
        Opt(
            "store every request's inputs and outputs: metadata in this database (sqlite:///results.db, "
            "postgresql://user@host/db; password in $PGPASSWORD), tensors as files in --results-dir "
            "(default: off)",
            metavar="DB_URL",
        ),
    ] = None
    results_dir: Annotated[str, Opt("folder for stored tensors (default %(default)s)")] = "shoal-results"
    results_max_age: Annotated[
        float | None,
        Opt(
            "delete stored results older than this: seconds, or 30m, 12h, 7d (default: keep)", parse=duration
        ),
    ] = None
    results_max_mb: Annotated[
        float | None,
        Opt("keep stored results' files under this many MB, deleting the oldest (default: no limit)"),
    ] = None
    state_dir: Annotated[
        str | None,
        Opt(
            "folder where the gateway keeps central's route-token key across restarts "
            "(default: $XDG_STATE_HOME/shoal or ~/.local/state/shoal; 'none' keeps nothing)"
        ),
    ] = None
    startup_grace: Annotated[
        float,
        Opt(
            "seconds after start during which an unknown model is 503 'try again' (its workers are "
            "rejoining), not 404 (default %(default)s)"
        ),
    ] = 10.0
    ports_file: Annotated[str | None, Opt("write the bound ports as JSON here (useful with port 0)")] = None
    log_level: Annotated[LogLevel, LOG_LEVEL] = "info"
    log_format: Annotated[LogFormat, LOG_FORMAT] = "text"
    # Blocks with no flag: file only, each checked by its own parser when the gateway starts.
    pipelines: Annotated[Any, Opt("pipeline declarations", flag=False, environment=False)] = None
    versions: Annotated[
        Any,
        Opt(
            "per model: {policy: all}, {policy: latest, n: N} or {policy: specific, versions: [...]}",
            flag=False,
            environment=False,
        ),
    ] = None
    autoscale: Annotated[
        Any, Opt("the scaling engine and each model's policy", flag=False, environment=False)
    ] = None
    priorities: Annotated[
        Any,
        Opt("per model: the priority level of its requests that name none", flag=False, environment=False),
    ] = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_settings(p, ClusterSettings)


def check(args: argparse.Namespace) -> str | None:
    """The file's blocks (pipelines, versions, autoscale) hold together: checked before --print-config
    shows them as the settings in force."""
    from shoal.autoscale.config import AutoscaleError, parse_autoscale
    from shoal.gateway.pipeline import PipelineError, parse_pipelines
    from shoal.gateway.policy import parse_version_policy

    try:
        parse_pipelines(args.pipelines)
        versions_block = args.versions or {}
        if not isinstance(versions_block, dict):
            raise PipelineError("versions: must map model names to version policies")
        for m, d in versions_block.items():
            parse_version_policy(d, f"versions.{m}")
        if args.autoscale is not None:
            parse_autoscale(args.autoscale)
    except (PipelineError, AutoscaleError, ValueError) as e:
        return f"{args.config}: {e}" if args.config else str(e)
    return None


def run(args: argparse.Namespace) -> int:
    from shoal.aio import run as aio_run
    from shoal.aio import setup_logging, split_hostport
    from shoal.autoscale.config import AutoscaleError, parse_autoscale
    from shoal.gateway.central_link import CentralConfig
    from shoal.gateway.pipeline import PipelineError, parse_pipelines
    from shoal.gateway.policy import parse_priorities, parse_version_policy
    from shoal.gateway.pool import Priorities
    from shoal.gateway.quotas import parse_quota
    from shoal.gateway.server import Gateway, GatewayConfig
    from shoal.gateway.state import default_state_dir
    from shoal.httpserver import wait_for_stop_signal, write_ports_file

    setup_logging(args.log_level, "cluster", args.log_format)
    if args.processes > 1:
        from shoal.gateway.processes import run_processes

        return run_processes(args)
    if args.processes < 1:
        print("shoal cluster: --processes must be at least 1", file=sys.stderr)
        return 2
    secret = args.secret or ""
    keys = list(args.api_key)
    token_key = args.token_key or None
    central = None
    if args.central:
        pw = args.central_password or ""
        if not pw:
            print(
                "shoal cluster: --central needs this cluster's password: --central-password or SHOAL_CENTRAL_PASSWORD",
                file=sys.stderr,
            )
            return 2
        central = CentralConfig(
            urls=args.central,
            user=args.name,
            password=pw,
            public_url=args.public_url or "",
            ca_file=args.central_ca,
        )
    try:
        pipelines = parse_pipelines(args.pipelines)
        versions_block = args.versions or {}
        if not isinstance(versions_block, dict):
            raise PipelineError("versions: must map model names to version policies")
        policies = {str(m): parse_version_policy(d, f"versions.{m}") for m, d in versions_block.items()}
        autoscale = parse_autoscale(args.autoscale) if args.autoscale is not None else None
        levels, default, per_model = parse_priorities(args.priority_levels, args.default_priority, args.priorities)
        quotas = dict(parse_quota(q.strip()) for entry in args.quota for q in entry.split(",") if q.strip())
    except (PipelineError, AutoscaleError, ValueError) as e:
        print(f"shoal cluster: {args.config}: {e}", file=sys.stderr)
        return 2
    hh, hp = split_hostport(args.http, 8000)
    wh, wp = split_hostport(args.workers, 8003)
    from shoal.gateway.processes import grpc_address

    gh, gp = grpc_address(args.grpc)
    cfg = GatewayConfig(
        name=args.name,
        http_host=hh,
        http_port=hp,
        worker_host=wh,
        worker_port=wp,
        grpc_host=gh,
        grpc_port=gp,
        gateway_id=args.gateway_id or "",
        reuse_port=args.reuse_port,
        advertise_workers=args.advertise_workers or "",
        peers=[p.strip() for entry in args.peer for p in entry.split(",") if p.strip()],
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
        drain_timeout_s=args.drain_timeout,
        dead_after_s=args.dead_after,
        unserved_wait_s=args.unserved_wait,
        read_timeout_s=args.read_timeout,
        central=central,
        pipelines=pipelines,
        version_policies=policies,
        priorities=Priorities(levels, default, per_model),
        quotas=quotas,
        trace_endpoint=args.trace_endpoint,
        trace_ratio=args.trace_ratio,
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
        print(f"shoal cluster: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        from shoal.autoscale.engine import EngineError

        try:
            await gw.start()
        except (EngineError, OSError) as e:  # the engine cannot reach its workers; a port is taken
            print(f"shoal cluster: {e}", file=sys.stderr)
            await gw.stop()
            return 2
        write_ports_file(
            args.ports_file, {"http": gw.http_port, "workers": gw.worker_port, "grpc": gw.grpc_port}
        )
        await wait_for_stop_signal()
        await gw.stop()
        return 0

    return aio_run(main())
