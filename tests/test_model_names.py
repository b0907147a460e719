"""Model names and versions: one rule everywhere a name enters, names decoded once, and nothing outside
the model repository ever opened, whatever a name is made of. The attack test posts every encoding an
outside test used against a real gateway's repository API (the local engine here; the Ray engine in
tests/test_autoscale_ray.py) and checks that an outside model that would announce itself if imported
never was."""

from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path

import pytest
import yaml

from shoal.autoscale.config import AutoscaleError, parse_autoscale
from shoal.gateway.pipeline import PipelineError, parse_pipelines
from shoal.modelrepo.manifest import ManifestError, list_versions, parse_manifest, resolve
from shoal.protocol.names import InvalidName, check_name, valid_name
from shoal.protocol.oip import PathRoute, ProtocolError, parse_path, parse_repository_path

BUNDLED = Path(__file__).parent.parent / "shoal" / "bundled" / "models"

GOOD = ["echo", "mnist-cnn", "a", "A1", "v1.2", "2026-05-01", "x_y", "a..b", "a" * 128]
BAD = ["", ".", "..", ".hidden", "-x", "_x", "a/b", "../x", "/tmp/x", "a\\b", "a\x00", "echo\n", "a b",
       "é", "a%2Fb", "a" * 129, "a" * 5000, "²"]


@pytest.mark.parametrize("name", GOOD)
def test_valid_names(name):
    assert valid_name(name) and check_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_invalid_names_say_what_is_allowed(name):
    assert not valid_name(name)
    with pytest.raises(InvalidName, match="must be 1-128 ASCII letters"):
        check_name(name)


def test_paths_are_decoded_once_by_segment():
    assert parse_path("/v2/models/echo/infer") == PathRoute("infer", "echo", None)
    assert parse_path("/v2/models/ech%6F/versions/%31/ready") == PathRoute("model_ready", "echo", "1")
    for path in ("/v2/models/..%2Fother/infer", "/v2/models/..%252Fother%252Fpwn/infer",
                 "/v2/models/%2Ftmp%2Fx/infer", "/v2/models/echo%00/infer", "/v2/models/echo/versions/..%2F1",
                 "/v2/models/" + "a" * 5000 + "/infer", "/v2/models/echo/versions//infer"):
        with pytest.raises(ProtocolError) as e:
            parse_path(path)
        assert e.value.status == 400 and "invalid model" in str(e.value)
    assert parse_path("/v2/models/echo/nothing") is None  # not an endpoint: 404, not a name question


def test_repository_paths_take_everything_between_as_the_name():
    assert parse_repository_path("/v2/repository/index") == ("index", None)
    assert parse_repository_path("/v2/repository/models/echo/load") == ("load", "echo")
    assert parse_repository_path("/v2/repository/models/echo/unload") == ("unload", "echo")
    assert parse_repository_path("/v2/repository/models/echo/other") is None
    for name in ("..%2Fother%2Fpwn", "..%252Fother", "/tmp/x/echo", "%2F%2Frepo%2Fecho", "..%5Cx", "a%00",
                 "..", "."):
        with pytest.raises(ProtocolError) as e:
            parse_repository_path(f"/v2/repository/models/{name}/load")
        assert e.value.status == 400


def test_every_declaration_of_a_name_uses_the_rule(tmp_path):
    doc = {"name": "../x", "version": "1", "runtime": "python", "handler": "h:H",
           "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
           "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]}
    with pytest.raises(ManifestError, match="name"):
        parse_manifest(doc)
    with pytest.raises(ManifestError, match="version"):
        parse_manifest({**doc, "name": "x", "version": "1\n"})
    with pytest.raises(AutoscaleError, match="is not a model name"):
        parse_autoscale({"models": {"../x": {}}})
    with pytest.raises(AutoscaleError, match="is not a model version"):
        parse_autoscale({"models": {"x": {"version": "../1"}}})
    step = {"model": "../x", "inputs": {"a": "request.a"}}
    with pytest.raises(PipelineError, match="a model name must be"):
        parse_pipelines({"p": {"steps": [step], "outputs": {"o": "x.o"}}})
    with pytest.raises(ManifestError, match="invalid model name"):
        resolve(tmp_path, "../x")
    with pytest.raises(ManifestError, match="invalid model version"):
        resolve(tmp_path, "x", "../1")


def test_a_model_folder_that_leads_outside_the_repository_is_refused(tmp_path):
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    _outside_model(outside / "pwn" / "1", tmp_path / "imported")
    repo.mkdir()
    (repo / "linked").symlink_to(outside / "pwn")  # the whole model folder
    (repo / "half").mkdir()
    (repo / "half" / "1").symlink_to(outside / "pwn" / "1")  # one version folder
    assert list_versions(repo, "linked") == [] and list_versions(repo, "half") == []
    for name in ("linked", "half"):
        with pytest.raises(ManifestError):
            resolve(repo, name)


def _outside_model(folder: Path, marker: Path) -> None:
    """A Python-handler model that writes ``marker`` if anything ever imports it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "handler.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "class Pwn:\n    def __init__(self, *a, **k): pass\n    def __call__(self, x): return x\n"
    )
    (folder / "manifest.json").write_text(json.dumps({
        "name": "pwn", "version": "1", "runtime": "python", "file": "handler.py", "handler": "handler:Pwn",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}], "max_batch_size": 4,
    }))


def attack_names(repo: Path) -> list[str]:
    """Every spelling of a name that leaves the repository an outside test tried, as raw path segments."""
    r = str(repo).lstrip("/")
    return [
        "..%2Fother%2Fpwn", "..%252Fother%252Fpwn",  # single and double encoded
        "%2F" + r.replace("/", "%2F") + "%2F..%2Fother%2Fpwn",  # absolute, single encoded
        "%252F" + r.replace("/", "%252F") + "%252F..%252Fother%252Fpwn",  # absolute, double encoded
        "/" + r + "/echo", "%2F%2F" + r.replace("/", "%2F") + "%2Fecho",  # "//<repo>/echo", raw and encoded
        "..%5Cother%5Cpwn", "..%255Cother%255Cpwn",  # backslash
        "echo%00", "echo%2500", "..", "%2E%2E", ".", "a" * 5000,
    ]


def post_raw(port: int, path: str, token: str) -> tuple[int, dict]:
    """POST exactly ``path`` (no client-side normalisation of dot segments or encodings)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("POST", path, b"{}", {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def assert_names_cannot_leave_the_repository(port: int, token: str, repo: Path, marker: Path) -> None:
    for name in attack_names(repo):
        for action in ("load", "unload"):
            status, body = post_raw(port, f"/v2/repository/models/{name}/{action}", token)
            assert status == 400 and "invalid model name" in body["error"], (name, status, body)
        status, body = post_raw(port, f"/v2/models/{name}/infer", token)
        assert status in (400, 404), (name, status, body)  # a name with "/" in it is another path: 404
    status, body = post_raw(port, "/v2/repository/index", token)
    assert status == 200 and not [r for r in body if r["name"] in ("pwn", "other")], body
    assert not marker.exists(), "a model outside the repository was imported"


def repo_with_outside_model(tmp_path: Path) -> tuple[Path, Path]:
    """A repository holding echo and a symlink to a model outside it, and that outside model (at
    ``../other/pwn`` from the repository): (repository, the marker its import would write)."""
    repo, marker = tmp_path / "repo", tmp_path / "imported"
    shutil.copytree(BUNDLED / "echo", repo / "echo")
    _outside_model(tmp_path / "other" / "pwn" / "1", marker)
    (repo / "linked").symlink_to(tmp_path / "other" / "pwn")
    return repo, marker


def test_no_model_name_leaves_the_repository_through_the_load_api(cluster, tmp_path):
    repo, marker = repo_with_outside_model(tmp_path)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"autoscale": {"engine": "local", "repo": str(repo),
                                                 "workdir": str(tmp_path / "workers"), "models": {}}}))
    lc = cluster(gateway_args=["--config", str(cfg)])
    assert_names_cannot_leave_the_repository(lc.http_port, lc.api_key, repo, marker)
    status, body = post_raw(lc.http_port, "/v2/repository/models/linked/load", lc.api_key)
    assert status == 404 and "no versions" in body["error"], body  # a symlink out is no model at all
    assert not marker.exists()
    assert post_raw(lc.http_port, "/v2/repository/models/echo/load", lc.api_key)[0] == 200  # the real one
