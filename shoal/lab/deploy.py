"""A small distributed deployment on the lab's machines: central on a machine of its own (or several
replicas, each on its own machine, sharing a PostgreSQL server on the ``db`` machine), the gateways
of a cluster each on its own machine (every one reporting to central, advertising its own address to
workers and devices), and echo workers each on its own machine, told of the first gateway only (they
learn the others from it: PEERS). With a ``wan`` machine, the site (the gateways, the devices)
reaches central through the WAN relay on it: one port a replica. Other sites (``SiteSpec``) are
clusters of their own, each serving a model of its own, reaching central through a WAN of their own.
"""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.bench.gateways import _wait_gateways_serving
from shoal.lab.observe import LabCentral, LabGateway, Observer
from shoal.lab.pg import LabPostgres
from shoal.lab.procs import Processes, wait_ports
from shoal.lab.world import World
from shoal.local import Child

CENTRAL_PORT = 7000
HTTP_PORT = 8000
GRPC_PORT = 8001
WORKER_PORT = 8003
WAN_PORT = 7100  # + the replica's number: central-1 through the WAN at 7101
MODEL = "echo"


@dataclass
class SiteSpec:
    """Another cluster at a site of its own, serving a model of its own."""

    cluster: str
    gateways: list[str]
    workers: list[str]
    model: str
    repo: Path | None = None  # its workers' model repository (None: the bundled models)
    wan: str | None = None  # the machine of its own WAN relay to central (its profile on throughout)
    wan_mbit: float | None = None  # that link's bandwidth each way (tbf)


@dataclass
class Deployment:
    cluster: str
    central: LabCentral  # the first replica
    centrals: dict[str, LabCentral]  # machine -> replica
    site_centrals: list[str]  # central's URLs as the site reaches them (through the WAN if any)
    gateways: dict[str, LabGateway]  # machine -> gateway (its id is the machine's name)
    workers: dict[str, Child]  # machine -> worker (its id is the machine's name)
    devices: dict[str, str] = field(default_factory=dict)  # device account -> password (one for all)
    secret: str = ""  # the cluster's secret, for workers started later
    model: str = MODEL  # what its workers serve
    repo: Path | None = None  # their model repository (None: the bundled models)
    sites: dict[str, Deployment] = field(default_factory=dict)  # other clusters, by name

    def worker_args(self, name: str, *extra: str) -> list[str]:
        """``shoal worker``'s arguments for a worker on machine ``name`` (told of the first gateway,
        as every worker of the lab), with ``SHOAL_CLUSTER_SECRET`` from ``secret``; ``extra`` last."""
        first = next(iter(self.gateways.values()))
        repo = ["--repo", str(self.repo)] if self.repo is not None else []
        args = ["worker", "--gateway", f"{first.host}:{WORKER_PORT}", "--model", self.model, "--worker-id", name]
        return [*args, *repo, *extra]

    def gateway_of(self, url: str) -> str:
        """The machine of the gateway at ``url`` (as the client reports who answered)."""
        return next((m for m, g in self.gateways.items() if url.rstrip("/") == g.url), url)


def deploy(
    world: World,
    procs: Processes,
    observer: Observer,
    workdir: Path,
    gateways: list[str],
    workers: list[str],
    devices: list[str],
    centrals: list[str] | None = None,
    pg: LabPostgres | None = None,
    wan: str | None = None,
    cluster: str = "site",
    report_interval: float = 0.5,
    timeout: float = 90.0,
    sites: list[SiteSpec] | None = None,
) -> Deployment:
    """Start everything on machines already in ``world`` (``centrals``, default ``central``; the
    ``db`` machine when ``pg`` is given; ``wan``; ``gateways``, ``workers``; each of ``sites``), give
    the clusters and ``devices`` accounts, and wait until every gateway holds its cluster's workers
    and every replica routes each model to the cluster serving it, whose gateways all report."""
    m = world.machines
    names = centrals or ["central"]
    db = None
    if pg is not None:
        pg.init()
        procs.spawn("db", "db", pg.argv(), user="postgres")
        pg.create_database(timeout)
        db = pg.url
    reps: dict[str, LabCentral] = {}
    operator_password = secrets.token_hex(16)
    for name in names:  # one after the other: the first migrates the database
        cdir = workdir / name
        cdir.mkdir(parents=True, exist_ok=True)
        central = LabCentral(
            cdir, name=name, host=m[name].address, http_port=CENTRAL_PORT, operator_password=operator_password
        )
        child = procs.shoal(
            name,
            name,
            [
                "central",
                "--http",
                f"{central.host}:{CENTRAL_PORT}",
                "--db",
                db or f"sqlite:///{cdir / 'central.db'}",
                "--ports-file",
                str(cdir / "ports.json"),
                "--bootstrap-operator",
                central.operator,
                "--report-interval",
                str(report_interval),
            ],
            {"SHOAL_OPERATOR_PASSWORD": central.operator_password},
        )
        central.proc = child
        wait_ports(child, cdir / "ports.json", timeout)
        reps[name] = central
    central = reps[names[0]]
    site = [c.url for c in reps.values()]
    if wan is not None:
        site = start_wan(world, procs, workdir, wan, list(reps.values()), timeout)
    accounts = dict.fromkeys(devices, secrets.token_hex(8))  # one password: one driver runs them all
    for d, pw in accounts.items():
        observer.call(central.add_account, "device", d, pw)
    dep = start_cluster(world, procs, observer, workdir, central, site, cluster, gateways, workers, timeout)
    dep.centrals = reps
    for c in reps.values():
        observer.call(c.wait_routable, {cluster}, MODEL, timeout)
        observer.call(_wait_gateways_serving, c, cluster, len(gateways), timeout)
    dep.devices = accounts
    for spec in sites or []:
        urls = [c.url for c in reps.values()]
        if spec.wan is not None:
            urls = start_wan(world, procs, workdir, spec.wan, list(reps.values()), timeout, on=True)
            if spec.wan_mbit:
                world.set_rate(spec.wan, spec.wan_mbit)
        other = start_cluster(
            world, procs, observer, workdir, central, urls, spec.cluster, spec.gateways, spec.workers,
            timeout, spec.model, spec.repo,
        )  # fmt: skip
        other.centrals = reps
        for c in reps.values():
            observer.call(c.wait_routable, {spec.cluster}, spec.model, timeout)
            observer.call(_wait_gateways_serving, c, spec.cluster, len(spec.gateways), timeout)
        dep.sites[spec.cluster] = other
    return dep


def start_wan(
    world: World, procs: Processes, workdir: Path, wan: str, reps: list[LabCentral], timeout: float, on: bool = False
) -> list[str]:
    """The WAN relay on machine ``wan``, one port a replica (``on``: its profile from the start);
    central's URLs through it."""
    w = world.machines[wan].address
    routes = [f"--route={w}:{WAN_PORT + i}={c.host}:{CENTRAL_PORT}" for i, c in enumerate(reps, 1)]
    ready = workdir / f"{wan}.ready"
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "shoal.lab.wan", *routes, "--ready", str(ready), *(["--on"] if on else [])]
    child = procs.spawn(wan, wan, argv)
    end = time.monotonic() + timeout
    while not ready.exists():
        if not child.alive() or time.monotonic() > end:
            raise RuntimeError(f"the WAN relay did not start:\n{child.tail()}")
        time.sleep(0.05)
    return [f"http://{w}:{WAN_PORT + i}" for i in range(1, len(reps) + 1)]


def start_cluster(
    world: World,
    procs: Processes,
    observer: Observer,
    workdir: Path,
    central: LabCentral,
    site: list[str],
    cluster: str,
    gateways: list[str],
    workers: list[str],
    timeout: float,
    model: str = MODEL,
    repo: Path | None = None,
) -> Deployment:
    """One cluster: its account at central, its gateways (each on its machine, reporting to
    ``site``, central's URLs as the site reaches them), its workers of ``model`` (from ``repo``,
    default the bundled models); returns once every gateway holds every worker."""
    m = world.machines
    cluster_password = secrets.token_hex(12)
    observer.call(central.add_account, "cluster", cluster, cluster_password)

    secret, api_key = secrets.token_hex(16), secrets.token_hex(16)  # the cluster's, an operator's key
    gws: dict[str, LabGateway] = {}
    for name in gateways:
        gdir = workdir / name
        gdir.mkdir(parents=True, exist_ok=True)
        gw = LabGateway(
            gdir, name=cluster, secret=secret, api_key=api_key, host=m[name].address, http_port=HTTP_PORT
        )
        gw.worker_port = WORKER_PORT
        gw.gateway = procs.shoal(
            name,
            name,
            [
                "cluster",
                "--name",
                cluster,
                "--gateway-id",
                name,
                "--http",
                f"0.0.0.0:{HTTP_PORT}",
                "--grpc",
                f"0.0.0.0:{GRPC_PORT}",
                "--workers",
                f"0.0.0.0:{WORKER_PORT}",
                "--advertise-workers",
                f"{gw.host}:{WORKER_PORT}",
                "--public-url",
                gw.url,
                *[a for u in site for a in ("--central", u)],
                "--state-dir",
                str(gdir / "state"),
                "--ports-file",
                str(gdir / "ports.json"),
            ],
            {
                "SHOAL_CLUSTER_SECRET": secret,
                "SHOAL_API_KEYS": f"operator:{api_key}",
                "SHOAL_CENTRAL_PASSWORD": cluster_password,
            },
        )
        gws[name] = gw
    for name, gw in gws.items():
        assert gw.gateway is not None
        wait_ports(gw.gateway, workdir / name / "ports.json", timeout)
        gw.gateway_pids = [gw.gateway.pid]

    dep = Deployment(cluster, central, {}, site, gws, {}, {}, secret, model, repo)
    ws = {name: procs.shoal(name, name, dep.worker_args(name), {"SHOAL_CLUSTER_SECRET": secret}) for name in workers}
    for gw in gws.values():
        gw.workers = list(ws.values())  # named in wait_workers' message if one dies
        observer.call(gw.wait_workers, model, len(ws), timeout)
    dep.workers = ws
    return dep
