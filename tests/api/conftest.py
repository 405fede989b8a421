"""A real API process and a real worker against the session's Prefect server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from apistack import ApiStack, running_stack


@pytest.fixture(scope="module")
def api_stack(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    """``astr worker`` and ``astr api`` (tokens required) sharing one project home."""
    with running_stack(prefect_server, tmp_path_factory.mktemp("api-stack")) as stack:
        yield stack


@pytest.fixture(scope="module")
def api_only(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    """``astr api`` without a worker: started runs wait, and are cancelled at the end.

    The flows' deployments are registered (as a worker would) so that starts succeed.
    """
    from pipeline.workflow.deployments import model_deployments, observation_deployments

    for deployment in [*observation_deployments(), *model_deployments()]:
        deployment.apply()
    with running_stack(prefect_server, tmp_path_factory.mktemp("api-only"), workers=0) as stack:
        yield stack
