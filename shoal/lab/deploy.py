"""A small distributed deployment on the lab's machines: central on SQLite on a machine of its own,
the gateways of ONE cluster each on its own machine (every one reporting to central, advertising
its own address to workers and devices), and echo workers each on its own machine, told of the
first gateway only (they learn the others from it: PEERS)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from shoal.bench.gateways import _wait_gateways_serving
from shoal.lab.observe import LabCentral, LabGateway, Observer
from shoal.lab.procs import Processes, wait_ports
from shoal.lab.world import World
from shoal.local import Child

CENTRAL_PORT = 7000
HTTP_PORT = 8000
WORKER_PORT = 8001
MODEL = "echo"


@dataclass
class Deployment:
    cluster: str
    central: LabCentral
    gateways: dict[str, LabGateway]  # machine -> gateway (its id is the machine's name)
    workers: dict[str, Child]  # machine -> worker (its id is the machine's name)
    devices: dict[str, str] = field(default_factory=dict)  # device account -> password (one for all)

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
    cluster: str = "site",
    report_interval: float = 0.5,
    timeout: float = 90.0,
) -> Deployment:
    """Start everything on machines already in ``world`` (``central``, ``gateways``, ``workers``),
    give the cluster and ``devices`` accounts, and wait until every gateway holds every worker and
    central routes the model to a cluster whose gateways all report."""
    m = world.machines
    cdir = workdir / "central"
    cdir.mkdir(parents=True, exist_ok=True)
    central = LabCentral(cdir, host=m["central"].address, http_port=CENTRAL_PORT)
    child = procs.shoal(
        "central",
        "central",
        [
            "central",
            "--http",
            f"{central.host}:{CENTRAL_PORT}",
            "--db",
            f"sqlite:///{cdir / 'central.db'}",
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
    cluster_password = secrets.token_hex(12)
    observer.call(central.add_account, "cluster", cluster, cluster_password)
    accounts = dict.fromkeys(devices, secrets.token_hex(8))  # one password: one driver runs them all
    for d, pw in accounts.items():
        observer.call(central.add_account, "device", d, pw)

    secret, api_key = secrets.token_hex(16), secrets.token_hex(16)
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
                "--workers",
                f"0.0.0.0:{WORKER_PORT}",
                "--advertise-workers",
                f"{gw.host}:{WORKER_PORT}",
                "--public-url",
                gw.url,
                "--central",
                central.url,
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

    first = gws[gateways[0]]
    ws = {
        name: procs.shoal(
            name,
            name,
            ["worker", "--gateway", f"{first.host}:{WORKER_PORT}", "--model", MODEL, "--worker-id", name],
            {"SHOAL_CLUSTER_SECRET": secret},
        )
        for name in workers
    }
    for gw in gws.values():
        gw.workers = list(ws.values())  # named in wait_workers' message if one dies
        observer.call(gw.wait_workers, MODEL, len(ws), timeout)
    observer.call(central.wait_routable, {cluster}, MODEL, timeout)
    observer.call(_wait_gateways_serving, central, cluster, len(gws), timeout)
    return Deployment(cluster, central, gws, ws, accounts)
