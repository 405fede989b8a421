"""One Prefect deployment per pipeline flow (observation and model), served by ``astr worker``.

A flow started from a deployment runs in its own process under the worker, so Prefect
can cancel it: the worker stops that process, the runner kills the notebook's kernel
and keeps the partial notebook, marked cancelled.

The ``observation_pipeline`` deployment carries a Prefect deployment concurrency limit of
``max_concurrent_flows``. The server enforces it when a run goes PENDING, whichever
worker on whichever host proposes it, so no more than that many of its runs are ever
PENDING or RUNNING at once, and the runs' state histories show it
(:func:`pipeline.workflow.concurrency.max_overlap`).
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = [
    "DEPLOYMENT_NAME",
    "LIMITED_FLOWS",
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

#: Flows whose deployment has a concurrency limit of ``max_concurrent_flows``.
LIMITED_FLOWS = ("observation_pipeline",)


def deployment_path(flow_name: str) -> str:
    """``<flow>/<deployment>`` as ``run_deployment`` wants it."""
    return f"{flow_name}/{DEPLOYMENT_NAME}"


def observation_flows() -> list[Any]:
    """The five step flows, the pipeline flow and the batch (a night's manifest) flow."""
    from pipeline.flows.batch import observation_batch_flow
    from pipeline.flows.observations import STEP_FLOWS, observation_pipeline_flow

    return [*STEP_FLOWS.values(), observation_pipeline_flow, observation_batch_flow]


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


def observation_deployments(max_concurrent_flows: int | None = None) -> list[Any]:
    """Deployments of the observation flows (steps, pipeline, batch).

    Parameters
    ----------
    max_concurrent_flows : int, optional
        Concurrency limit of the ``observation_pipeline`` deployment (default: the
        setting). Every worker applies it when it starts; they should agree.
    """
    if max_concurrent_flows is None:
        from pipeline.config import get_config

        max_concurrent_flows = get_config().max_concurrent_flows
    return _deployments(observation_flows(), "observation", max_concurrent_flows)


def model_deployments() -> list[Any]:
    """Deployments of the model flows (training, search, evaluation, deployment...)."""
    return _deployments(model_flows(), "model", None)


def _deployments(flows: list[Any], tag: str, limit: int | None) -> list[Any]:
    return [
        flow.to_deployment(
            name=DEPLOYMENT_NAME,
            tags=["astr", tag],
            description=(flow.description or "").strip().splitlines()[0]
            if flow.description
            else None,
            concurrency_limit=_limit(limit) if flow.name in LIMITED_FLOWS else None,
        )
        for flow in flows
    ]


def _limit(limit: int | None) -> Any:
    """Queue runs over the limit (the server retries them), never cancel them."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    if limit is None:
        return None
    return ConcurrencyLimitConfig(limit=limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def serve_flows(limit: int | None = None) -> None:
    """Serve the pipeline's deployments until interrupted (at most ``limit`` runs at once).

    The runs it starts send heartbeats, and the server marks a run whose heartbeats stop
    CRASHED (:mod:`pipeline.workflow.heartbeats`): a run whose worker died can be retried.
    """
    from prefect import serve

    from pipeline.workflow.heartbeats import ensure_crash_detection, worker_heartbeats

    ensure_crash_detection(worker_heartbeats())
    serve(
        *observation_deployments(),  # observation_pipeline limited to max_concurrent_flows
        *model_deployments(),
        limit=limit,
        print_starting_message=True,
    )
