"""Run a cluster on this machine as real processes: a gateway and its workers, each a
``python -m shoal`` child with its log in a work folder. Used by the demo, the benchmarks and the tests.
Only processes started here are ever signalled, by their process id."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.client.http import OipHttpClient


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait(5)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


@dataclass
class LocalCluster:
    workdir: Path
    name: str = "cluster"
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    api_key: str = field(default_factory=lambda: secrets.token_hex(16))
    gateway_args: list[str] = field(default_factory=list)
    central_urls: list[str] = field(default_factory=list)  # report to these central replicas
    central_password: str = ""
    tls: tuple[str, str, str] | None = None  # (certificate, key, CA file): TLS on both gateway ports
    processes: int = 1  # gateway processes (shoal cluster --processes): one HTTP port, a worker port each
    http_port: int = 0
    worker_port: int = 0
    grpc_port: int = 0  # gRPC (0 at start: any free port; stays 0 without shoal[grpc])
    worker_ports: list[int] = field(default_factory=list)
    # Run the gateway and workers of this shoal source tree instead (a benchmark's baseline: a git
    # worktree of an older commit): its shoal first on their path, and their working folder.
    source: Path | None = None
    gateway_pids: list[int] = field(
        default_factory=list
    )  # the gateway processes (their supervisor's children)
    gateway: Child | None = None
    workers: list[Child] = field(default_factory=list)
    _n: int = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None, cpu: int | None = None
    ) -> Child:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "shoal", *args]
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            cmd = ["taskset", "-c", str(cpu), *cmd]
        f = open(log, "ab")  # noqa: SIM115 (the child owns it)
        full = _env(env)
        if self.source is not None:
            full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.source), full.get("PYTHONPATH")]))
        p = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full, cwd=self.source
        )
        f.close()
        return Child(name, p, log)

    def start(
        self,
        http_port: int | None = None,
        worker_port: int | None = None,
        cpu: int | None = None,
        timeout: float = 20.0,
    ) -> LocalCluster:
        ports = self.workdir / f"{self.name}.ports.json"
        ports.unlink(missing_ok=True)
        hp = self.http_port if http_port is None else http_port
        wp = self.worker_port if worker_port is None else worker_port
        central: list[str] = []
        for u in self.central_urls:
            central += ["--central", u]
        if self.tls:
            central += ["--tls-cert", self.tls[0], "--tls-key", self.tls[1], "--central-ca", self.tls[2]]
        self.gateway = self.spawn(
            self.name,
            [
                "cluster",
                "--name",
                self.name,
                "--http",
                f"127.0.0.1:{hp}",
                "--grpc",
                f"127.0.0.1:{self.grpc_port}",
                "--workers",
                f"127.0.0.1:{wp}",
                "--ports-file",
                str(ports),
                "--state-dir",
                str(self.workdir / "state"),
                f"--processes={self.processes}",
                *central,
                *self.gateway_args,
            ],
            {
                "SHOAL_CLUSTER_SECRET": self.secret,
                "SHOAL_API_KEYS": f"operator:{self.api_key}",
                "SHOAL_CENTRAL_PASSWORD": self.central_password,
            },
            cpu=cpu,
        )
        end = time.monotonic() + timeout
        while not ports.exists():
            if not self.gateway.alive() or time.monotonic() > end:
                raise RuntimeError(f"gateway {self.name} did not start:\n{self.gateway.tail()}")
            time.sleep(0.02)
        info = json.loads(ports.read_text())
        self.http_port, self.worker_port = info["http"], info["workers"]
        self.worker_ports = info.get("worker_ports", [self.worker_port])
        self.grpc_port = info.get("grpc", 0)
        self.gateway_pids = info.get("pids", [info["pid"]])
        return self

    def kill_gateway(self, index: int = 0, sig: int = signal.SIGKILL) -> int:
        """Signal one gateway process (its supervisor restarts it when there are several); its pid."""
        pid = self.gateway_pids[index]
        os.kill(pid, sig)
        return pid

    def add_worker(
        self,
        model: str,
        repo: str | None = None,
        version: str | None = None,
        extra: list[str] | None = None,
        cpu: int | None = None,
        secret: str | None = None,
    ) -> Child:
        self._n += 1
        wid = f"{self.name}-w{self._n}"
        args = ["worker", "--gateway", f"127.0.0.1:{self.worker_port}", "--model", model, "--worker-id", wid]
        if repo:
            args += ["--repo", str(repo)]
        if version:
            args += ["--version", version]
        if self.tls:
            args += ["--tls-ca", self.tls[2]]
        child = self.spawn(
            wid, args + list(extra or []), {"SHOAL_CLUSTER_SECRET": secret or self.secret}, cpu=cpu
        )
        self.workers.append(child)
        return child

    def client(self, timeout: float = 30.0) -> OipHttpClient:
        return OipHttpClient(
            self.url, self.api_key, timeout=timeout, ca_file=self.tls[2] if self.tls else None
        )

    def status(self) -> dict[str, Any]:
        with self.client(5.0) as c:
            code, body = c.get_json("/v2/status")
        if code != 200:
            raise RuntimeError(f"status answered {code}: {body}")
        return body

    def live_workers(self, model: str, version: str | None = None) -> int:
        n = 0
        for m in self.status()["models"]:
            if m["name"] == model and (version is None or m["version"] == version):
                n += sum(1 for w in m["workers"] if w["accepting"])
        return n

    def wait_workers(self, model: str, count: int, timeout: float = 30.0, version: str | None = None) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                if self.live_workers(model, version) >= count:
                    return
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > end:
                dead = [w for w in self.workers if not w.alive()]
                detail = "\n".join(f"--- {w.name}:\n{w.tail()}" for w in dead)
                raise TimeoutError(f"{count} workers of {model} not live after {timeout} s\n{detail}")
            time.sleep(0.05)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        if self.gateway is not None:
            self.gateway.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LocalCentral:
    """A central server as a child process, on SQLite in the work folder unless ``db`` says otherwise."""

    workdir: Path
    name: str = "central"
    db: str | None = None
    operator: str = "operator"
    operator_password: str = field(default_factory=lambda: secrets.token_hex(16))
    extra_args: list[str] = field(default_factory=list)
    tls: tuple[str, str, str] | None = None  # (certificate, key, CA file): serve HTTPS
    http_port: int = 0
    proc: Child | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    def start(self, http_port: int | None = None, timeout: float = 30.0) -> LocalCentral:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = self.workdir / f"{self.name}.ports.json"
        ports.unlink(missing_ok=True)
        db = self.db or f"sqlite:///{self.workdir / 'central.db'}"
        hp = self.http_port if http_port is None else http_port
        runner = LocalCluster(self.workdir, name=self.name)
        self.proc = runner.spawn(
            self.name,
            [
                "central",
                "--http",
                f"127.0.0.1:{hp}",
                "--db",
                db,
                "--ports-file",
                str(ports),
                "--bootstrap-operator",
                self.operator,
                *(["--tls-cert", self.tls[0], "--tls-key", self.tls[1]] if self.tls else []),
                *self.extra_args,
            ],
            {"SHOAL_OPERATOR_PASSWORD": self.operator_password},
        )
        end = time.monotonic() + timeout
        while not ports.exists():
            if not self.proc.alive() or time.monotonic() > end:
                raise RuntimeError(f"central {self.name} did not start:\n{self.proc.tail()}")
            time.sleep(0.02)
        self.http_port = json.loads(ports.read_text())["http"]
        return self

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import base64

        auth = base64.b64encode(f"{self.operator}:{self.operator_password}".encode()).decode()
        with OipHttpClient(self.url, timeout=30.0, ca_file=self.tls[2] if self.tls else None) as c:
            data = json.dumps(body).encode() if body is not None else None
            code, _, raw = c.request(
                method, path, data, {"Authorization": f"Basic {auth}", "Content-Type": "application/json"}
            )
        return code, json.loads(raw) if raw else None

    def add_account(self, kind: str, name: str, password: str) -> None:
        code, body = self.call("POST", "/v1/accounts", {"kind": kind, "name": name, "password": password})
        if code not in (200, 201):
            raise RuntimeError(f"central refused account {kind}/{name}: {code} {body}")

    def start_cluster(self, workdir: Path, name: str, **kwargs: Any) -> LocalCluster:
        """Give a cluster an account here and start its gateway reporting to this central."""
        password = secrets.token_hex(12)
        self.add_account("cluster", name, password)
        return LocalCluster(
            workdir, name=name, central_urls=[self.url], central_password=password, **kwargs
        ).start()

    def routable(self, model: str) -> set[str]:
        """Clusters central would route ``model`` to now (live, model reported ready)."""
        code, body = self.call("GET", "/v1/clusters")
        if code != 200:
            return set()
        return {
            c["name"]
            for c in body.get("clusters", [])
            if any(m["name"] == model and m.get("ready") for m in c.get("models", []))
        }

    def wait_routable(self, names: set[str] | list[str], model: str, timeout: float = 20.0) -> float:
        """Until every named cluster has reported ``model`` ready; returns the monotonic time then."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if set(names) <= self.routable(model):
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(
            f"clusters {sorted(names)} did not report {model} to central within {timeout:.0f} s"
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> LocalCentral:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
