"""Merging datasets for retraining: images keep their split and are not added twice."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ml.data import CandidateDataset
from pipeline.ml.merge import merge_datasets


def _data(images: list[str], splits: list[str], per_image: int = 3) -> CandidateDataset:
    n = len(images) * per_image
    rng = np.random.default_rng(len(images))
    return CandidateDataset(
        triplets=rng.normal(size=(n, 3, 5, 5)).astype(np.float32),
        label=np.tile(np.array([1, 0, 0], dtype=np.int8), len(images)),
        kind_code=np.tile(np.array([0, 6, 1], dtype=np.int8), len(images)),
        snr=np.full(n, 8.0, np.float32),
        injected_snr=np.full(n, np.nan, np.float32),
        image=np.repeat(np.array(images, dtype="U64"), per_image),
        split=np.repeat(np.array(splits, dtype="U10"), per_image),
    )


def test_new_images_are_added_with_their_splits_and_repeats_dropped() -> None:
    base = _data(["a", "b", "c"], ["train", "validation", "test"])
    new = _data(["c", "d", "e"], ["train", "train", "test"])
    merged = merge_datasets(base, new)
    data = merged.data
    assert merged.added == 6 and merged.dropped_images == ("c",)
    assert len(data) == 15
    split_of = {img: set(data.split[data.image == img].tolist()) for img in set(data.image)}
    assert split_of == {
        "a": {"train"},
        "b": {"validation"},
        "c": {"test"},  # kept as base had it, not the new data's "train"
        "d": {"train"},
        "e": {"test"},
    }
    assert merged.data.dataset_id not in (base.dataset_id, new.dataset_id)


def test_merging_nothing_new_or_other_stamps_is_refused() -> None:
    base = _data(["a", "b"], ["train", "test"])
    with pytest.raises(ValueError, match="adds nothing"):
        merge_datasets(base, _data(["a"], ["train"]))
    other = _data(["z"], ["train"])
    other = CandidateDataset(**{**other.__dict__, "triplets": other.triplets[:, :, :3, :3]})
    with pytest.raises(ValueError, match="same cutout size"):
        merge_datasets(base, other)
