"""Rule cuts, cross-matches and the real/bogus column of validate_candidates."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from pipeline.science.detection import CandidateFlag
from pipeline.science.validation import Cuts, validate_candidates

SHAPE = (200, 200)
PSF_FWHM = 4.0

# x, y, snr, fwhm, elongation, flags, expected reject_reason
ROWS = [
    (50.0, 50.0, 8.0, 4.2, 1.1, 0, ""),
    (60.0, 50.0, -7.0, 3.9, 1.2, int(CandidateFlag.NEAR_REFERENCE_SOURCE), ""),
    (70.0, 50.0, 4.5, 4.0, 1.0, 0, "snr"),
    (80.0, 50.0, 9.0, 4.0, 1.0, int(CandidateFlag.EDGE), "edge"),
    (90.0, 50.0, 9.0, 4.0, 1.0, int(CandidateFlag.MASKED | CandidateFlag.DIPOLE), "masked"),
    (100.0, 50.0, 9.0, 1.5, 1.0, 0, "shape"),  # sharper than 0.5 FWHM: a cosmic ray
    (110.0, 50.0, 9.0, 9.0, 1.0, 0, "shape"),  # wider than 2 FWHM
    (120.0, 50.0, 9.0, np.nan, np.nan, 0, "shape"),
    (130.0, 50.0, 9.0, 4.0, 2.6, 0, "elongated"),
    (140.0, 50.0, 3.0, 1.0, 3.0, int(CandidateFlag.EDGE | CandidateFlag.MASKED),
     "snr,edge,masked,shape,elongated"),
]  # fmt: skip


def _candidate_table(wcs, x, y, snr, fwhm, elongation, flags) -> Table:
    """A detection table (detect_candidates' columns but repaired_share) from its columns."""
    x, y, snr = (np.asarray(v, dtype=float) for v in (x, y, snr))
    world = wcs.pixel_to_world(x, y)
    return Table(
        {
            "candidate_id": np.arange(1, len(x) + 1),
            "x": x,
            "y": y,
            "ra": world.ra.deg,
            "dec": world.dec.deg,
            "snr": snr,
            "flux": 100.0 * snr,
            "flux_err": np.full(len(x), 100.0),
            "sign": np.sign(snr).astype(int),
            "fwhm": np.asarray(fwhm, dtype=float),
            "elongation": np.asarray(elongation, dtype=float),
            "flags": np.asarray(flags, dtype=int),
        }
    )


@pytest.fixture
def candidates(tan_wcs) -> tuple[Table, object]:
    wcs = tan_wcs(SHAPE)
    x, y, snr, fwhm, elong, flags, _ = (np.array(c) for c in zip(*ROWS, strict=True))
    return _candidate_table(wcs, x, y, snr, fwhm, elong, flags), wcs


def test_each_rule_gives_its_reject_reason(candidates) -> None:
    table, wcs = candidates
    out = validate_candidates(
        table, psf_fwhm=PSF_FWHM, wcs=wcs, reference_sources=Table({"x": [], "y": []})
    )
    assert list(out["reject_reason"]) == [row[-1] for row in ROWS]
    assert list(out["passed"]) == [row[-1] == "" for row in ROWS]
    assert np.isnan(out["rb_score"]).all()  # no model, no score
    assert len(table.colnames) == 12  # the input is not modified


def test_cuts_are_configurable(candidates) -> None:
    table, wcs = candidates
    loose = Cuts(min_abs_snr=4.0, reject_flags=0, max_elongation=3.0)
    out = validate_candidates(
        table, psf_fwhm=PSF_FWHM, wcs=wcs, reference_sources=Table({"x": [], "y": []}), cuts=loose
    )
    reasons = list(out["reject_reason"])
    assert reasons[2] == "" and reasons[3] == "" and reasons[4] == "" and reasons[8] == ""
    assert reasons[-1] == "snr,shape"
    assert loose.as_dict()["min_abs_snr"] == 4.0


# repaired_share, fwhm (PSF_FWHM = 4), expected reject_reason
REPAIRED_ROWS = [
    (0.3, 4.4, ""),  # a transient beside a cosmic ray keeps the PSF's width
    (0.5, 3.6, ""),  # both limits are inclusive
    (0.7, 4.4, "repaired"),  # the repair carries most of the matched filter's weight
    (0.3, 3.0, "repaired"),  # sharper than the PSF (but not for the plain shape cut)
    (0.3, np.nan, "shape,repaired"),
]


def _repaired_table(tan_wcs, with_share: bool = True) -> tuple[Table, object]:
    wcs = tan_wcs(SHAPE)
    n = len(REPAIRED_ROWS)
    table = _candidate_table(
        wcs,
        x=40.0 + 20.0 * np.arange(n),
        y=np.full(n, 100.0),
        snr=np.full(n, 12.0),
        fwhm=[r[1] for r in REPAIRED_ROWS],
        elongation=np.ones(n),
        flags=np.full(n, int(CandidateFlag.REPAIRED)),
    )
    if with_share:
        table["repaired_share"] = [r[0] for r in REPAIRED_ROWS]
    return table, wcs


def test_repaired_candidates_pass_when_the_psf_shape_survives(tan_wcs) -> None:
    table, wcs = _repaired_table(tan_wcs)
    none = Table({"x": [], "y": []})
    out = validate_candidates(table, psf_fwhm=PSF_FWHM, wcs=wcs, reference_sources=none)
    assert list(out["reject_reason"]) == [r[-1] for r in REPAIRED_ROWS]
    # the old rule, every REPAIRED candidate out, is one setting away
    strict = Cuts(reject_flags=int(CandidateFlag.REPAIRED))
    out = validate_candidates(
        table, psf_fwhm=PSF_FWHM, wcs=wcs, reference_sources=none, cuts=strict
    )
    assert not out["passed"].any()
    assert all("repaired" in r.split(",") for r in out["reject_reason"])


def test_repaired_candidates_without_a_measured_share_are_rejected(tan_wcs) -> None:
    table, wcs = _repaired_table(tan_wcs, with_share=False)
    out = validate_candidates(
        table, psf_fwhm=PSF_FWHM, wcs=wcs, reference_sources=Table({"x": [], "y": []})
    )
    assert not out["passed"].any()
    assert all("repaired" in r.split(",") for r in out["reject_reason"])


def test_reference_and_catalogue_matches(candidates) -> None:
    table, wcs = candidates
    # a reference source 0.5 px (0.13") from the first candidate, one 10 px from the second
    reference_sources = Table({"x": [50.5, 70.0], "y": [50.0, 50.0]})
    first = wcs.pixel_to_world(50.0, 50.0)
    catalog = Table({"ra": [first.ra.deg, 10.0], "dec": [first.dec.deg + 0.5 / 3600, -5.0]})
    scores = np.linspace(0.0, 0.9, len(ROWS))
    out = validate_candidates(
        table,
        psf_fwhm=PSF_FWHM,
        wcs=wcs,
        reference_sources=reference_sources,
        catalog=catalog,
        match_radius_arcsec=1.0,
        rb_scores=scores,
        cuts=Cuts(min_rb_score=0.0),  # the rb cut has its own test
    )
    ref_match = np.asarray(out["ref_match"])
    assert ref_match[0] and ref_match[2] and ref_match.sum() == 2
    assert out["ref_sep_arcsec"][0] == pytest.approx(0.5 * 0.263, abs=1e-3)
    assert np.isnan(out["ref_sep_arcsec"][1])
    assert list(out["catalog_index"]) == [0] + [-1] * (len(ROWS) - 1)
    assert out["catalog_sep_arcsec"][0] == pytest.approx(0.5, abs=1e-3)
    assert np.array_equal(out["rb_score"], scores)
    # a match does not reject: the cuts are the same as without catalogues
    assert list(out["passed"]) == [row[-1] == "" for row in ROWS]


def test_the_rb_cut_rejects_low_scores_and_leaves_unscored_candidates_alone(candidates) -> None:
    table, wcs = candidates
    scores = np.full(len(ROWS), 0.9)
    scores[0], scores[1] = 0.49, np.nan
    out = validate_candidates(
        table,
        psf_fwhm=PSF_FWHM,
        wcs=wcs,
        reference_sources=Table({"x": [1.0], "y": [1.0]}),
        rb_scores=scores,
    )
    reasons = [str(r).split(",") if r else [] for r in out["reject_reason"]]
    assert "rb" in reasons[0]
    assert all("rb" not in r for r in reasons[1:])  # 0.9 passes, NaN is not cut on
    assert not out["passed"][0]
    assert list(out["passed"][1:]) == [row[-1] == "" for row in ROWS[1:]]


def test_an_empty_candidate_table_validates_to_an_empty_table(candidates) -> None:
    table, wcs = candidates
    out = validate_candidates(
        table[:0], psf_fwhm=PSF_FWHM, wcs=wcs, reference_sources=Table({"x": [1.0], "y": [1.0]})
    )
    assert len(out) == 0
    assert {"passed", "reject_reason", "rb_score", "ref_match"} <= set(out.colnames)
