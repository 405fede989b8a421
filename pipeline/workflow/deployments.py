"""One Prefect deployment per pipeline flow (observation and model), served by ``astr worker``.

A flow started from a deployment runs in its own process under the worker, so Prefect
can cancel it: the worker stops that process, the runner kills the notebook's kernel
and keeps the partial notebook, marked cancelled.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = [
    "DEPLOYMENT_NAME",
    "deployment_path",
    "model_deployments",
    "model_flows",
    "observation_deployments",
    "observation_flows",
    "serve_flows",
    "served_flows",
]

#: Name every pipeline deployment has (``<flow name>/astr``).
DEPLOYMENT_NAME = "astr"


def deployment_path(flow_name: str) -> str:
    """``<flow>/<deployment>`` as ``run_deployment`` wants it."""
    return f"{flow_name}/{DEPLOYMENT_NAME}"


def observation_flows() -> list[Any]:
    """The five step flows and the pipeline flow."""
    from pipeline.flows.observations import STEP_FLOWS, observation_pipeline_flow

    return [*STEP_FLOWS.values(), observation_pipeline_flow]


def model_flows() -> list[Any]:
    """The model flows (dataset, training, search, evaluation, deployment, drift...)."""
    from pipeline.flows import training
    from pipeline.flows.drift import score_drift_flow

    return [
        score_drift_flow,
        training.candidate_dataset_flow,
        training.model_training_flow,
        training.hyperparameter_optimization_flow,
        training.model_evaluation_flow,
        training.model_deployment_flow,
        training.model_rollback_flow,
        training.model_retraining_flow,
    ]


@functools.cache
def served_flows() -> dict[str, Any]:
    """Every flow ``astr worker`` serves, by flow name (``observation_pipeline``...).

    Built once per process (the API looks a flow up on every request); do not mutate.
    """
    return {flow.name: flow for flow in [*observation_flows(), *model_flows()]}


def observation_deployments() -> list[Any]:
    """Deployments of the five step flows and the pipeline flow."""
    return _deployments(observation_flows(), "observation")


def model_deployments() -> list[Any]:
    """Deployments of the model flows (training, search, evaluation, deployment...)."""
    return _deployments(model_flows(), "model")


def _deployments(flows: list[Any], tag: str) -> list[Any]:
    return [
        flow.to_deployment(
            name=DEPLOYMENT_NAME,
            tags=["astr", tag],
            description=(flow.description or "").strip().splitlines()[0]
            if flow.description
            else None,
        )
        for flow in flows
    ]


def serve_flows(limit: int | None = None) -> None:
    """Serve the pipeline's deployments until interrupted (at most ``limit`` runs at once)."""
    from prefect import serve

    serve(
        *observation_deployments(),
        *model_deployments(),
        limit=limit,
        print_starting_message=True,
    )
