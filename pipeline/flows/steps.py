"""The observation pipeline's steps as data: notebooks, products, parameters.

Pure functions only (no Prefect, no I/O beyond checksums): which notebook each step
runs, which products it reads and makes, how ``observation_data`` is validated, and
how a step's notebook parameters are built from its input products.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipeline
from pipeline.errors import ObservationDataError
from pipeline.types import FlowType, ObservationStatus

__all__ = [
    "HEADER_OVERRIDES",
    "OBSERVATION_KEYS",
    "STEPS",
    "STEP_ORDER",
    "ObservationRequest",
    "Step",
    "input_key",
    "notebook_parameters",
    "notebooks_dir",
    "parse_observation_data",
    "producer_of",
]

#: Header facts that ``observation_data`` may override for the science image.
HEADER_OVERRIDES = ("gain", "read_noise", "saturation", "exptime", "band", "mjd")

#: Every key ``observation_data`` may carry, with what it means.
OBSERVATION_KEYS: dict[str, str] = {
    "science_path": "science image FITS (required)",
    "reference_path": "reference image FITS of the same field (required)",
    "band": "filter band (overrides the header)",
    "mjd": "MJD of the science exposure (overrides the header)",
    "gain": "science gain, e-/ADU (overrides the header)",
    "read_noise": "science read noise, e- (overrides the header)",
    "saturation": "science saturation level, ADU (overrides the header)",
    "exptime": "science exposure time, s (overrides the header)",
    "instrument": "instrument name, recorded with the observation",
    "reference_overrides": "the same header overrides for the reference image (object)",
    "catalog_path": "optional catalogue (ECSV/FITS/CSV with ra/dec) to cross-match with",
    "observation_id": "resume this existing observation",
    "force": "rerun every step even if an identical earlier run is cached (bool)",
    "output_dir": "also write candidates.ecsv and reports/<step>.html here",
}


@dataclass(frozen=True)
class Step:
    """One step of the observation pipeline.

    Attributes
    ----------
    name : str
        Short name (``ingestion`` ... ``validation``).
    notebook : str
        Notebook file in ``notebooks/observations``.
    flow_type : FlowType
    done : ObservationStatus
        Status of an observation whose last successful step is this one.
    needs : tuple of str
        Product kinds this step reads.
    makes : dict
        ``outputs.json["products"]`` name -> product kind recorded in the catalogue.
    """

    name: str
    notebook: str
    flow_type: FlowType
    done: ObservationStatus
    needs: tuple[str, ...]
    makes: dict[str, str] = field(default_factory=dict)

    @property
    def flow_name(self) -> str:
        """Name of the Prefect flow that runs this step."""
        return self.flow_type.value

    @property
    def index(self) -> int:
        """Position in the pipeline, from 0."""
        return STEP_ORDER.index(self.name)


STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        Step(
            "ingestion",
            "01_ingestion.ipynb",
            FlowType.OBSERVATION_INGESTION,
            ObservationStatus.INGESTED,
            ("raw_science", "raw_reference"),
            {"science": "science", "reference": "reference"},
        ),
        Step(
            "preprocessing",
            "02_preprocessing.ipynb",
            FlowType.OBSERVATION_PREPROCESSING,
            ObservationStatus.PREPROCESSED,
            ("science", "reference"),
            {"preprocessed": "preprocessed"},
        ),
        Step(
            "differencing",
            "03_differencing.ipynb",
            FlowType.OBSERVATION_DIFFERENCING,
            ObservationStatus.DIFFERENCED,
            ("preprocessed",),
            {"difference": "difference"},
        ),
        Step(
            "detection",
            "04_detection.ipynb",
            FlowType.OBSERVATION_DETECTION,
            ObservationStatus.DETECTED,
            ("preprocessed", "difference"),
            {"detections": "detections", "cutouts": "cutouts"},
        ),
        Step(
            "validation",
            "05_validation.ipynb",
            FlowType.OBSERVATION_VALIDATION,
            ObservationStatus.VALIDATED,
            ("detections", "preprocessed", "difference"),
            {"candidates": "candidates"},
        ),
    )
}
STEP_ORDER: tuple[str, ...] = tuple(STEPS)


def producer_of(kind: str) -> str:
    """Name of the step that makes a product kind (raw inputs come with ingestion)."""
    if kind.startswith("raw_"):
        return "ingestion"
    for step in STEPS.values():
        if kind in step.makes.values():
            return step.name
    raise KeyError(f"no step makes products of kind {kind!r}")


@dataclass(frozen=True)
class ObservationRequest:
    """A validated ``observation_data``."""

    science_path: Path
    reference_path: Path
    overrides: dict[str, Any]
    reference_overrides: dict[str, Any]
    instrument: str | None = None
    catalog_path: Path | None = None
    observation_id: uuid.UUID | None = None
    force: bool = False
    output_dir: Path | None = None

    def metadata(self) -> dict[str, Any]:
        """What the catalogue records about the request."""
        return {
            "science_path": str(self.science_path),
            "reference_path": str(self.reference_path),
            "overrides": self.overrides,
            "reference_overrides": self.reference_overrides,
            "instrument": self.instrument,
            "catalog_path": str(self.catalog_path) if self.catalog_path else None,
        }


def parse_observation_data(data: Any) -> ObservationRequest:
    """Validate ``observation_data`` and resolve its paths.

    Raises
    ------
    ObservationDataError
        Naming the key and the problem: not an object, unknown key, missing path,
        a value of the wrong type.
    """
    if not isinstance(data, Mapping):
        raise ObservationDataError(
            f"observation_data must be a JSON object, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(OBSERVATION_KEYS))
    if unknown:
        known = ", ".join(OBSERVATION_KEYS)
        raise ObservationDataError(
            f"observation_data has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known keys: {known}"
        )
    paths = {}
    for key in ("science_path", "reference_path"):
        value = data.get(key)
        if not isinstance(value, str | Path) or not str(value).strip():
            raise ObservationDataError(
                f"observation_data[{key!r}] is required: the path of the "
                f"{key.split('_')[0]} FITS image"
            )
        paths[key] = Path(value).expanduser().resolve()
    overrides = {key: _override(key, data[key]) for key in HEADER_OVERRIDES if key in data}
    reference_overrides = data.get("reference_overrides") or {}
    if not isinstance(reference_overrides, Mapping):
        raise ObservationDataError("observation_data['reference_overrides'] must be an object")
    bad = sorted(set(reference_overrides) - set(HEADER_OVERRIDES))
    if bad:
        raise ObservationDataError(
            f"observation_data['reference_overrides'] has unknown key(s) {', '.join(bad)}; "
            f"allowed: {', '.join(HEADER_OVERRIDES)}"
        )
    reference_overrides = {k: _override(k, v) for k, v in reference_overrides.items()}
    observation_id = data.get("observation_id")
    if observation_id is not None:
        try:
            observation_id = uuid.UUID(str(observation_id))
        except ValueError:
            raise ObservationDataError(
                f"observation_data['observation_id'] is not a UUID: {observation_id!r}"
            ) from None
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise ObservationDataError(f"observation_data['force'] must be true or false: {force!r}")
    catalog = data.get("catalog_path") or None
    output_dir = data.get("output_dir") or None
    instrument = data.get("instrument")
    if instrument is not None and not isinstance(instrument, str):
        raise ObservationDataError("observation_data['instrument'] must be a string")
    return ObservationRequest(
        science_path=paths["science_path"],
        reference_path=paths["reference_path"],
        overrides=overrides,
        reference_overrides=reference_overrides,
        instrument=instrument,
        catalog_path=Path(catalog).expanduser().resolve() if catalog else None,
        observation_id=observation_id,
        force=force,
        output_dir=Path(output_dir).expanduser().resolve() if output_dir else None,
    )


def _override(key: str, value: Any) -> Any:
    if key == "band":
        if not isinstance(value, str) or not value.strip():
            raise ObservationDataError(f"observation_data[{key!r}] must be a non-empty string")
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ObservationDataError(f"observation_data[{key!r}] must be a finite number: {value!r}")
    return float(value)


def input_key(checksums: Mapping[str, str], request: ObservationRequest) -> str:
    """Identity of an observation: its raw inputs' checksums and the overrides."""
    blob = json.dumps(
        {
            "checksums": dict(sorted(checksums.items())),
            "overrides": request.overrides,
            "reference_overrides": request.reference_overrides,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def notebook_parameters(
    step: Step,
    inputs: Mapping[str, Path],
    *,
    observation_id: uuid.UUID,
    metadata: Mapping[str, Any],
    model: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Parameters of a step's notebook (``output_dir`` is added by the runner).

    Parameters
    ----------
    step : Step
    inputs : mapping
        Local path of each product kind in ``step.needs`` (and ``catalog`` if any).
    observation_id : UUID
    metadata : mapping
        The observation's recorded metadata (overrides, catalogue path...).
    model : mapping, optional
        The deployed real/bogus model for the validation step: ``path``, ``version``
        and ``score_reference`` (its training score histogram, may be None).
    """
    params: dict[str, Any] = {"observation_id": str(observation_id)}
    if step.name == "ingestion":
        params.update(
            science_path=str(inputs["raw_science"]),
            reference_path=str(inputs["raw_reference"]),
            observation_data=dict(metadata.get("overrides") or {}),
            reference_overrides=dict(metadata.get("reference_overrides") or {}),
        )
    elif step.name == "preprocessing":
        params.update(science_path=str(inputs["science"]), reference_path=str(inputs["reference"]))
    elif step.name == "differencing":
        params.update(preprocessed_path=str(inputs["preprocessed"]))
    elif step.name == "detection":
        params.update(
            preprocessed_path=str(inputs["preprocessed"]),
            difference_path=str(inputs["difference"]),
        )
    elif step.name == "validation":
        params.update(
            detections_path=str(inputs["detections"]),
            preprocessed_path=str(inputs["preprocessed"]),
            difference_path=str(inputs["difference"]),
            catalog_path=str(inputs["catalog"]) if "catalog" in inputs else "",
        )
        if model is not None:
            params.update(
                model_path=str(model["path"]),
                model_version=str(model["version"]),
                score_reference=list(model.get("score_reference") or []),
            )
    else:  # pragma: no cover - STEPS is closed
        raise KeyError(step.name)
    return params


def notebooks_dir() -> Path:
    """Folder of the observation notebooks (``notebooks/observations`` in the project)."""
    folder = Path(pipeline.__file__).resolve().parents[1] / "notebooks" / "observations"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"observation notebooks not found at {folder}: run from a checkout of the "
            "project (pip install -e .) so the notebooks sit next to the package"
        )
    return folder
