"""``shoal federation``: cooperative learning across sites, deployed on Flower (SuperLink, SuperNodes).

One machine runs the SuperLink (it needs an address the sites can reach); every site runs one
SuperNode next to its data. TLS on every link; only sites whose key was enrolled may join (Flower's
SuperNode authentication); the SuperLink's Control API stays on a private address behind
``fleet_gate``. Each subcommand wraps a Flower executable with the settings this needs and with
Flower's telemetry and update check off; see docs/fusion.md for the walkthrough.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shoal.modelrepo.versions import is_number

HELP = "Cooperative learning across sites on Flower: SuperLink, enrolled SuperNodes, runs, published models."
EXAMPLE = """# on the SuperLink machine
shoal certs --out pki --name superlink --host fusion.example.org --host 127.0.0.1
shoal federation superlink --certs pki --address 0.0.0.0:9092 --private 127.0.0.1:9093 --state fed.db
shoal federation keys --out keys --site hospital-a          # at the site; send keys/hospital-a.pub
shoal federation enroll --superlink 127.0.0.1:9093 --ca pki/ca.pem --name hospital-a keys/hospital-a.pub
# at each site (its data: a folder, an .npz, a gateway's stored results, or paper:<data set>)
shoal federation site --superlink fusion.example.org:9092 --ca ca.pem --key keys/hospital-a.key --data /data/digits
# on the SuperLink machine: train, then publish the fused model as the next version
shoal federation run --superlink 127.0.0.1:9093 --ca pki/ca.pem --sites hospital-a hospital-b hospital-c \\
    --template models/mnist-cnn/1 --topology hypercube --fuse-every 10steps --rounds 200 --export models"""

TELEMETRY_OFF = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
# How often a SuperNode's or SuperLink's executor looks for a ClientApp/ServerApp to start (Flower's
# default is 1 s); a fusion round starts one ClientApp per site, so this is round latency.
TASK_POLL_S = "0.5"


def flower_env(flwr_home: str | Path | None = None) -> dict[str, str]:
    """The environment of every Flower process shoal starts: no telemetry, no update check, no
    installing of app dependencies at run time, this Python's scripts first on PATH."""
    env = dict(os.environ, **TELEMETRY_OFF)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_S)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flower_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found: install Flower (pip install --no-deps -r scripts/flower-requirements.txt)"
        )
    return found


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not is_number(port):
        raise ValueError(f"{address!r}: expected host:port")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")


# ---------------------------------------------------------------------------------------------- keys


def make_site_keys(out: Path, site: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format: ``<site>.key`` (keep at the site) and ``<site>.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    out.mkdir(parents=True, exist_ok=True)
    priv, pub = out / f"{site}.key", out / f"{site}.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    priv.chmod(0o600)
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {site}\n".encode()
    )
    return priv, pub


# ---------------------------------------------------------------------------------------------- the flwr CLI


def _flwr_home(superlink: str, ca: str | None) -> Path:
    """A private FLWR_HOME whose config names one SuperLink connection, ``shoal``."""
    import tomli_w

    home = Path(tempfile.mkdtemp(prefix="shoal-flwr-"))
    conn: dict[str, Any] = {"address": superlink}
    if ca:
        conn["root-certificates"] = str(Path(ca).resolve())
    else:
        conn["insecure"] = True
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "shoal", "shoal": conn}}))
    return home


def flwr_cli(
    args: list[str], superlink: str, ca: str | None, stream: bool = False
) -> subprocess.CompletedProcess[str]:
    home = _flwr_home(superlink, ca)
    try:
        return subprocess.run(
            [flower_bin("flwr"), *args],
            env=flower_env(home),
            text=True,
            capture_output=not stream,
            check=False,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)


_BOX = str.maketrans(dict.fromkeys("╭╮╰╯─│", " "))


def enroll(superlink: str, ca: str | None, public_key: Path, name: str) -> int:
    """Register a site's public key with the SuperLink under ``name``; returns its node id."""
    r = flwr_cli(
        ["supernode", "register", str(public_key), "shoal", "--name", name, "--format", "json"], superlink, ca
    )
    out = r.stdout or ""
    start = out.find("{")
    if r.returncode != 0 or start < 0:
        said = " ".join((r.stderr or out).translate(_BOX).split())  # flwr's framed message, as one line
        raise RuntimeError(f"enrolling {name} failed: {said[-500:]}")
    return int(json.loads(out[start:])["node-id"])


# ---------------------------------------------------------------------------------------------- commands


def superlink_command(args: argparse.Namespace) -> list[str]:
    certs = Path(args.certs)
    host, port = split_address(args.private)
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port), "--enable-supernode-auth"]
    cmd += ["--ssl-ca-certfile", str(certs / "ca.pem")]
    cmd += [
        "--ssl-certfile",
        str(certs / f"{args.name}.pem"),
        "--ssl-keyfile",
        str(certs / f"{args.name}.key"),
    ]
    cmd += ["--disable-runtime-dependency-installation"]
    if args.state:
        cmd += ["--database", str(args.state)]
    return cmd


def run_superlink(args: argparse.Namespace) -> int:
    from shoal.fusion.fleet_gate import serve

    certs = Path(args.certs)
    for f in ("ca.pem", f"{args.name}.pem", f"{args.name}.key"):
        if not (certs / f).is_file():
            fix = f"shoal certs --out {certs} --name {args.name} --host ..."
            print(f"shoal federation superlink: {certs / f} missing; make it with '{fix}'", file=sys.stderr)
            return 2
    host, port = split_address(args.private)
    link = subprocess.Popen(
        superlink_command(args), env=flower_env(args.flwr_home), preexec_fn=_die_with_parent
    )
    try:
        wait_port(host, port, 60, link)
        pub_host, pub_port = split_address(args.address)
        print(
            f"SuperLink on {args.private} (private: enrol and run here); sites connect to {args.address}",
            flush=True,
        )
        serve(
            pub_host,
            pub_port,
            f"https://{host}:{port}",
            str(certs / "ca.pem"),
            str(certs / f"{args.name}.pem"),
            str(certs / f"{args.name}.key"),
        )
    finally:
        link.send_signal(signal.SIGTERM)
        try:
            link.wait(15)
        except subprocess.TimeoutExpired:
            link.kill()
    return 0


SITE_OPTIONS = ("site", "data", "test_data", "holdout", "results_dir", "labels", "model")
# Flower's SuperNode says this (its exit code 305; its process then exits with 1) when the SuperLink
# does not take it: unreachable, not enrolled, or (after the site's machine crashed) its node still
# held as online until its heartbeats are missed, a minute by Flower's defaults (30 s, patience 2).
SUPERNODE_REFUSED = b"Exit Code: 305"
SITE_RETRY_S = 120.0  # how long a refused site keeps trying when --max-wait is not given
REFUSED_EXIT_S = 6.0  # a refused SuperNode gets this long to exit by itself (Flower forces it at 5 s)


def _relay_output(p: subprocess.Popen[bytes], refusal: threading.Event) -> None:
    """The SuperNode's output onto this process's; ``refusal`` set when it says it was refused."""
    assert p.stdout is not None
    for line in p.stdout:
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
        if SUPERNODE_REFUSED in line:
            refusal.set()


def run_site(cmd: list[str], env: dict[str, str], max_wait: float | None, first_delay: float = 2.0) -> int:
    """The SuperNode as a child (SIGTERM and SIGINT passed on, its output passed through): refused
    by the SuperLink (it says ``SUPERNODE_REFUSED``), it is started again with back-off (2 s doubling
    to 15 s) for up to ``max_wait`` (``SITE_RETRY_S`` when None) since the refusals began; its exit
    status."""
    window = SITE_RETRY_S if max_wait is None else max_wait
    stopping: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        if child and child[-1].poll() is None:
            child[-1].send_signal(signum)

    before = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(cmd, env, window, first_delay, child, stopping)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _supervise(
    cmd: list[str],
    env: dict[str, str],
    window: float,
    first_delay: float,
    child: list[subprocess.Popen[bytes]],
    stopping: list[int],
) -> int:
    refused_since: float | None = None
    delay = first_delay
    while True:
        started = time.monotonic()
        p = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        child.append(p)
        refusal = threading.Event()
        relay = threading.Thread(target=_relay_output, args=(p, refusal), daemon=True)
        relay.start()
        while p.poll() is None and not refusal.wait(0.5):
            pass
        if refusal.is_set():  # Flower's SuperNode may stay up after saying so (its executor retries)
            try:
                p.wait(REFUSED_EXIT_S)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        code = p.wait()
        relay.join(5)
        now = time.monotonic()
        if not refusal.is_set() or stopping:
            return code
        if refused_since is None or now - started > window:  # refusals begin (again) now
            refused_since = now
        if now + delay - refused_since > window:
            print(f"shoal federation site: the SuperLink did not take this site for {window:g} s; giving up",
                  file=sys.stderr, flush=True)  # fmt: skip
            return code if code > 0 else 1  # ended by us after its refusal: still a failure
        print(
            "shoal federation site: the SuperLink did not take this site (not reachable, "
            "not enrolled, or still holding this site's previous node as online after a crash); "
            f"trying again in {delay:g} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(delay)
        delay = min(2 * delay, 15.0)


def _absolute(value: str) -> str:
    """A source or file path as the SuperNode will see it, whatever its working directory."""
    if value.startswith("results:sqlite:///"):
        return "results:sqlite:///" + str(Path(value.removeprefix("results:sqlite:///")).resolve())
    if value.startswith(("paper:", "results:")):
        return value
    return str(Path(value).resolve())


def site_node_config(args: argparse.Namespace) -> str:
    """The site's settings as Flower's ``--node-config`` (the ClientApp reads them there)."""
    parts = []
    for key in SITE_OPTIONS:
        value = getattr(args, key, None)
        if value is None or value == "":
            continue
        if key in ("data", "test_data", "results_dir", "labels"):
            value = _absolute(str(value))
        parts.append(f"{key.replace('_', '-')}={json.dumps(value)}")
    return " ".join(parts)


def site_command(args: argparse.Namespace) -> list[str]:
    cmd = [flower_bin("flower-supernode"), "--superlink", args.superlink]
    cmd += ["--root-certificates", str(args.ca)] if args.ca else ["--insecure"]
    if args.key:
        cmd += ["--auth-supernode-private-key", str(args.key)]
    cmd += ["--node-config", site_node_config(args), "--port", str(args.runtime_port or free_port())]
    if args.max_wait is not None:
        cmd += ["--max-wait-time", str(args.max_wait)]
    return cmd


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerApp's run configuration (``flower_app.RUN_DEFAULTS``) from ``shoal federation run``."""
    from shoal.fusion.export import load_template
    from shoal.fusion.strategy import Interval

    template = load_template(args.template)
    cfg = {
        "sites": " ".join(args.sites),
        "rounds": args.rounds,
        "topology": args.topology,
        "rate": args.rate,
        "update": args.update,
        "hypercube-edges": args.hypercube_edges,
        "fuse-every": str(Interval.parse(args.fuse_every)),
        "seed": args.seed,
        "hidden": " ".join(map(str, args.hidden)),
        "lr": args.lr,
        "batch": args.batch,
        "split": args.split,
        "template": json.dumps(template.to_json()),
        "wait": args.wait,
        "round-wait": args.round_wait,
        "round-timeout": args.round_timeout,
        "log": str(Path(args.log).resolve()) if args.log else "",
        "export-repo": str(Path(args.export).resolve()) if args.export else "",
        "export-name": args.name or "",
        "command": "shoal federation " + shlex.join(sys.argv[2:]) if len(sys.argv) > 2 else "",
    }
    return cfg


def write_app(folder: Path, config: dict[str, Any]) -> Path:
    """The Flower app ``flwr run`` submits: a pyproject naming shoal's ServerApp and ClientApp."""
    import tomli_w

    import shoal

    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "shoal-fusion",
            "version": shoal.__version__,
            "description": "Cooperative learning by weighted-average model fusion (paper 003)",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "shoal",
                    "components": {
                        "serverapp": "shoal.fusion.flower_app:server_app",
                        "clientapp": "shoal.fusion.flower_app:client_app",
                    },
                    "config": config,
                }
            }
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return folder


def run_federation(args: argparse.Namespace) -> int:
    try:
        config = run_config(args)
    except (ValueError, OSError) as e:
        print(f"shoal federation run: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="shoal-fusion-app-") as tmp:
        app = write_app(Path(tmp) / "app", config)
        r = flwr_cli(["run", str(app), "shoal", "--stream"], args.superlink, args.ca, stream=True)
    return r.returncode


# ---------------------------------------------------------------------------------------------- CLI


def role_example(role: str) -> dict[str, object]:
    """``add_parser`` keywords that show the lines of ``EXAMPLE`` for ``shoal federation ROLE``."""
    lines, keep = [], False
    for line in EXAMPLE.splitlines():
        keep = line.startswith(f"shoal federation {role} ") or (keep and lines[-1].endswith("\\"))
        if keep:
            lines.append(line)
    return {
        "epilog": "example:\n  " + "\n  ".join(lines),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    from shoal.fusion.algorithm import UPDATES
    from shoal.fusion.topology import HYPERCUBE_EDGES, TOPOLOGIES

    sub = p.add_subparsers(dest="role", required=True)

    k = sub.add_parser(
        "keys", help="make a site's key pair (the private key stays at the site)", **role_example("keys")  # type: ignore[arg-type]
    )
    k.add_argument("--out", default="keys")
    k.add_argument("--site", required=True, help="the site's name (file names and the key's comment)")

    s = sub.add_parser(
        "superlink", help="run the SuperLink: Fleet API on --address, the rest on --private", **role_example("superlink")  # type: ignore[arg-type]
    )
    s.add_argument("--certs", required=True, help="folder with ca.pem and NAME.pem/NAME.key (shoal certs)")
    s.add_argument("--name", default="superlink", help="certificate name in --certs (default %(default)s)")
    s.add_argument("--address", default="0.0.0.0:9092", help="public host:port for the sites")
    s.add_argument("--private", default="127.0.0.1:9093", help="private host:port: enrol and run here")
    s.add_argument("--state", help="SQLite file keeping enrolled sites across restarts (default: memory)")
    s.add_argument("--flwr-home", help=argparse.SUPPRESS)

    e = sub.add_parser(
        "enroll", help="allow a site to join: register its public key under its name", **role_example("enroll")  # type: ignore[arg-type]
    )
    e.add_argument("public_key", type=Path)
    e.add_argument("--name", required=True, help="the site's name, as listed in 'run --sites'")
    e.add_argument("--superlink", default="127.0.0.1:9093", help="the SuperLink's private address")
    e.add_argument("--ca", help="the federation's ca.pem")

    n = sub.add_parser(
        "site", help="run a site: a SuperNode that trains on this site's data", **role_example("site")  # type: ignore[arg-type]
    )
    n.add_argument("--superlink", required=True, help="the SuperLink's public host:port")
    n.add_argument("--ca", help="the federation's ca.pem (omit only for a local test without TLS)")
    n.add_argument("--key", help="this site's private key (shoal federation keys)")
    n.add_argument("--site", default="", help="this site's name (only needed when enrolled without one)")
    n.add_argument("--data", required=True, help="a folder, an .npz, results:<database URL>, or paper:<set>")
    n.add_argument("--test-data", help="held-out rows in the same forms (default: --holdout of --data)")
    n.add_argument("--holdout", type=float, default=None, help="fraction of --data held out (default 0.1)")
    n.add_argument("--results-dir", help="for results: data, the gateway's --results-dir")
    n.add_argument("--labels", help="for results: data, a CSV of request_id,label")
    n.add_argument("--model", help="for results: data, only this model's requests")
    n.add_argument(
        "--runtime-port", type=int, default=0, help="port of the SuperNode's local API (default: free)"
    )
    n.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="give up connecting after this many seconds (default: Flower's; a site the SuperLink refuses "
        f"is started again for {SITE_RETRY_S:g} s)",
    )

    r = sub.add_parser(
        "run", help="train across the enrolled sites, then publish the fused model", **role_example("run")  # type: ignore[arg-type]
    )
    r.add_argument("--superlink", default="127.0.0.1:9093", help="the SuperLink's private address")
    r.add_argument("--ca", help="the federation's ca.pem")
    r.add_argument("--sites", nargs="+", required=True, help="enrolled site names; site i is peer i")
    r.add_argument("--template", required=True, help="model version folder, manifest.json, or paper:<set>")
    r.add_argument("--rounds", type=int, default=10)
    r.add_argument("--topology", choices=[*TOPOLOGIES, "average"], default="ring")
    r.add_argument("--rate", type=float, default=0.55)
    r.add_argument("--update", choices=UPDATES, default="sequential")
    r.add_argument("--hypercube-edges", choices=HYPERCUBE_EDGES, default="twice")
    r.add_argument("--fuse-every", default="1epoch", help="local work per round: 10steps, 1epoch, ...")
    r.add_argument("--seed", type=int, default=0, help="shared initial weights and data order")
    r.add_argument("--hidden", type=int, nargs="+", default=[80, 30])
    r.add_argument("--lr", type=float, default=0.01)
    r.add_argument("--batch", type=int, default=10)
    r.add_argument("--split", default="random", help="for paper: data, how the set is shared out")
    r.add_argument("--wait", type=float, default=60.0, help="seconds to wait for every site at the start")
    r.add_argument(
        "--round-wait", type=float, default=10.0, help="seconds to wait each round for missing sites"
    )
    r.add_argument(
        "--round-timeout", type=float, default=600.0, help="seconds before a silent site is skipped"
    )
    r.add_argument("--log", help="JSON-lines file with one line per round (on the SuperLink machine)")
    r.add_argument("--export", help="model repository to publish the fused model into (next version)")
    r.add_argument("--name", help="model name in --export (default: the template's)")


def run(args: argparse.Namespace) -> int:
    if args.role == "keys":
        priv, pub = make_site_keys(Path(args.out), args.site)
        print(f"wrote {priv} (keep it at the site) and {pub} (give it to the federation's operator)")
        return 0
    if args.role == "superlink":
        return run_superlink(args)
    if args.role == "enroll":
        if not Path(args.public_key).is_file():
            print(f"shoal federation enroll: {args.public_key}: no such file", file=sys.stderr)
            return 2
        try:
            node = enroll(args.superlink, args.ca, args.public_key, args.name)
        except RuntimeError as e:
            print(f"shoal federation enroll: {e}", file=sys.stderr)
            return 1
        print(f"enrolled {args.name} as node {node}")
        return 0
    if args.role == "site":
        if not args.data.startswith(("paper:", "results:")) and not Path(args.data).exists():
            print(f"shoal federation site: {args.data} does not exist", file=sys.stderr)
            return 2
        # A child, started again while the SuperLink refuses it (a crash leaves the site's node held
        # as online for a minute): signals reach it through this process.
        return run_site(site_command(args), flower_env(), args.max_wait)
    return run_federation(args)
