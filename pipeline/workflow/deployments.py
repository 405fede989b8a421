"""One Prefect deployment per observation flow, served by ``astr worker``.

A flow started from a deployment runs in its own process under the worker, so Prefect
can cancel it: the worker stops that process, the runner kills the notebook's kernel
and keeps the partial notebook, marked cancelled.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEPLOYMENT_NAME", "deployment_path", "observation_deployments", "serve_flows"]

#: Name every pipeline deployment has (``<flow name>/astr``).
DEPLOYMENT_NAME = "astr"


def deployment_path(flow_name: str) -> str:
    """``<flow>/<deployment>`` as ``run_deployment`` wants it."""
    return f"{flow_name}/{DEPLOYMENT_NAME}"


def observation_deployments() -> list[Any]:
    """Deployments of the five step flows and the pipeline flow."""
    from pipeline.flows.observations import STEP_FLOWS, observation_pipeline_flow

    flows = [*STEP_FLOWS.values(), observation_pipeline_flow]
    return [
        flow.to_deployment(
            name=DEPLOYMENT_NAME,
            tags=["astr", "observation"],
            description=(flow.description or "").strip().splitlines()[0]
            if flow.description
            else None,
        )
        for flow in flows
    ]


def serve_flows(limit: int | None = None) -> None:
    """Serve the pipeline's deployments until interrupted (at most ``limit`` runs at once)."""
    from prefect import serve

    serve(*observation_deployments(), limit=limit, print_starting_message=True)
