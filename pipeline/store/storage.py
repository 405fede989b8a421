"""Artifact storage on fsspec: atomic, checksummed, immutable writes under one root."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import fsspec

from pipeline.config import StorageConfig
from pipeline.errors import StorageError, StorageKeyError

__all__ = ["ArtifactStore", "StoredObject", "sha256_file", "validate_key"]

_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"
_MAX_KEY_LENGTH = 1024

Source = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes] | Iterable[bytes]


@dataclass(frozen=True)
class StoredObject:
    """Where an artifact went and what it holds.

    Attributes
    ----------
    key : str
        Key relative to the store root (``observations/<id>/raw/science.fits``).
    uri : str
        Absolute location (``file:///...`` or ``s3://bucket/...``).
    sha256 : str
        Hex digest of the bytes written.
    size : int
        Number of bytes written.
    """

    key: str
    uri: str
    sha256: str
    size: int


def validate_key(key: str) -> str:
    """Check that an artifact key stays inside the store root.

    Parameters
    ----------
    key : str
        Relative POSIX-style key such as ``observations/<id>/diff.fits``.

    Returns
    -------
    str
        The key, unchanged.

    Raises
    ------
    StorageKeyError
        If the key is empty, absolute, contains ``..``/``.``/empty segments, a NUL or
        other control character, a backslash, a URL scheme or a reserved temp name.
    """
    if not isinstance(key, str) or not key:
        raise StorageKeyError(f"artifact key must be a non-empty string, got {key!r}")
    problem = None
    if len(key) > _MAX_KEY_LENGTH:
        problem = f"is longer than {_MAX_KEY_LENGTH} characters"
    elif any(ord(c) < 32 or ord(c) == 127 for c in key):
        problem = "contains a NUL or control character"
    elif "\\" in key:
        problem = "contains a backslash; use '/' between segments"
    elif key.startswith(("/", "~")) or (len(key) > 1 and key[1] == ":"):
        problem = "is absolute; give a path relative to the store root"
    elif "://" in key:
        problem = "is a URL; give a path relative to the store root"
    else:
        for segment in key.split("/"):
            if segment in ("", ".", ".."):
                problem = "has an empty, '.' or '..' segment"
                break
            if segment.startswith(_TMP_PREFIX):
                problem = f"uses the reserved prefix {_TMP_PREFIX!r}"
                break
    if problem:
        raise StorageKeyError(f"artifact key {key!r} {problem}")
    return key


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """Immutable artifacts under a local directory or an S3 prefix.

    Writes are atomic: on the local disk the bytes go to a temporary file in the
    target directory, are flushed to disk and then linked into place; on an object
    store they are spooled locally, then sent in one put. A write that fails leaves
    nothing behind. Existing objects are never overwritten unless asked.

    Parameters
    ----------
    storage : StorageConfig
    """

    def __init__(self, storage: StorageConfig) -> None:
        self.config = storage
        if storage.backend == "local":
            self.fs = fsspec.filesystem("file")
            self.root = str(Path(storage.root).resolve())
            Path(self.root).mkdir(parents=True, exist_ok=True)
        else:
            self.fs = fsspec.filesystem(storage.backend, **storage.options)
            self.root = f"{storage.bucket}/{storage.prefix}".rstrip("/")

    @property
    def is_local(self) -> bool:
        """Whether objects are plain files on this machine."""
        return self.config.backend == "local"

    def path(self, key: str) -> str:
        """Filesystem path of ``key`` (without protocol)."""
        return f"{self.root}/{validate_key(key)}"

    def uri(self, key: str) -> str:
        """Absolute URI of ``key``: ``file:///...`` or ``s3://...``."""
        if self.is_local:
            return Path(self.path(key)).as_uri()
        return f"{self.config.backend}://{self.path(key)}"

    def key_of(self, uri: str) -> str:
        """Key of an object given its URI from :meth:`uri`."""
        prefix = (
            Path(self.root).as_uri() if self.is_local else f"{self.config.backend}://{self.root}"
        ) + "/"
        if not uri.startswith(prefix):
            raise StorageKeyError(f"{uri} is not inside this store ({prefix})")
        return validate_key(uri[len(prefix) :])

    def local_path(self, key: str) -> Path:
        """Path of ``key`` on the local disk (local backend only)."""
        if not self.is_local:
            raise StorageError(f"{self.uri(key)} is not on the local disk; use open() instead")
        return Path(self.path(key))

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""
        return bool(self.fs.exists(self.path(key)))

    def put(
        self,
        key: str,
        source: Source,
        *,
        overwrite: bool = False,
        link: bool = False,
        sha256: str | None = None,
    ) -> StoredObject:
        """Store bytes, a file (path or binary handle) or an iterable of chunks at ``key``.

        Parameters
        ----------
        key : str
            Relative key; see :func:`validate_key`.
        source : bytes, path, binary file or iterable of bytes
            A path is opened read-only; the source is never modified (but see ``link``).
        overwrite : bool
            Replace an existing object (default False: raise instead).
        link : bool
            For a path on a local store: hard-link the file into the store instead of
            copying it, and make it read-only (both names then share one read-only
            file). For a finished product that nobody writes again. Falls back to a
            copy across filesystems and on an object store.
        sha256 : str, optional
            The source's sha256 when the caller has just computed it (with ``link``):
            the file is then not read at all.

        Returns
        -------
        StoredObject

        Raises
        ------
        StorageError
            If the object exists and ``overwrite`` is False, or reading the source or
            writing the object fails (nothing is left behind).
        """
        path = self.path(key)
        if not overwrite and self.fs.exists(path):
            raise StorageError(f"{self.uri(key)} already exists; artifacts are immutable")
        try:
            linked = None
            if link and self.is_local and isinstance(source, str | os.PathLike):
                linked = self._link_local(path, Path(source), overwrite, sha256)
            if linked is not None:
                digest, size = linked
            elif self.is_local:
                digest, size = self._put_local(path, source, overwrite)
            else:
                digest, size = self._put_remote(path, source)
        except FileExistsError:
            raise StorageError(f"{self.uri(key)} already exists; artifacts are immutable") from None
        except OSError as exc:
            raise StorageError(f"could not store {self.uri(key)}: {exc}") from exc
        return StoredObject(key=key, uri=self.uri(key), sha256=digest, size=size)

    def open(self, key: str, mode: str = "rb") -> IO[Any]:
        """Open a stored object for reading."""
        if "r" not in mode or "+" in mode:
            raise StorageError("stored artifacts are read-only; write with put()")
        try:
            return self.fs.open(self.path(key), mode)
        except FileNotFoundError:
            raise StorageError(f"no artifact at {self.uri(key)}") from None

    def read_bytes(self, key: str) -> bytes:
        """Whole content of a stored object."""
        with self.open(key) as handle:
            return handle.read()

    def checksum(self, key: str) -> str:
        """sha256 of the stored object, computed from its bytes."""
        digest = hashlib.sha256()
        with self.open(key) as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def delete(self, key: str) -> None:
        """Remove a stored object if it exists."""
        path = self.path(key)
        if self.fs.exists(path):
            self.fs.rm(path)

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (all keys when empty), sorted."""
        base = self.path(prefix) if prefix else self.root
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        start = len(self.root.rstrip("/")) + 1
        return sorted(p[start:] for p in found if not PurePosixPath(p).name.startswith(_TMP_PREFIX))

    def _put_local(self, path: str, source: Source, overwrite: bool) -> tuple[str, int]:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{target.name}")
        try:
            with open(tmp, "xb") as handle:
                digest, size = _copy(source, handle)
                handle.flush()
                os.fsync(handle.fileno())
            if overwrite:
                os.replace(tmp, target)
            else:
                # link() fails if the target appeared meanwhile: no silent overwrite.
                os.link(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return digest, size

    def _link_local(
        self, path: str, source: Path, overwrite: bool, sha256: str | None
    ) -> tuple[str, int] | None:
        """Hard-link ``source`` at ``path``; None when the two are on different devices."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        size = source.stat().st_size
        digest = sha256 or sha256_file(source)
        tmp = target.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{target.name}")
        try:
            os.link(source, tmp)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                return None
            raise
        try:
            os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            if overwrite:
                os.replace(tmp, target)
            else:
                os.link(tmp, target)  # fails if the target appeared meanwhile
        finally:
            tmp.unlink(missing_ok=True)
        return digest, size

    def _put_remote(self, path: str, source: Source) -> tuple[str, int]:
        with tempfile.NamedTemporaryFile(prefix=_TMP_PREFIX) as spool:
            digest, size = _copy(source, spool)
            spool.flush()
            self.fs.put_file(spool.name, path)
        return digest, size


def _copy(source: Source, sink: IO[bytes]) -> tuple[str, int]:
    """Copy ``source`` into ``sink``, returning (sha256, size)."""
    digest = hashlib.sha256()
    size = 0
    for chunk in _chunks(source):
        digest.update(chunk)
        sink.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _chunks(source: Source) -> Iterable[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield bytes(source)
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as handle:
            yield from iter(lambda: handle.read(_CHUNK), b"")
    elif hasattr(source, "read"):
        yield from iter(lambda: source.read(_CHUNK), b"")
    else:
        for chunk in source:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"artifact chunks must be bytes, got {type(chunk).__name__}")
            yield bytes(chunk)
