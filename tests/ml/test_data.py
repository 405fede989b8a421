"""Labelled candidate triplets: labels from the injections, splits by image, stored by content."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from pipeline.ml.data import (
    KINDS,
    DatasetError,
    assign_splits,
    label_candidates,
    load_dataset,
    save_dataset,
    simulated_dataset,
)
from pipeline.science.detection import CandidateFlag


def _candidates(rows: list[tuple[float, float, int]]) -> Table:
    x, y, flags = zip(*rows, strict=True)
    return Table({"x": x, "y": y, "flags": flags})


def test_labels_follow_the_injections_in_priority_order():
    candidates = _candidates(
        [
            (100.5, 100.0, 0),  # 0.5 px from a transient: real
            (103.5, 100.0, 0),  # 3.5 px away: not that transient; on a star -> residual
            (300.0, 305.0, 0),  # on a cosmic-ray track
            (500.0, 40.0, 0),  # on a bad column's stretch
            (501.0, 400.0, 0),  # same column, beyond its stretch -> noise
            (700.0, 720.0, 0),  # in a saturated star's bleed trail
            (900.0, 900.0, int(CandidateFlag.DIPOLE)),
            (50.0, 800.0, 0),  # nothing there
            (200.0, 200.0, int(CandidateFlag.DIPOLE)),  # a transient flagged dipole: real
        ]
    )
    truth = Table({"x_ref": [100.0, 200.5], "y_ref": [100.0, 200.0], "snr_injected": [12.0, 8.0]})
    artefacts = Table(
        {
            "kind": ["cosmic_ray", "bad_column", "saturated_star"],
            "x": [300.0, 500.0, 700.0],
            "y": [300.0, 64.0, 650.0],
            "length": [6.0, 128.0, 120.0],
        }
    )
    static = Table({"x": [103.0], "y": [100.0]})
    kind, injected = label_candidates(candidates, truth, artefacts, static, fwhm=3.0)
    names = [KINDS[k] for k in kind]
    assert names == [
        "real",
        "static_residual",
        "cosmic_ray",
        "bad_column",
        "noise",
        "saturated_star",
        "dipole",
        "noise",
        "real",
    ]
    assert injected[0] == 12.0 and injected[8] == 8.0
    assert np.isnan(injected[1:8]).all()


def test_splits_are_by_image_deterministic_and_checked():
    images = [f"img{i}" for i in range(20)]
    splits = assign_splits(images)
    assert splits == assign_splits(list(reversed(images)))
    counts = {s: list(splits.values()).count(s) for s in ("train", "validation", "test")}
    assert counts == {"train": 14, "validation": 3, "test": 3}
    assert set(assign_splits(["a", "b", "c"]).values()) == {"train", "validation", "test"}
    with pytest.raises(ValueError, match="summing to 1"):
        assign_splits(images, (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def small() -> object:
    return simulated_dataset(
        [0, 1, 2], shape=(512, 512), n_stars=150, n_galaxies=40, n_transients=25
    )


def test_split_mask_matches_subset_and_rejects_unknown_split(small):
    data = small
    for split in ("train", "validation", "test"):
        mask = data.mask(split)
        assert mask.dtype == bool and mask.sum() == len(data.subset(split)) > 0
        np.testing.assert_array_equal(data.label[mask], data.subset(split).label)
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        data.mask("holdout")
    with pytest.raises(ValueError, match="unknown split"):
        data.subset("holdout")


def test_simulated_dataset_from_our_own_detections(small):
    data = small
    assert data.triplets.shape == (len(data), 4, 63, 63) and data.triplets.dtype == np.float32
    # the fourth stamp is the pair's mask, 0 or 1: at the centre of many candidates from
    # repaired cosmic rays and bad columns (0.4 of them here), of hardly any real one
    assert set(np.unique(data.triplets[:, 3])) <= {0.0, 1.0}
    centre = data.triplets[:, 3, 28:35, 28:35].max(axis=(1, 2))
    repaired = np.isin(data.kind, ["cosmic_ray", "bad_column"])
    assert centre[repaired].mean() > 0.25 and centre[data.label == 1].mean() < 0.1
    # every image lies in exactly one split, and each split has one
    pairs = {(i, s) for i, s in zip(data.image, data.split, strict=True)}
    assert len({i for i, _ in pairs}) == len(pairs) == 3
    assert {s for _, s in pairs} == {"train", "validation", "test"}
    real = data.label == 1
    assert real.sum() >= 20 and (~real).sum() >= 20  # both classes, from the pipeline itself
    assert np.isfinite(data.injected_snr[real]).all() and np.isnan(data.injected_snr[~real]).all()
    assert set(data.kind) - {"real"} <= set(KINDS[1:])
    # a real candidate's difference stamp shows the transient at its centre, with its sign
    centre = data.triplets[real, 2, 30:33, 30:33].mean(axis=(1, 2))
    assert np.mean(np.sign(centre) == np.sign(data.snr[real])) > 0.95
    # bright injections are found: at least as many real candidates above S/N 10
    assert np.sum(real & (data.injected_snr >= 10)) >= 10


def test_dataset_id_round_trip_and_tamper_detection(small, tmp_path):
    again = simulated_dataset(
        [0, 1, 2], shape=(512, 512), n_stars=150, n_galaxies=40, n_transients=25
    )
    assert again.dataset_id == small.dataset_id  # deterministic from its seeds
    path = save_dataset(small, tmp_path / "sets" / "sim.npz")
    loaded = load_dataset(path)
    assert loaded.dataset_id == small.dataset_id
    np.testing.assert_array_equal(loaded.triplets, small.triplets)
    assert sum(v for c in loaded.counts().values() for v in c.values()) == len(small)
    assert len(loaded.subset("test")) == int(np.sum(small.split == "test"))

    with np.load(path) as archive:
        fields = dict(archive)
    fields["label"] = 1 - fields["label"]  # flipped labels, old id
    np.savez_compressed(tmp_path / "bad.npz", **fields)
    with pytest.raises(DatasetError, match="modified or damaged"):
        load_dataset(tmp_path / "bad.npz")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a candidate dataset"):
        load_dataset(tmp_path / "junk.npz")


def test_static_residuals_reach_further_around_bright_sources():
    candidates = _candidates([(112.0, 100.0, 0), (312.0, 100.0, 0)])  # 12 px from each star
    static = Table({"x": [100.0, 300.0], "y": [100.0, 100.0], "reach": [20.0, 1.0]})
    none = Table({"kind": [], "x": [], "y": [], "length": []})
    truth = Table({"x_ref": [900.0], "y_ref": [900.0], "snr_injected": [10.0]})
    kind, _ = label_candidates(candidates, truth, none, static, fwhm=3.0)
    # the bright star's ring is its residual; the faint one reaches only 2 fwhm = 6 px
    assert [KINDS[k] for k in kind] == ["static_residual", "noise"]


def test_observing_conditions_vary_by_seed_within_their_ranges():
    from pipeline.ml.data import _scaled_conditions, observing_conditions

    draws = [observing_conditions(seed) for seed in range(200)]
    assert observing_conditions(3) == draws[3]  # deterministic
    ratio = np.array([d["fwhm_science"] / d["fwhm_reference"] for d in draws])
    assert 0.8 <= ratio.min() < 0.9 and 1.7 < ratio.max() <= 1.8
    assert len({d["cosmic_rays"] for d in draws}) > 50
    assert all(2.0 <= d["reference_depth"] <= 8.0 for d in draws)
    quarter = _scaled_conditions(3, (512, 512))
    assert quarter["n_stars"] == round(draws[3]["n_stars"] / 4)
    assert quarter["fwhm_science"] == draws[3]["fwhm_science"]


def test_injected_dataset_labels_fakes_in_a_real_pair():
    from pathlib import Path

    from pipeline.ml.data import injected_dataset
    from pipeline.science.io import read_image

    folder = Path(__file__).resolve().parents[1] / "data" / "decam"
    science = read_image(folder / "DEC-OBS04a.mini.fits")
    reference = read_image(folder / "Stack-DEC-OBS18.fits")
    data = injected_dataset(
        science, reference, name="decam-04a", split="test", trials=2, n_fakes=12, seed=5
    )
    real = data.label == 1
    assert set(data.image) == {"decam-04a"} and set(data.split) == {"test"}
    # bright fakes are all found (12 per trial, S/N 3-100 log-uniform: ~8 above 7 each)
    assert np.sum(real & (data.injected_snr >= 7)) >= 12
    assert real.sum() <= 24 and np.isfinite(data.injected_snr[real]).all()
    assert np.all(data.injected_snr[real] >= 3) and np.isnan(data.injected_snr[~real]).all()
    centre = data.triplets[real, 2, 30:33, 30:33].mean(axis=(1, 2))
    assert np.all(centre > 0)  # a brightening at the centre of each real stamp
    with pytest.raises(ValueError, match="unknown split"):
        injected_dataset(science, reference, name="x", split="holdout")
    # the nucleus at the centre brightened between the epochs (both epoch-04 exposures
    # show it): told it is known, the dataset leaves its candidates out, and only them
    from astropy.table import Table

    known = Table({"x": [128.3], "y": [128.2]})
    kept = injected_dataset(
        science, reference, name="decam-04a", split="test", trials=2, n_fakes=12, seed=5,
        exclude=known,
    )  # fmt: skip
    assert len(kept) == len(data) - 2  # one per trial
    assert np.sum(kept.label == 0) == np.sum(~real) - 2
    assert np.sum(kept.label == 1) == real.sum()


def test_match_radius_grows_with_the_seeing():
    from pipeline.ml.data import _match_radius

    assert _match_radius(3.0) == 2.0  # sharp images: the 2-px floor
    assert _match_radius(7.7) == pytest.approx(4.62)  # broad seeing: 0.6 FWHM
    assert _match_radius(3.0, least=2.5) == 2.5
