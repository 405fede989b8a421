"""Observation catalogue (SQLAlchemy) and artifact storage (fsspec)."""

from pipeline.store.catalogue import Catalogue
from pipeline.store.products import save_product
from pipeline.store.storage import ArtifactStore, StoredObject, sha256_file, validate_key

__all__ = [
    "ArtifactStore",
    "Catalogue",
    "StoredObject",
    "save_product",
    "sha256_file",
    "validate_key",
]
