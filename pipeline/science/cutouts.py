"""Science, reference and difference stamps around candidates."""

from __future__ import annotations

import numpy as np

__all__ = ["cutout", "cutout_triplets"]


def cutout(image: np.ndarray, x: float, y: float, size: int = 63) -> np.ndarray:
    """A ``size``×``size`` stamp centred on the pixel nearest (x, y), NaN beyond the edges.

    Parameters
    ----------
    image : 2D ndarray
    x, y : float
        0-based pixel position.
    size : int
        Odd stamp size.

    Returns
    -------
    2D ndarray of float32
    """
    half = size // 2
    ix, iy = int(np.rint(x)), int(np.rint(y))
    out = np.full((size, size), np.nan, dtype=np.float32)
    y0, y1 = max(0, iy - half), min(image.shape[0], iy + half + 1)
    x0, x1 = max(0, ix - half), min(image.shape[1], ix + half + 1)
    if y0 < y1 and x0 < x1:
        out[y0 - (iy - half) : y1 - (iy - half), x0 - (ix - half) : x1 - (ix - half)] = image[
            y0:y1, x0:x1
        ]
    return out


def cutout_triplets(
    science: np.ndarray,
    reference: np.ndarray,
    difference: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    size: int = 63,
) -> np.ndarray:
    """Stamps of the three images for every candidate.

    Returns
    -------
    4D ndarray of float32, shape (n, 3, size, size)
        Channels in the order science, reference, difference.
    """
    stamps = np.empty((len(x), 3, size, size), dtype=np.float32)
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        for c, image in enumerate((science, reference, difference)):
            stamps[i, c] = cutout(image, xi, yi, size)
    return stamps
