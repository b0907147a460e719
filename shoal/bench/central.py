"""Routes answered per second by one central replica, on SQLite and on PostgreSQL.

``route_benchmark()`` starts ``shoal central`` as a child process on a fresh database, registers two
clusters that keep reporting, warms the credential cache of a set of devices, then sends
``POST /v1/route`` over keep-alive connections for a fixed time (``shoal.bench.loadgen``) and returns
the figures as a dict. ``source`` runs the central of another shoal source tree instead (a git
worktree of an older commit), so that ``shoal bench central --baseline DIR`` compares two versions
in alternating runs on the same machine. Run it alone with ``python -m shoal.bench.central``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from shoal.bench.loadgen import LoadGenerator, http_request
from shoal.bench.process import cpu_seconds

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def _basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


def _call(port: int, method: str, path: str, auth: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(
            method, path, body=data, headers={"Authorization": auth, "Content-Type": "application/json"}
        )
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


async def _pg_admin(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _start(
    db: str, workdir: Path, operator_pw: str, cpu: int | None, source: Path | None = None
) -> tuple[subprocess.Popen, int]:
    ports = workdir / "central.ports.json"
    cmd = [sys.executable, "-m", "shoal", "central", "--http", "127.0.0.1:0", "--db", db]
    cmd += ["--ports-file", str(ports), "--bootstrap-operator", "bench", "--log-level", "warning"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = {**os.environ, "SHOAL_OPERATOR_PASSWORD": operator_pw}
    if source is not None:  # that tree's shoal first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    log = open(workdir / "central.log", "ab")  # noqa: SIM115 (the child owns it)
    p = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=source or None
    )
    log.close()
    end = time.monotonic() + 60
    while not ports.exists():
        if p.poll() is not None or time.monotonic() > end:
            _stop(p)
            raise RuntimeError("central did not start: " + (workdir / "central.log").read_text()[-2000:])
        time.sleep(0.05)
    return p, json.loads(ports.read_text())["http"]


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5)


def _load(port: int, pid: int, auths: list[str], connections: int, duration_s: float) -> dict[str, Any]:
    body = b'{"model":"mnist-cnn"}'
    reqs = [
        http_request("/v1/route", body, {"Authorization": a, "Content-Type": "application/json"})
        for a in auths
    ]
    gen = LoadGenerator(
        "127.0.0.1",
        port,
        lambda i: reqs[i % len(reqs)],
        connections=connections,
        duration_s=duration_s,
        warmup=connections * 4,
    )
    c0 = cpu_seconds(pid)
    r = asyncio.run(gen.run())
    # CPU time per route is steadier than routes/s on a machine that does other work meanwhile.
    cpu_us = (cpu_seconds(pid) - c0) / max(1, r.count) * 1e6
    return {
        "routes_per_s": round(r.ok / r.elapsed_s, 1),
        "central_cpu_us_per_route": round(cpu_us, 1),
        "p50_ms": round(r.percentile_ms(50), 2),
        "p99_ms": round(r.percentile_ms(99), 2),
        "answered": r.count,
        "not_200": r.count - r.ok,
        "errors": len(r.errors),
    }


def route_benchmark(
    db: str = "sqlite",
    pg_admin_url: str = DEFAULT_PG,
    duration_s: float = 5.0,
    connections: int = 16,
    devices: int = 16,
    source: Path | None = None,
) -> dict[str, Any]:
    """Figures for one central on ``db`` ("sqlite" or "postgresql"): routes/s with Basic credentials
    (cached after the first check) and with session tokens, and their latency percentiles."""
    two_cpus = (os.cpu_count() or 1) > 1 and hasattr(os, "sched_setaffinity")
    with tempfile.TemporaryDirectory(prefix="shoal-central-bench-") as tmp:
        work = Path(tmp)
        pg_db = None
        if db == "sqlite":
            url = f"sqlite:///{work / 'central.db'}"
        elif db == "postgresql":
            pg_db = f"shoal_bench_{uuid.uuid4().hex[:10]}"
            asyncio.run(_pg_admin(pg_admin_url, f"CREATE DATABASE {pg_db}"))
            url = pg_admin_url.rsplit("/", 1)[0] + "/" + pg_db
        else:
            raise ValueError(f"db must be 'sqlite' or 'postgresql', not {db!r}")
        op_pw = secrets.token_hex(12)
        proc, port = _start(url, work, op_pw, cpu=0 if two_cpus else None, source=source)
        stop = threading.Event()
        try:
            op = _basic("bench", op_pw)
            pw = secrets.token_hex(12)
            for kind, name in [("cluster", "bench-a"), ("cluster", "bench-b")] + [
                ("device", f"bench-cam{i}") for i in range(devices)
            ]:
                code, ans = _call(
                    port, "POST", "/v1/accounts", op, {"kind": kind, "name": name, "password": pw}
                )
                if code != 201:
                    raise RuntimeError(f"could not add {kind} {name}: {ans}")

            def report() -> None:
                while not stop.is_set():
                    for i, name in enumerate(("bench-a", "bench-b")):
                        m = {"name": "mnist-cnn", "version": "1", "ready": True, "in_flight": 3 * i}
                        m.update(capacity=64, queue=0, latency_ms=1.0, workers=2)
                        body = {"address": f"http://127.0.0.1:{9000 + i}", "models": [m]}
                        _call(port, "POST", "/v1/clusters/report", _basic(name, pw), body)
                    stop.wait(0.5)

            reporter = threading.Thread(target=report, daemon=True)
            reporter.start()
            time.sleep(0.3)
            basics = [_basic(f"bench-cam{i}", pw) for i in range(devices)]
            sessions = []
            for a in basics:  # first check of each device pays the KDF; later ones hit the cache
                code, ans = _call(port, "POST", "/v1/route", a, {"model": "mnist-cnn"})
                if code != 200:
                    raise RuntimeError(f"route failed: {code} {ans}")
                sessions.append("Bearer " + _call(port, "POST", "/v1/login", a)[1]["token"])
            basic = _load(port, proc.pid, basics, connections, duration_s)
            session = _load(port, proc.pid, sessions, connections, duration_s)
        finally:
            stop.set()
            _stop(proc)
            if pg_db is not None:
                asyncio.run(_pg_admin(pg_admin_url, f"DROP DATABASE IF EXISTS {pg_db} WITH (FORCE)"))
    return {
        "database": db,
        "connections": connections,
        "devices": devices,
        "duration_s": duration_s,
        "central_cpu": "pinned to 1 core" if two_cpus else "shared",
        "basic": basic,
        "session": session,
    }


def app_cost(source: Path | None = None) -> dict[str, float]:
    """CPU us per route of the ASGI application alone (``central_app.py``), of this tree or ``source``."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    script = Path(__file__).with_name("central_app.py")
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env, cwd=source or None
    )
    if r.returncode != 0:
        raise RuntimeError(f"measuring central's application failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def central(workdir: Path, args: Any) -> dict[str, Any]:
    """Routes answered per second by one central on SQLite, and on PostgreSQL when asked
    (``--central-pg URL``: a database is created on that server and dropped after); with
    ``--baseline DIR``, against the central of that source tree in alternating runs."""
    from shoal.database import redact

    baseline = Path(args.baseline).resolve() if getattr(args, "baseline", None) else None
    pg = getattr(args, "central_pg", None)
    if pg:
        print(f"  central: PostgreSQL at {redact(pg)}: creating a database shoal_bench_* there, dropped after", flush=True)
    duration = min(args.seconds, 5.0)
    out: dict[str, Any] = {}
    for _ in range(2):  # the application alone, alternating with the baseline's
        for name, src in (("this tree", None), (baseline.name if baseline else "", baseline)):
            if name:
                for kind, us in app_cost(src).items():
                    what = f"route token {kind.split('_')[1]}: us" if kind.startswith("token") else (
                        f"application alone, {kind.split('_')[0]}: CPU us/route"
                    )
                    key = f"{what}, {name} (2 runs)"
                    out[key] = f"{out[key]} / {us:.0f}" if key in out else f"{us:.0f}"
    if not pg:
        out["postgresql"] = "not run (--central-pg postgresql://USER@HOST:PORT/DB to run it there)"
    for db in ("sqlite", "postgresql") if pg else ("sqlite",):
        kw = {"pg_admin_url": pg} if db == "postgresql" else {}
        try:
            if baseline is None:
                r = route_benchmark(db, duration_s=duration, **kw)
                for kind in ("basic", "session"):
                    out[f"{db}, {kind} credentials"] = r[kind]
                continue
            runs: dict[str, list[dict[str, Any]]] = {"this": [], "baseline": []}
            for _ in range(2):  # alternating, so a change in the machine's load touches both alike
                runs["this"].append(route_benchmark(db, duration_s=duration, **kw))
                runs["baseline"].append(route_benchmark(db, duration_s=duration, source=baseline, **kw))
        except (OSError, RuntimeError) as e:
            out[db] = f"skipped: {e}"
            continue
        for kind in ("basic", "session"):
            mine = [r[kind]["routes_per_s"] for r in runs["this"]]
            base = [r[kind]["routes_per_s"] for r in runs["baseline"]]
            out[f"{db}, {kind}: routes/s this tree (2 runs)"] = " / ".join(f"{x:.0f}" for x in mine)
            out[f"{db}, {kind}: routes/s {baseline.name} (2 runs)"] = " / ".join(f"{x:.0f}" for x in base)
            out[f"{db}, {kind}: ratio of the means"] = round(sum(mine) / sum(base), 3)
            cpu = [r[kind]["central_cpu_us_per_route"] for r in runs["this"]]
            cpu_base = [r[kind]["central_cpu_us_per_route"] for r in runs["baseline"]]
            out[f"{db}, {kind}: central CPU us/route this / baseline"] = (
                f"{sum(cpu) / len(cpu):.0f} / {sum(cpu_base) / len(cpu_base):.0f}"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Routes per second of one central on SQLite and PostgreSQL.")
    p.add_argument(
        "--pg",
        default=None,
        help=f"also PostgreSQL: an admin URL such as {DEFAULT_PG} (a database is created there and dropped)",
    )
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--source", default=None, help="run the central of this shoal source tree")
    args = p.parse_args(argv)
    source = Path(args.source).resolve() if args.source else None
    kw = {"duration_s": args.duration, "connections": args.connections, "source": source}
    out = [route_benchmark("sqlite", **kw)]
    if args.pg:
        out.append(route_benchmark("postgresql", args.pg, **kw))
    for r in out:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
