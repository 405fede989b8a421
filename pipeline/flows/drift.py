"""The nightly score-drift check of the deployed real/bogus model.

Compares the scores the model behind an environment gave the candidates of a night
(the last 24 hours by default) with its scores on its own training candidates, by the
population stability index, and records the result on the model's MLflow run
(``drift_psi``, ``drift_n_scores``, timestamped at the window's end). Served by
``astr worker`` as a deployment, so Prefect can schedule it every morning.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
from prefect import flow, get_run_logger

from pipeline.config import get_config
from pipeline.errors import AstrError
from pipeline.flows.runtime import get_catalogue, model_registry
from pipeline.ml.drift import PSI_ALERT, check_drift
from pipeline.workflow.monitoring import monitoring_hooks

__all__ = ["drift_window", "score_drift_flow"]


def drift_window(since: str | None, until: str | None) -> tuple[datetime, datetime]:
    """The [since, until) window: ISO 8601 times (UTC when no zone); default the last day.

    Raises
    ------
    AstrError
        Naming a time that does not parse, or an empty window.
    """

    def parse(text: str, name: str) -> datetime:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise AstrError(
                f"{name} {text!r} is not an ISO 8601 time (e.g. 2026-11-28T12:00)"
            ) from None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    end = parse(until, "until") if until else datetime.now(UTC)
    start = parse(since, "since") if since else end - timedelta(days=1)
    if start >= end:
        raise AstrError(f"empty window: since {start.isoformat()} is not before {end.isoformat()}")
    return start, end


@flow(name="score_drift", log_prints=True, **monitoring_hooks())
def score_drift_flow(
    since: str | None = None, until: str | None = None, environment: str = "production"
) -> dict:
    """PSI of the night's scores against the deployed model's training scores; recorded.

    Only candidates scored by the version now behind ``environment`` count; those
    scored by earlier versions are reported but left out.
    """
    settings = get_config()
    start, end = drift_window(since, until)
    registry = model_registry(settings)
    version = registry.holder(environment)
    if version is None:
        raise AstrError(f"no model is deployed to {environment}: nothing to check")
    record = registry.version_record(version)
    text = record.tags.get("score_histogram")
    if not text:
        raise AstrError(
            f"v{version} has no training score histogram (it was logged without one): "
            "retrain it (astr retrain) to get a drift reference"
        )
    reference = json.loads(text)
    found = get_catalogue(settings).scores_between(start, end)
    ours = np.array([score for score, model in found if model == str(version)], dtype=float)
    check = check_drift(reference, ours)
    stamp = int(end.timestamp() * 1000)
    if check.n_scores:
        registry.client.log_metric(record.run_id, "drift_psi", check.psi, timestamp=stamp)
    registry.client.log_metric(
        record.run_id, "drift_n_scores", float(check.n_scores), timestamp=stamp
    )
    logger = get_run_logger()
    say = logger.warning if check.n_scores and check.psi >= PSI_ALERT else logger.info
    say(
        "v%d (%s) from %s to %s: PSI %.3f over %d scores (%s)",
        version,
        environment,
        start.isoformat(timespec="minutes"),
        end.isoformat(timespec="minutes"),
        check.psi,
        check.n_scores,
        check.level,
    )
    return {
        "model_id": str(version),
        "environment": environment,
        "since": start.isoformat(),
        "until": end.isoformat(),
        **check.to_dict(),
        "other_models_scores": len(found) - check.n_scores,
    }
