"""Store an artifact and record it in the catalogue as one all-or-nothing step."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from pipeline.store.catalogue import Catalogue
from pipeline.store.models import Product
from pipeline.store.storage import ArtifactStore, Source

__all__ = ["save_product"]


def save_product(
    catalogue: Catalogue,
    store: ArtifactStore,
    observation_id: uuid.UUID | str,
    *,
    kind: str,
    key: str,
    source: Source,
    step: str,
    run_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    link: bool = False,
    sha256: str | None = None,
) -> Product:
    """Write ``source`` to ``key`` and record it, with its sha256, as a product.

    If the write fails nothing is stored and nothing recorded; if recording fails
    the object just written is removed again, so the store and the catalogue never
    disagree.

    Parameters
    ----------
    catalogue : Catalogue
    store : ArtifactStore
    observation_id : UUID or str
        Observation the product belongs to.
    kind : str
        What the product is (``raw_science``, ``difference``, ``candidates``...).
    key : str
        Storage key, relative to the store root.
    source : bytes, path, binary file or iterable of bytes
    step : str
        Pipeline step that made it.
    run_id : str, optional
        Flow run that made it.
    metadata : mapping, optional
    link, sha256 : optional
        Hard-link a finished file instead of copying it, with its known checksum;
        see ``ArtifactStore.put``.

    Returns
    -------
    Product
    """
    catalogue.get_observation(observation_id)
    stored = store.put(key, source, link=link, sha256=sha256)
    try:
        return catalogue.add_product(
            observation_id,
            kind=kind,
            uri=stored.uri,
            sha256=stored.sha256,
            size_bytes=stored.size,
            step=step,
            run_id=run_id,
            metadata=metadata,
        )
    except BaseException:
        store.delete(key)
        raise
