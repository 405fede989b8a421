"""Science, reference and difference stamps around candidates."""

from __future__ import annotations

import numpy as np

__all__ = ["CHANNELS", "cutout", "cutout_triplets"]

#: Names of the stamps of a candidate, in order (the mask only when asked for).
CHANNELS = ("science", "reference", "difference", "mask")


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
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Stamps of the three images for every candidate, and of the mask when given.

    Parameters
    ----------
    science, reference, difference : 2D ndarray
        On one pixel grid.
    x, y : ndarray
        0-based candidate positions.
    size : int
        Odd stamp size.
    mask : 2D ndarray, optional
        The pair's pixel mask (non-zero: a defect, lost or repaired from its neighbours).
        When given, a fourth stamp is 1 where a pixel is masked or beyond the image and 0
        elsewhere: a repaired cosmic ray or bad column looks like sky in the images, and
        only the mask tells the classifier its pixels were made up.

    Returns
    -------
    4D ndarray of float32, shape (n, 3 or 4, size, size)
        Channels in the order of :data:`CHANNELS`.
    """
    images = [science, reference, difference]
    if mask is not None:
        if mask.shape != science.shape:
            raise ValueError(f"mask shape {mask.shape} is not the images' {science.shape}")
        images.append(mask)
    stamps = np.empty((len(x), len(images), size, size), dtype=np.float32)
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        for c, image in enumerate(images):
            stamps[i, c] = cutout(image, xi, yi, size)
    if mask is not None:  # mask bits -> 1; NaN (beyond the image: no data) != 0 -> 1 too
        stamps[:, 3] = stamps[:, 3] != 0
    return stamps
