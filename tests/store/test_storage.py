"""Artifact storage: atomic writes, checksums, immutability, keys that cannot escape."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import CatalogueError, StorageError, StorageKeyError
from pipeline.store import ArtifactStore, Catalogue, save_product, sha256_file, validate_key


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_bytes_records_sha256_and_size(store: ArtifactStore) -> None:
    data = b"SIMPLE  =                    T" * 100
    stored = store.put("observations/o1/raw/science.fits", data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size == len(data)
    assert stored.uri == (Path(store.root) / "observations/o1/raw/science.fits").as_uri()
    assert store.read_bytes(stored.key) == data
    assert store.checksum(stored.key) == stored.sha256
    assert store.key_of(stored.uri) == stored.key
    assert store.list() == ["observations/o1/raw/science.fits"]


def test_put_from_path_handle_and_chunks(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    expected = sha256_file(source)
    assert store.put("a/path.bin", source).sha256 == expected
    with open(source, "rb") as handle:
        assert store.put("a/handle.bin", handle).sha256 == expected
    chunks = [source.read_bytes()[i : i + 1000] for i in range(0, 5000, 1000)]
    assert store.put("a/chunks.bin", iter(chunks)).size == 5000


def test_raw_input_is_never_modified_and_objects_are_immutable(
    store: ArtifactStore, tmp_path: Path
) -> None:
    raw = tmp_path / "science.fits"
    raw.write_bytes(b"raw bytes")
    os.chmod(raw, 0o444)
    before = (raw.stat().st_mtime_ns, sha256_file(raw))
    store.put("obs/raw.fits", raw)
    assert (raw.stat().st_mtime_ns, sha256_file(raw)) == before
    with pytest.raises(StorageError, match="already exists; artifacts are immutable"):
        store.put("obs/raw.fits", b"other bytes")
    assert store.read_bytes("obs/raw.fits") == b"raw bytes"
    store.put("obs/raw.fits", b"new", overwrite=True)
    assert store.read_bytes("obs/raw.fits") == b"new"
    with pytest.raises(StorageError, match="read-only"):
        store.open("obs/raw.fits", "wb")


def _explodes_halfway() -> Iterator[bytes]:
    yield b"x" * 4096
    raise OSError("disk unplugged halfway")


def test_failed_write_leaves_nothing(store: ArtifactStore) -> None:
    with pytest.raises(StorageError, match="disk unplugged halfway"):
        store.put("obs/diff.fits", _explodes_halfway())
    assert not store.exists("obs/diff.fits")
    assert _all_files(Path(store.root)) == []  # no temp file either


class _BrokenReader(io.RawIOBase):
    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls > 2:
            raise OSError("read error on source")
        return b"y" * 100


def test_failed_product_save_leaves_no_object_and_no_row(
    catalogue: Catalogue, store: ArtifactStore
) -> None:
    obs = catalogue.add_observation(raw_checksums={})
    with pytest.raises(StorageError, match="read error on source"):
        save_product(
            catalogue,
            store,
            obs.id,
            kind="difference",
            key=f"{obs.id}/d.fits",
            source=_BrokenReader(),
            step="differencing",
        )
    assert catalogue.products(obs.id) == []
    assert _all_files(Path(store.root)) == []


def test_failed_catalogue_row_removes_the_object(
    catalogue: Catalogue, store: ArtifactStore
) -> None:
    obs = catalogue.add_observation(raw_checksums={})
    first = save_product(
        catalogue,
        store,
        obs.id,
        kind="psf",
        key=f"{obs.id}/psf.fits",
        source=b"psf",
        step="preprocessing",
    )
    # same URI recorded by hand under another key path: the second save's row fails
    catalogue.delete_product(first.id)
    catalogue.add_product(
        obs.id,
        kind="other",
        uri=store.uri(f"{obs.id}/x.fits"),
        sha256="0" * 64,
        size_bytes=0,
        step="s",
    )
    with pytest.raises(CatalogueError, match="already recorded"):
        save_product(
            catalogue, store, obs.id, kind="x", key=f"{obs.id}/x.fits", source=b"data", step="s"
        )
    assert not store.exists(f"{obs.id}/x.fits")


def test_save_product_records_the_checksum(catalogue: Catalogue, store: ArtifactStore) -> None:
    obs = catalogue.add_observation(raw_checksums={})
    data = b"difference image bytes"
    product = save_product(
        catalogue,
        store,
        obs.id,
        kind="difference",
        key=f"observations/{obs.id}/diff.fits",
        source=data,
        step="differencing",
        run_id="run-1",
        metadata={"bitpix": -32},
    )
    stored = catalogue.latest_product(obs.id, "difference")
    assert stored.id == product.id
    assert (
        stored.sha256
        == hashlib.sha256(data).hexdigest()
        == store.checksum(store.key_of(stored.uri))
    )
    assert (stored.size_bytes, stored.step, stored.run_id) == (len(data), "differencing", "run-1")
    assert stored.meta == {"bitpix": -32}


def test_save_product_for_unknown_observation_writes_nothing(
    catalogue: Catalogue, store: ArtifactStore
) -> None:
    import uuid

    with pytest.raises(CatalogueError):
        save_product(catalogue, store, uuid.uuid4(), kind="k", key="k/x", source=b"1", step="s")
    assert _all_files(Path(store.root)) == []


BAD_KEYS = [
    "",
    "../etc/passwd",
    "a/../../b",
    "a/./b",
    "/abs/path",
    "a//b",
    "a/",
    "~/x",
    "C:/windows",
    "a\\b",
    "a\x00b",
    "a\nb",
    "s3://bucket/x",
    "..",
    ".",
    "a/.tmp-123-x",
    "k" * 1025,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_escaping_or_malformed_keys_are_rejected(key: str, store: ArtifactStore) -> None:
    with pytest.raises(StorageKeyError, match="artifact key"):
        store.put(key, b"x")
    assert _all_files(Path(store.root).parent) == []


@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "/", "\x00", "\\", "~"]), max_size=8))
def test_no_accepted_key_resolves_outside_the_root(parts: list[str]) -> None:
    key = "/".join(parts)
    root = Path("/srv/artifacts")
    try:
        validate_key(key)
    except StorageKeyError:
        return
    resolved = (root / key).resolve()
    assert resolved.is_relative_to(root) and resolved != root


def test_missing_object(store: ArtifactStore) -> None:
    with pytest.raises(StorageError, match="no artifact at"):
        store.read_bytes("nothing/here")
    assert store.list("nothing") == []


def test_link_shares_one_read_only_file_and_trusts_a_known_checksum(
    store: ArtifactStore, tmp_path: Path
) -> None:
    source = tmp_path / "run" / "product.fits"
    source.parent.mkdir()
    source.write_bytes(b"finished product")
    digest = hashlib.sha256(b"finished product").hexdigest()

    stored = store.put("obs/product.fits", source, link=True)
    target = store.local_path("obs/product.fits")
    assert stored.sha256 == digest and stored.size == 16
    assert os.path.samefile(source, target)  # no copy
    assert target.stat().st_mode & 0o222 == 0  # read-only for everyone
    with pytest.raises(StorageError, match="already exists"):
        store.put("obs/product.fits", source, link=True)

    # a checksum the caller just computed is used as given, without reading the file
    other = tmp_path / "run" / "other.txt"
    other.write_bytes(b"abc")
    known = store.put("obs/other.txt", other, link=True, sha256="f" * 64)
    assert known.sha256 == "f" * 64
    assert store.list("obs") == ["obs/other.txt", "obs/product.fits"]  # no temporaries left


def test_link_falls_back_to_a_copy_across_filesystems(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def cross_device(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    source = tmp_path / "elsewhere.bin"
    source.write_bytes(b"bytes")
    real_link = os.link
    monkeypatch.setattr(
        os, "link", lambda a, b: cross_device() if Path(a) == source else real_link(a, b)
    )
    stored = store.put("x/elsewhere.bin", source, link=True)
    target = store.local_path("x/elsewhere.bin")
    assert not os.path.samefile(source, target) and target.read_bytes() == b"bytes"
    assert stored.sha256 == hashlib.sha256(b"bytes").hexdigest()
    assert source.stat().st_mode & 0o200  # the source was left writable
