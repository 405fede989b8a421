"""The API's contract: tokens, errors for bad ids, bodies and transitions, its schema."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import schemathesis
from apistack import TOKENS, ApiStack
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from pipeline.api.auth import token_checker, token_matches
from pipeline.config import load_config
from pipeline.errors import ConfigError

pytestmark = pytest.mark.integration

# Examples per route and mode of the schema-generated requests (more: API_EXAMPLES=200).
EXAMPLES = int(os.environ.get("API_EXAMPLES", "15"))
NO_SUCH_RUN = "0b6f2a3c-7d1e-4f5a-9c8b-1a2b3c4d5e6f"
PROTECTED = [
    ("GET", "/workflows/flows"),
    ("GET", "/metrics"),
    ("POST", "/workflows/flows/observation_pipeline/start"),
    ("GET", f"/workflows/flows/{NO_SUCH_RUN}/status"),
    ("POST", f"/workflows/flows/{NO_SUCH_RUN}/cancel"),
    ("GET", f"/workflows/flows/{NO_SUCH_RUN}/logs"),
    ("GET", f"/workflows/flows/{NO_SUCH_RUN}/metrics"),
    ("POST", f"/workflows/flows/{NO_SUCH_RUN}/retry"),
]


def test_token_comparison():
    assert token_matches("abc", ["x", "abc"])
    assert not token_matches("abd", ["abc"])
    assert not token_matches("", ["abc"])
    assert not token_matches("abc", [])


def test_authentication_without_tokens_refuses_to_start():
    config = load_config(environ={"ASTR_AUTHENTICATION_ENABLED": "true"})
    with pytest.raises(ConfigError, match="ASTR_API_TOKENS"):
        token_checker(config)


def test_the_api_will_not_listen_beyond_loopback_without_tokens():
    done = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "api", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "ASTR_AUTHENTICATION_ENABLED" in done.stderr


def test_requests_without_or_with_a_wrong_token_are_refused(api_only: ApiStack):
    with httpx.Client(base_url=api_only.url, timeout=30) as bare:
        assert bare.get("/health").status_code == 200
        for method, path in PROTECTED:
            missing = bare.request(method, path)
            assert missing.status_code == 401, (method, path, missing.text)
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = bare.request(method, path, headers={"Authorization": "Bearer not-a-token"})
            assert wrong.status_code == 403, (method, path, wrong.text)
            basic = bare.request(method, path, headers={"Authorization": "Basic dXNlcjpwdw=="})
            assert basic.status_code == 401
    with api_only.client(TOKENS[1]) as second:
        assert second.get("/workflows/flows").status_code == 200


def test_unknown_or_malformed_ids_are_404(api_only: ApiStack):
    with api_only.client() as client:
        for method, path in PROTECTED[3:]:
            answer = client.request(method, path)
            assert answer.status_code == 404, (path, answer.text)
            assert NO_SUCH_RUN in answer.json()["detail"]
        assert client.get("/workflows/flows/not-a-uuid/status").status_code == 404


def test_bad_parameters_are_422_naming_the_field(api_only: ApiStack):
    start = "/workflows/flows/{}/start".format
    with api_only.client() as client:
        cases = [
            ("observation_pipeline", {}, ["body", "observation_data"]),
            (
                "observation_pipeline",
                {"observation_data": {"reference_path": "/r.fits"}},
                ["body", "observation_data", "science_path"],
            ),
            (
                "observation_pipeline",
                {"observation_data": {"science_path": "/s", "reference_path": "/r", "gain": "x"}},
                ["body", "observation_data", "gain"],
            ),
            ("observation_pipeline", {"observation_data": [1, 2]}, ["body", "observation_data"]),
            ("observation_preprocessing", {"observation_id": "nope"}, ["body", "observation_id"]),
            ("model_training", {"dataset_id": "d", "config": {}, "epochs": 3}, ["body", "epochs"]),
            (
                "hyperparameter_optimization",
                {"model_type": "cnn", "search_space": {"lr": {"type": "float"}}},
                ["body", "search_space", "lr"],
            ),
            (
                "hyperparameter_optimization",
                {"model_type": "transformer", "search_space": {}},
                ["body", "model_type"],
            ),
            ("model_deployment", {"model_id": "latest", "environment": "x"}, ["body", "model_id"]),
        ]
        for flow, body, location in cases:
            answer = client.post(start(flow), json=body)
            assert answer.status_code == 422, (flow, body, answer.text)
            locations = [item["loc"] for item in answer.json()["detail"]]
            assert location in locations, (flow, body, locations)
        typo = client.get("/workflows/flows", params={"flowtype": "model_training"})
        assert typo.status_code == 422
        assert typo.json()["detail"][0]["loc"] == ["query", "flowtype"]
        naive = client.get("/workflows/flows", params={"since": "1700000000"})
        assert naive.status_code == 422 and "RFC 3339" in naive.text
        array = client.post(start("observation_pipeline"), json=[1])
        assert array.status_code == 422
        unknown = client.post(start("no_such_flow"), json={})
        assert unknown.status_code == 422
        assert "observation_pipeline" in unknown.text  # the allowed flow types are listed
        # nothing was created by any of these
        assert client.get("/workflows/flows").json()["total"] == 0


def test_illegal_transitions_are_409(api_only: ApiStack):
    body = {"observation_data": {"science_path": "/s.fits", "reference_path": "/r.fits"}}
    with api_only.client() as client:
        started = client.post("/workflows/flows/observation_pipeline/start", json=body)
        assert started.status_code == 202, started.text
        flow_id = started.json()["flow_id"]
        assert client.post(f"/workflows/flows/{flow_id}/retry").status_code == 409  # waiting
        cancelled = client.post(f"/workflows/flows/{flow_id}/cancel")
        assert cancelled.status_code == 202
        assert cancelled.json()["status"] == "CANCELLED"  # never started: cancelled at once
        assert client.post(f"/workflows/flows/{flow_id}/cancel").status_code == 409
        listed = client.get("/workflows/flows", params={"status": "CANCELLED"}).json()
        assert [item["flow_id"] for item in listed["items"]] == [flow_id]
        retried = client.post(f"/workflows/flows/{flow_id}/retry")
        assert retried.status_code == 202 and retried.json()["status"] == "PENDING"
        assert client.post(f"/workflows/flows/{flow_id}/cancel").status_code == 202


def test_prometheus_metrics(api_only: ApiStack):
    with api_only.client() as client:
        client.get("/workflows/flows")
        text = client.get("/metrics").text
    assert 'astr_api_requests_total{method="GET",route="/workflows/flows",status="200"}' in text
    assert "astr_api_request_seconds_bucket" in text
    assert "# TYPE astr_flow_runs gauge" in text


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_route_answers_500_or_breaks_its_schema(api_only: ApiStack, mode: str):
    """Requests generated from the OpenAPI schema (valid ones, then invalid ones)."""
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{api_only.url}/openapi.json")
    headers = {"Authorization": f"Bearer {api_only.token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 9
    tested = 0
    for operation in operations:

        @given(case=operation.as_strategy(GenerationMode(mode)))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case):
            case.call_and_validate(
                headers=headers,
                additional_checks=[not_a_server_error],
                # a body the schema allows may still be refused (422) by the flow's checks
                excluded_checks=[positive_data_acceptance],
            )

        try:
            call()
        except Unsatisfiable:  # no invalid request exists (a route without inputs)
            assert mode == "negative", operation.label
            continue
        tested += 1
    assert tested >= (9 if mode == "positive" else 6)
