"""Background level and noise maps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep

from pipeline.errors import ScienceError

__all__ = ["Background", "estimate_background"]


@dataclass
class Background:
    """Smooth background and its noise.

    Attributes
    ----------
    level : 2D ndarray of float32
        Background level (ADU) at every pixel.
    rms : 2D ndarray of float32
        Background noise standard deviation (ADU) at every pixel.
    global_level, global_rms : float
        Their image-wide values.
    """

    level: np.ndarray
    rms: np.ndarray
    global_level: float
    global_rms: float


def estimate_background(
    data: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    box: int = 64,
    filter_size: int = 3,
) -> Background:
    """Estimate the background on a mesh of ``box`` pixels, sources clipped (SExtractor's way).

    Parameters
    ----------
    data : 2D ndarray
        Image in ADU; NaN pixels are ignored.
    mask : 2D ndarray of bool, optional
        True where pixels must be ignored.
    box : int
        Mesh size in pixels.
    filter_size : int
        Median filter size applied to the mesh.

    Returns
    -------
    Background
    """
    image = np.ascontiguousarray(data, dtype=np.float32)
    ignore = ~np.isfinite(image)
    if mask is not None:
        ignore |= mask
    if ignore.all():
        raise ScienceError("every pixel is masked or NaN: cannot estimate a background")
    box = int(min(box, *image.shape))
    filled = np.where(ignore, 0.0, image).astype(np.float32)
    bkg = sep.Background(filled, mask=ignore, bw=box, bh=box, fw=filter_size, fh=filter_size)
    return Background(
        level=bkg.back().astype(np.float32),
        rms=bkg.rms().astype(np.float32),
        global_level=float(bkg.globalback),
        global_rms=float(bkg.globalrms),
    )
