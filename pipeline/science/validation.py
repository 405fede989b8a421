"""Vet candidates: cross-matches, rule cuts and the real/bogus score."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from pipeline.science.crossmatch import crossmatch
from pipeline.science.detection import CandidateFlag

__all__ = ["Cuts", "validate_candidates"]


@dataclass(frozen=True)
class Cuts:
    """Rule cuts a candidate must pass before any learned classifier.

    Attributes
    ----------
    min_abs_snr : float
        Minimum |S_corr|.
    reject_flags : int
        :class:`CandidateFlag` bits that reject a candidate.
    min_fwhm_ratio, max_fwhm_ratio : float
        Allowed FWHM of the peak in D relative to the FWHM of D's PSF: a point source
        has ~1; cosmic rays are sharper, extended residuals wider.
    max_elongation : float
        Largest axis ratio of the peak in D.
    max_repaired_share, min_fwhm_ratio_repaired : float
        A candidate with the REPAIRED flag (repaired cosmic rays or bad columns under
        its footprint) passes only while repaired pixels carry at most
        ``max_repaired_share`` of the matched filter's weight and its peak is at least
        ``min_fwhm_ratio_repaired`` times as wide as D's PSF. A repair error lives on
        the few pixels that were filled, so its peak is sharper than the PSF; a
        transient beside a cosmic ray or a bad column keeps the PSF's width from its
        unrepaired pixels. (Rejecting every REPAIRED candidate lost about 1% of the
        simulated transients with S/N ≥ 7; these two rules keep them for about 0.1 more
        false candidate per 1024² image.)
    min_rb_score : float
        Smallest real/bogus probability that passes (only where a model scored the
        candidate; an unscored candidate, rb_score NaN, is not cut on it).
    """

    min_abs_snr: float = 5.0
    reject_flags: int = int(CandidateFlag.MASKED | CandidateFlag.EDGE)
    min_fwhm_ratio: float = 0.5
    max_fwhm_ratio: float = 2.0
    max_elongation: float = 2.0
    max_repaired_share: float = 0.5
    min_fwhm_ratio_repaired: float = 0.9
    min_rb_score: float = 0.5

    def as_dict(self) -> dict:
        """Plain-data form, for reports."""
        return asdict(self)


def validate_candidates(
    candidates: Table,
    *,
    psf_fwhm: float,
    wcs: WCS,
    reference_sources: Table,
    catalog: Table | None = None,
    match_radius_arcsec: float = 1.0,
    cuts: Cuts | None = None,
    rb_scores: np.ndarray | None = None,
) -> Table:
    """Cross-match candidates and apply the rule cuts.

    Parameters
    ----------
    candidates : Table
        From :func:`pipeline.science.detection.detect_candidates`.
    psf_fwhm : float
        FWHM (pixels) of the PSF of the difference image.
    wcs : WCS
        WCS of the reference grid (gives the reference sources' sky positions).
    reference_sources : Table
        Sources detected in the reference image (x, y).
    catalog : Table, optional
        External catalogue with ra, dec (deg), e.g. known variables or galaxies.
    match_radius_arcsec : float
        Cross-match radius.
    cuts : Cuts, optional
    rb_scores : ndarray, optional
        Real/bogus probabilities from the deployed model; NaN without one.

    Returns
    -------
    Table
        The candidates with ref_match, ref_sep_arcsec, catalog_index, catalog_sep_arcsec,
        rb_score, passed and reject_reason columns added.
    """
    cuts = cuts or Cuts()
    out = candidates.copy()
    n = len(out)
    ref = reference_sources
    if len(ref):
        sky = wcs.pixel_to_world(np.asarray(ref["x"]), np.asarray(ref["y"]))
        ref_table = Table({"ra": sky.ra.deg, "dec": sky.dec.deg})
    else:
        ref_table = Table({"ra": np.zeros(0), "dec": np.zeros(0)})
    ra, dec = np.asarray(out["ra"], dtype=float), np.asarray(out["dec"], dtype=float)
    ref_index, ref_sep = crossmatch(ra, dec, ref_table, match_radius_arcsec)
    out["ref_match"] = ref_index >= 0
    out["ref_sep_arcsec"] = ref_sep
    if catalog is not None:
        cat_index, cat_sep = crossmatch(ra, dec, catalog, match_radius_arcsec)
    else:
        cat_index, cat_sep = np.full(n, -1), np.full(n, np.nan)
    out["catalog_index"] = cat_index
    out["catalog_sep_arcsec"] = cat_sep
    out["rb_score"] = np.full(n, np.nan) if rb_scores is None else np.asarray(rb_scores, float)
    reasons = [_reasons(row, cuts, psf_fwhm) for row in out]
    out["reject_reason"] = np.array([",".join(r) for r in reasons], dtype=str)
    out["passed"] = np.array([not r for r in reasons], dtype=bool)
    return out


def _reasons(row: Table.Row, cuts: Cuts, psf_fwhm: float) -> list[str]:
    reasons = []
    if abs(row["snr"]) < cuts.min_abs_snr:
        reasons.append("snr")
    for flag in CandidateFlag:
        if row["flags"] & flag & cuts.reject_flags:
            reasons.append(flag.name.lower())
    fwhm = row["fwhm"]
    if not np.isfinite(fwhm) or not (
        cuts.min_fwhm_ratio * psf_fwhm <= fwhm <= cuts.max_fwhm_ratio * psf_fwhm
    ):
        reasons.append("shape")
    if np.isfinite(row["elongation"]) and row["elongation"] > cuts.max_elongation:
        reasons.append("elongated")
    if row["flags"] & CandidateFlag.REPAIRED and not cuts.reject_flags & CandidateFlag.REPAIRED:
        # a catalogue from before the share was measured: treat the repair as dominant
        share = row["repaired_share"] if "repaired_share" in row.colnames else 1.0
        if not (
            share <= cuts.max_repaired_share
            and np.isfinite(fwhm)
            and fwhm >= cuts.min_fwhm_ratio_repaired * psf_fwhm
        ):
            reasons.append("repaired")
    if np.isfinite(row["rb_score"]) and row["rb_score"] < cuts.min_rb_score:
        reasons.append("rb")
    return reasons
