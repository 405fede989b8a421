"""The in-memory image record that every science step passes along."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

__all__ = ["Image"]


@dataclass
class Image:
    """A calibrated 2-D image with the header facts a difference-imaging pipeline needs.

    Attributes
    ----------
    data : 2D ndarray of float32
        Pixel values in ADU; NaN where there is no valid value.
    wcs : astropy.wcs.WCS
        Celestial WCS of ``data``.
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise in electrons.
    saturation : float
        Level (ADU, before background subtraction) above which pixels are unreliable.
    exptime : float
        Exposure time in seconds.
    band : str or None
        Filter name as normalised by :mod:`pipeline.science.io` (e.g. ``"i"``).
    mjd : float or None
        Modified Julian date of the exposure start.
    header : astropy.io.fits.Header
        The original header (updated where values were overridden).
    mask : 2D ndarray of bool or None
        True where a pixel is known bad (saturated, bad column, cosmic ray...).
    path : str or None
        Where the image was read from.
    meta : dict
        Anything else worth carrying (instrument, seeing...).
    """

    data: np.ndarray
    wcs: WCS
    gain: float = 1.0
    read_noise: float = 0.0
    saturation: float = np.inf
    exptime: float = 1.0
    band: str | None = None
    mjd: float | None = None
    header: fits.Header = field(default_factory=fits.Header)
    mask: np.ndarray | None = None
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the pixel grid."""
        return self.data.shape  # type: ignore[return-value]

    def with_data(self, data: np.ndarray, **changes: Any) -> Image:
        """A copy with new pixel values (and any other fields changed)."""
        return replace(self, data=data, **changes)
