"""Artifact storage against a real S3 protocol server on loopback (moto in server mode)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from pipeline.config import StorageConfig
from pipeline.errors import StorageError, StorageKeyError
from pipeline.store import ArtifactStore, Catalogue, save_product

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


@pytest.fixture
def s3_store(s3_endpoint: str, aws_env: None) -> ArtifactStore:
    options = {"endpoint_url": s3_endpoint, "skip_instance_cache": True}
    store = ArtifactStore(StorageConfig("s3", bucket="survey", prefix="astr/dev", options=options))
    if not store.fs.exists("survey"):
        store.fs.mkdir("survey")
    return store


def test_put_read_checksum_on_s3(s3_store: ArtifactStore) -> None:
    data = b"difference image" * 1000
    stored = s3_store.put("observations/o1/diff.fits", data)
    assert stored.uri == "s3://survey/astr/dev/observations/o1/diff.fits"
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert s3_store.read_bytes("observations/o1/diff.fits") == data
    assert s3_store.checksum("observations/o1/diff.fits") == stored.sha256
    assert s3_store.key_of(stored.uri) == "observations/o1/diff.fits"
    assert "observations/o1/diff.fits" in s3_store.list()
    with pytest.raises(StorageError, match="already exists"):
        s3_store.put("observations/o1/diff.fits", b"other")


def _explodes() -> Iterator[bytes]:
    yield b"partial"
    raise OSError("connection dropped")


def test_failed_s3_write_leaves_no_object_and_no_row(
    s3_store: ArtifactStore, catalogue: Catalogue
) -> None:
    obs = catalogue.add_observation(raw_checksums={})
    with pytest.raises(StorageError, match="connection dropped"):
        save_product(
            catalogue,
            s3_store,
            obs.id,
            kind="difference",
            key=f"observations/{obs.id}/d.fits",
            source=_explodes(),
            step="differencing",
        )
    assert not s3_store.exists(f"observations/{obs.id}/d.fits")
    assert catalogue.products(obs.id) == []
    product = save_product(
        catalogue,
        s3_store,
        obs.id,
        kind="difference",
        key=f"observations/{obs.id}/d.fits",
        source=b"ok",
        step="differencing",
    )
    assert product.uri.startswith("s3://survey/astr/dev/observations/")
    assert product.sha256 == hashlib.sha256(b"ok").hexdigest()


def test_s3_keys_cannot_escape_the_prefix(s3_store: ArtifactStore) -> None:
    with pytest.raises(StorageKeyError):
        s3_store.put("../other-prefix/x", b"x")
