"""Pure pieces of the flows: observation_data validation, identity, parameters, manifests."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from astropy.table import Table

from pipeline.demo import score_candidates
from pipeline.errors import ObservationDataError
from pipeline.flows.steps import (
    STEP_ORDER,
    STEPS,
    input_key,
    notebook_parameters,
    notebooks_dir,
    parse_observation_data,
    producer_of,
)
from pipeline.flows.submit import read_manifest


def test_steps_chain_products():
    assert STEP_ORDER == ("ingestion", "preprocessing", "differencing", "detection", "validation")
    made = {"raw_science", "raw_reference"}
    for name in STEP_ORDER:  # every step reads only what an earlier step made
        assert set(STEPS[name].needs) <= made, name
        made |= set(STEPS[name].makes.values())
        assert (notebooks_dir() / STEPS[name].notebook).is_file()
    assert producer_of("difference") == "differencing"
    assert producer_of("raw_science") == "ingestion"
    with pytest.raises(KeyError):
        producer_of("nonsense")


def test_parse_observation_data(tmp_path):
    request = parse_observation_data(
        {
            "science_path": "s.fits",
            "reference_path": str(tmp_path / "r.fits"),
            "band": " i ",
            "mjd": 60000,
            "reference_overrides": {"gain": 2},
            "force": True,
        }
    )
    assert request.science_path.is_absolute() and request.overrides == {
        "band": "i",
        "mjd": 60000.0,
    }
    assert request.reference_overrides == {"gain": 2.0} and request.force


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"reference_path": "r"}, "'science_path'] is required"),
        ({"science_path": "s", "reference_path": "r", "sciense": 1}, "unknown key"),
        ({"science_path": "s", "reference_path": "r", "mjd": "soon"}, "'mjd'] must be a finite"),
        ({"science_path": "s", "reference_path": "r", "gain": float("nan")}, "finite"),
        ({"science_path": "s", "reference_path": "r", "band": ""}, "non-empty string"),
        ({"science_path": "s", "reference_path": "r", "force": "yes"}, "true or false"),
        ({"science_path": "s", "reference_path": "r", "observation_id": "x"}, "not a UUID"),
        (
            {"science_path": "s", "reference_path": "r", "reference_overrides": {"zp": 1}},
            "unknown key",
        ),
    ],
)
def test_bad_observation_data_is_named(data, message):
    with pytest.raises(ObservationDataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_observation_data(data)


def test_input_key_depends_on_checksums_and_overrides():
    base = parse_observation_data({"science_path": "s", "reference_path": "r"})
    banded = parse_observation_data({"science_path": "s", "reference_path": "r", "band": "g"})
    sums = {"raw_science": "a" * 64, "raw_reference": "b" * 64}
    assert input_key(sums, base) == input_key(dict(reversed(sums.items())), base)
    assert input_key(sums, base) != input_key(sums, banded)
    assert input_key(sums, base) != input_key({**sums, "raw_science": "c" * 64}, base)


def test_notebook_parameters_wire_the_products():
    oid = uuid.uuid4()
    paths = {k: Path(f"/p/{k}") for k in ("preprocessed", "difference", "detections", "catalog")}
    params = notebook_parameters(STEPS["validation"], paths, observation_id=oid, metadata={})
    assert params == {
        "observation_id": str(oid),
        "detections_path": "/p/detections",
        "preprocessed_path": "/p/preprocessed",
        "difference_path": "/p/difference",
        "catalog_path": "/p/catalog",
    }
    ingest = notebook_parameters(
        STEPS["ingestion"],
        {"raw_science": Path("/s"), "raw_reference": Path("/r")},
        observation_id=oid,
        metadata={"overrides": {"band": "i"}},
    )
    assert ingest["observation_data"] == {"band": "i"} and ingest["reference_overrides"] == {}


def test_manifest_reading(tmp_path):
    (tmp_path / "night.csv").write_text(
        "name,science_path,reference_path,mjd,band\n"
        "a,sci.fits,/abs/ref.fits,60000.5,i\n"
        ",b.fits,r.fits,,\n"
    )
    items = read_manifest(tmp_path / "night.csv")
    assert items[0] == (
        "a",
        {
            "science_path": str(tmp_path / "sci.fits"),
            "reference_path": "/abs/ref.fits",
            "mjd": 60000.5,
            "band": "i",
        },
    )
    assert items[1][0] == "row-002" and "mjd" not in items[1][1]
    (tmp_path / "bad.csv").write_text("science_path,reference_path,zp\ns,r,1\n")
    with pytest.raises(ObservationDataError, match="unknown column"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "nan.csv").write_text("science_path,reference_path,mjd\ns,r,soon\n")
    with pytest.raises(ObservationDataError, match="line 2: mjd must be a number"):
        read_manifest(tmp_path / "nan.csv")
    with pytest.raises(ObservationDataError, match="cannot read manifest"):
        read_manifest(tmp_path / "absent.csv")


def test_demo_scoring_counts_matches_within_radius():
    truth = Table(
        {"x_ref": [10.0, 50.0, 90.0], "y_ref": [10.0, 50.0, 90.0], "snr_injected": [20.0, 5.0, 8.0]}
    )
    found = Table(
        {
            "x": [10.5, 49.0, 200.0, 90.0],
            "y": [10.0, 51.5, 200.0, 90.0],
            "passed": [True, True, True, False],
        }
    )
    score = score_candidates(found, truth)
    assert (score.injected, score.detectable, score.recovered) == (3, 2, 2)
    assert score.recovered_detectable == 1 and score.completeness == 0.5
    assert (score.candidates, score.unmatched) == (3, 1)
