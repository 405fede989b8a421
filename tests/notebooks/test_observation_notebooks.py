"""The five observation notebooks, run with papermill as the flows run them, products chained."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import papermill as pm
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.science import io, simulate
from pipeline.science.products import CATALOG_COLUMNS

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks" / "observations"
DECAM = Path(__file__).resolve().parents[1] / "data" / "decam"
STEPS = ("01_ingestion", "02_preprocessing", "03_differencing", "04_detection", "05_validation")


def run_step(step: str, root: Path, **parameters: Any) -> dict[str, Any]:
    """Execute one notebook into ``root`` (cwd = the notebook's folder); its outputs.json."""
    output_dir = root / step
    pm.execute_notebook(
        str(NOTEBOOKS / f"{step}.ipynb"),
        str(root / f"{step}.executed.ipynb"),
        parameters={"output_dir": str(output_dir), **parameters},
        cwd=str(NOTEBOOKS),
        kernel_name="python3",
        progress_bar=False,
    )
    outputs = json.loads((output_dir / "outputs.json").read_text())
    for name in outputs["products"].values():
        assert (output_dir / name).is_file(), f"{step} lists {name} but did not write it"
    return outputs


def run_chain(
    root: Path, science: Path, reference: Path, observation_id: str, **ingestion: Any
) -> dict[str, dict[str, Any]]:
    """Run 01 → 05, each step reading the products the previous ones list in outputs.json."""

    def product(step: str, name: str) -> str:
        return str(root / step / out[step]["products"][name])

    ids = {"observation_id": observation_id}
    out: dict[str, dict[str, Any]] = {}
    out["01_ingestion"] = run_step(
        "01_ingestion",
        root,
        science_path=str(science),
        reference_path=str(reference),
        **ids,
        **ingestion,
    )
    out["02_preprocessing"] = run_step(
        "02_preprocessing",
        root,
        science_path=product("01_ingestion", "science"),
        reference_path=product("01_ingestion", "reference"),
        **ids,
    )
    preprocessed = product("02_preprocessing", "preprocessed")
    out["03_differencing"] = run_step(
        "03_differencing", root, preprocessed_path=preprocessed, backend="numpy", **ids
    )
    difference = product("03_differencing", "difference")
    out["04_detection"] = run_step(
        "04_detection", root, preprocessed_path=preprocessed, difference_path=difference, **ids
    )
    out["05_validation"] = run_step(
        "05_validation",
        root,
        detections_path=product("04_detection", "detections"),
        preprocessed_path=preprocessed,
        difference_path=difference,
        **ids,
    )
    return out


@pytest.fixture(scope="module")
def simulated(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[simulate.SimulatedPair, Path, dict[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("simulated")
    sim = simulate.simulate_pair((512, 512), seed=1)
    io.write_image(sim.science, root / "science_raw.fits")
    io.write_image(sim.reference, root / "reference_raw.fits")
    outputs = run_chain(
        root,
        root / "science_raw.fits",
        root / "reference_raw.fits",
        "sim-0001",
        observation_data={"mjd": 59612.5},
    )
    return sim, root, outputs


@pytest.fixture(scope="module")
def decam(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("decam")
    outputs = run_chain(
        root, DECAM / "DEC-OBS04a.mini.fits", DECAM / "Stack-DEC-OBS18.fits", "decam-0001"
    )
    return root, outputs


def test_simulated_chain_recovers_the_bright_transients(
    simulated: tuple[simulate.SimulatedPair, Path, dict[str, dict[str, Any]]],
) -> None:
    sim, root, outputs = simulated
    science = outputs["01_ingestion"]["science"]
    assert science["mjd"] == 59612.5
    assert science["overridden"] == ["mjd"]
    catalogue = Table.read(root / "05_validation" / "candidates.ecsv", format="ascii.ecsv")
    assert catalogue.meta["observation_id"] == "sim-0001"
    passed = catalogue[np.asarray(catalogue["passed"], dtype=bool)]
    bright = sim.truth[sim.truth["snr_injected"] >= 10]
    assert len(bright) >= 10
    # the pipeline measures on the reference grid, which 01 copies unchanged: truth x_ref,
    # y_ref are positions on that grid
    separation = np.hypot(
        np.asarray(bright["x_ref"])[:, None] - np.asarray(passed["x"])[None, :],
        np.asarray(bright["y_ref"])[:, None] - np.asarray(passed["y"])[None, :],
    )
    nearest = separation.argmin(axis=1)
    found = separation[np.arange(len(bright)), nearest] <= 2.0
    assert found.sum() >= len(bright) / 2, f"recovered {found.sum()} of {len(bright)}"
    # a recovered transient has the injected sign
    assert np.all(np.asarray(passed["sign"])[nearest[found]] == np.asarray(bright["sign"])[found])
    counts = outputs["05_validation"]["metrics"]
    assert counts["n_passed"] == len(passed)
    assert (
        counts["n_passed"] + counts["n_rejected"]
        == outputs["04_detection"]["metrics"]["n_candidates"]
    )
    assert outputs["05_validation"]["rb_model"] is None
    assert np.isnan(np.asarray(catalogue["rb_score"], dtype=float)).all()
    # the stamps the classifier reads: science, reference, difference and the pixel mask
    assert outputs["04_detection"]["cutout_channels"] == [
        "science",
        "reference",
        "difference",
        "mask",
    ]
    with fits.open(root / "04_detection" / "cutouts.fits") as hdul:
        n = outputs["04_detection"]["metrics"]["n_candidates"]
        assert hdul[0].data.shape == (n, 4, 63, 63)
        assert set(np.unique(hdul[0].data[:, 3])) <= {0.0, 1.0}


def test_decam_chain_gives_sane_outputs(decam: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    root, outputs = decam
    ingestion = outputs["01_ingestion"]
    assert ingestion["overlap_fraction"] == pytest.approx(1.0, abs=0.01)
    for role, name in (("science", "DEC-OBS04a.mini.fits"), ("reference", "Stack-DEC-OBS18.fits")):
        assert ingestion["sha256"][role] == hashlib.sha256((DECAM / name).read_bytes()).hexdigest()
        assert ingestion[role]["band"] == "i"
        assert ingestion[role]["shape"] == [256, 256]
        assert ingestion[role]["defaulted"] == []
    reread = io.read_image(root / "01_ingestion" / "science.fits")
    assert reread.gain == pytest.approx(ingestion["science"]["gain"])
    pre = outputs["02_preprocessing"]["metrics"]
    assert pre["fwhm_science"] > pre["fwhm_reference"]  # README: ≈ 5.2 px against ≈ 3.9 px
    differencing = outputs["03_differencing"]["metrics"]
    assert 0.8 <= differencing["scorr_std"] <= 1.25
    assert differencing["backend"] == "numpy"
    catalogue = Table.read(root / "05_validation" / "candidates.ecsv", format="ascii.ecsv")
    assert set(CATALOG_COLUMNS) <= set(catalogue.colnames)
    assert catalogue.meta["observation_id"] == "decam-0001"
    validation = outputs["05_validation"]
    assert validation["rb_model"] is None
    assert validation["metrics"]["n_candidates"] == len(catalogue)
    assert validation["crossmatch"]["catalog_matches"] is None


def test_differencing_runs_on_its_defaults(tmp_path: Path) -> None:
    outputs = run_step("03_differencing", tmp_path)
    assert outputs["preprocessed"] is None
    assert 0.8 <= outputs["metrics"]["scorr_std"] <= 1.25


def test_ingestion_refuses_a_file_that_is_not_fits(tmp_path: Path) -> None:
    notes = tmp_path / "notes.fits"
    notes.write_text("observing log, not an image\n")
    with pytest.raises(pm.PapermillExecutionError) as info:
        run_step("01_ingestion", tmp_path, science_path=str(notes))
    assert info.value.ename == "NotFitsError"
    assert str(notes) in str(info.value)
    assert "is not a FITS file" in str(info.value)
    assert not (tmp_path / "01_ingestion" / "outputs.json").exists()


@pytest.mark.parametrize("step", STEPS)
def test_committed_notebook_keeps_the_contract(step: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / f"{step}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert notebook.cells[0].cell_type == "markdown"
    parameters = code[0]
    assert "parameters" in parameters.metadata.get("tags", [])
    lines = parameters.source.splitlines()
    assert all(" # " in line for line in lines), "every parameter needs a comment"
    defaults = {}
    for node in ast.parse(parameters.source).body:
        assert isinstance(node, ast.Assign)
        defaults[node.targets[0].id] = ast.literal_eval(node.value)
    json.dumps(defaults)
    assert defaults["observation_id"] == ""
    assert defaults["output_dir"] == f"../../.astr/notebooks/{step}"
    for cell in code[1:]:
        tree = ast.parse(cell.source)
        banned = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
        assert not any(isinstance(node, banned) for node in ast.walk(tree))
