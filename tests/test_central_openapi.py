"""The OpenAPI document central serves, tested against a running central with schemathesis: every
documented operation gets bodies, parameters and queries that fit the document and ones that do not;
none may answer 500, every answer must be one the document lists, of its content type and schema,
and what does not fit the document must be refused."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from test_central_server import OPERATOR, CentralProc

from shoal.central.server import endpoint_list

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 12  # per operation and mode: about 400 requests in all


def _basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    # A short long poll, so a generated `wait` cannot hold the test for a minute.
    c = CentralProc(tmp_path_factory.mktemp("openapi"), extra=["--startup-grace", "0", "--max-wait", "0.2"]).start()
    try:
        device = c.account("device", "fuzz-cam")
        cluster = c.account("cluster", "fuzz-site")
        credentials = {"operator": _basic(*OPERATOR), "device": _basic(*device), "cluster": _basic(*cluster)}
        yield c, schemathesis.openapi.from_url(c.url + "/v1/openapi.json"), credentials
    finally:
        c.stop()


def _kind(operation) -> str | None:
    """The account kind an operation's description names ("Credentials: device (Basic)")."""
    text = operation.definition.raw.get("description", "")
    return text.removeprefix("Credentials: ").split(" ")[0] if text.startswith("Credentials:") else None


def _exercise(url: str, operation, mode, headers: dict[str, str]) -> None:
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode is GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)  # what the document does not allow is refused

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call(base_url=url, headers=headers, timeout=30)
        case.validate_response(response, checks=checks)

    run()


def test_every_documented_operation_holds_to_the_document(api):
    central, schema, credentials = api
    operations = [r.ok() for r in schema.get_all_operations()]
    # Every operation central serves, but the document itself (schemathesis leaves its own URL out).
    assert {(o.method.upper(), o.path) for o in operations} == set(endpoint_list()) - {("GET", "/v1/openapi.json")}
    for operation in operations:
        kind = _kind(operation)
        headers = {"Authorization": credentials[kind]} if kind else {}
        raw = operation.definition.raw
        negatable = "parameters" in raw or "requestBody" in raw  # else nothing can be made invalid
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if negatable else (GenerationMode.POSITIVE,):
            _exercise(central.url, operation, mode, headers)
    # Central is still up and answers as before.
    assert central.call("GET", "/v1/health", auth=None)[0] == 200
