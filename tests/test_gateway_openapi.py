"""The OpenAPI document the gateway serves, tested against a running gateway and worker with
schemathesis, as central's is: every documented operation gets parameters and bodies that fit the
document and ones that do not; none may answer 500, every answer must be one the document lists, of
its content type and schema, and what does not fit the document must be refused. Requests that fit
go to a model that does not exist and, once more, to the live ``echo`` model (version 1), so the
infer path's checks and answers are held to the document too."""

from __future__ import annotations

import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from shoal.gateway.openapi import endpoint_list
from shoal.local import LocalCluster

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 10  # per operation, mode and target


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_repo):
    # With result storage, so that its endpoints are in the document and held to it too.
    work = tmp_path_factory.mktemp("openapi")
    store = ["--store-results", f"sqlite:///{work / 'results.db'}", "--results-dir", str(work / "results")]
    lc = LocalCluster(work, name="openapi", gateway_args=["--startup-grace", "0", *store])
    lc.start()
    try:
        lc.add_worker("echo", repo=model_repo)
        lc.wait_workers("echo", 1)
        headers = {"Authorization": f"Bearer {lc.api_key}"}
        r = httpx.get(f"{lc.url}/v2/openapi.json", headers=headers)
        assert r.status_code == 200
        yield lc, r.json(), headers
    finally:
        lc.stop()


def _exercise(url: str, operation, mode, headers: dict[str, str], live: bool) -> None:
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode is GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)  # what the document does not allow is refused

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        if live and case.path_parameters:
            case.path_parameters = {k: ("echo" if k == "model" else "1") for k in case.path_parameters}
        response = case.call(base_url=url, headers=headers, timeout=30)
        case.validate_response(response, checks=checks)

    run()


def test_every_documented_operation_holds_to_the_document(gateway):
    lc, doc, headers = gateway
    schema = schemathesis.openapi.from_dict(doc)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} == endpoint_list(results=True)
    for operation in operations:
        raw = operation.definition.raw
        auth = headers if raw.get("security") else {}
        negatable = "parameters" in raw or "requestBody" in raw
        _exercise(lc.url, operation, GenerationMode.POSITIVE, auth, live=False)
        if "parameters" in raw:
            _exercise(lc.url, operation, GenerationMode.POSITIVE, auth, live=True)
        if negatable:
            _exercise(lc.url, operation, GenerationMode.NEGATIVE, auth, live=False)
    # The gateway still serves, and the document needs credentials like everything but liveness.
    assert httpx.get(f"{lc.url}/v2/openapi.json").status_code == 401
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    r = httpx.post(f"{lc.url}/v2/models/echo/infer", json=body, headers=headers)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1.0, 2.0]
    # The stored result (written in the background), listed and read as the document says.
    rid = r.json()["id"]
    end = time.monotonic() + 20
    while (one := httpx.get(f"{lc.url}/v2/results/{rid}", headers=headers)).status_code != 200:
        assert time.monotonic() < end, "the result was never stored"
    assert isinstance(one.json(), dict)
    listed = httpx.get(f"{lc.url}/v2/results", params={"model": "echo", "limit": 5}, headers=headers)
    assert listed.status_code == 200 and isinstance(listed.json(), list)
