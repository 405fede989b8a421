"""Combining candidate datasets for retraining, without leaking images across splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.ml.data import CandidateDataset, concatenate

__all__ = ["MergedDataset", "merge_datasets"]


@dataclass(frozen=True)
class MergedDataset:
    """The merged candidates and what happened to the new ones."""

    data: CandidateDataset
    added: int
    dropped_images: tuple[str, ...]


def merge_datasets(base: CandidateDataset, new: CandidateDataset) -> MergedDataset:
    """``base`` plus the candidates of ``new`` from images ``base`` does not hold.

    Every image keeps the split it had in its own dataset, so a test image of either
    stays a test image. Images already in ``base`` are dropped from ``new``: the same
    image twice would weigh it double and could put it in two splits.

    Raises
    ------
    ValueError
        If the stamps differ in shape, or nothing of ``new`` is left to add.
    """
    if base.triplets.shape[1:] != new.triplets.shape[1:]:
        raise ValueError(
            f"cannot merge: stamps of {base.triplets.shape[1:]} and {new.triplets.shape[1:]}; "
            "build the new data with the same cutout size and channels"
        )
    known = set(base.image.tolist())
    repeated = np.isin(new.image, list(known))
    dropped = tuple(sorted(set(new.image[repeated].tolist())))
    keep = ~repeated
    if not keep.any():
        raise ValueError(
            f"new data {new.dataset_id} adds nothing: all its images ({len(dropped)}) are "
            f"already in {base.dataset_id}"
        )
    fresh = CandidateDataset(
        **{name: getattr(new, name)[keep] for name in CandidateDataset.__dataclass_fields__}
    )
    return MergedDataset(concatenate([base, fresh]), int(keep.sum()), dropped)
