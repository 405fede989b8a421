"""Result cache of notebook runs.

A step whose notebook bytes, parameters (all but ``output_dir``), input checksums and
code match an earlier successful run is not run again: the stored outputs are returned.
The code is this package's source and the versions of the libraries the notebooks
compute with, so an upgrade never serves results the new code would not produce.
An entry is used only while every file it lists is still there with its recorded
checksum; otherwise the step runs again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.store.storage import sha256_file

__all__ = ["RunCache", "cache_key", "code_digest", "directory_checksums", "source_digest"]

#: Parameters that say where to write, not what to compute.
UNCACHED_PARAMETERS = frozenset({"output_dir"})

#: Libraries whose results the notebooks' numbers depend on.
COMPUTING_LIBRARIES = ("numpy", "scipy", "astropy", "reproject", "sep", "photutils", "torch")


def source_digest(root: Path, versions: Mapping[str, str]) -> str:
    """sha256 of every ``.py`` file under ``root`` (by relative path) and of ``versions``."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(json.dumps(dict(sorted(versions.items()))).encode())
    return digest.hexdigest()


def _versions(names: Sequence[str]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


@functools.cache
def code_digest() -> str:
    """Digest of the installed pipeline's source and its computing libraries' versions.

    Computed once per process: the code a process runs does not change under it.
    """
    import pipeline

    return source_digest(Path(pipeline.__file__).parent, _versions(COMPUTING_LIBRARIES))


def cache_key(
    notebook_bytes: bytes,
    parameters: Mapping[str, Any],
    input_checksums: Mapping[str, str],
    code: str | None = None,
) -> str:
    """Hash of what determines a notebook's result.

    Parameters
    ----------
    notebook_bytes : bytes
        The notebook file as stored.
    parameters : mapping
        Injected parameters; ``output_dir`` is left out.
    input_checksums : mapping
        sha256 of each input file by name.
    code : str, optional
        Digest of the code the notebook imports; default :func:`code_digest`.

    Returns
    -------
    str
        A sha256 hex digest.
    """
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(notebook_bytes).digest())
    kept = {k: v for k, v in parameters.items() if k not in UNCACHED_PARAMETERS}
    digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
    digest.update(json.dumps(dict(sorted(input_checksums.items()))).encode())
    digest.update((code if code is not None else code_digest()).encode())
    return digest.hexdigest()


def directory_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


class RunCache:
    """Cache entries as JSON files under one directory.

    Parameters
    ----------
    root : Path
        Directory of the entries (created on first write).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The stored entry for ``key`` if its files are intact, else None."""
        path = self.root / f"{key}.json"
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        output_dir = Path(entry.get("output_dir", ""))
        for name, digest in entry.get("files", {}).items():
            file = output_dir / name
            try:
                if sha256_file(file) != digest:
                    return None
            except OSError:
                return None
        for report in (entry.get("executed_notebook"), entry.get("html_report")):
            if report and not Path(report).exists():
                return None
        return entry

    def store(self, key: str, entry: Mapping[str, Any]) -> None:
        """Write an entry atomically (a reader never sees half of one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.root, suffix=".tmp", delete=False) as handle:
            json.dump(dict(entry), handle, indent=1, default=str)
        os.replace(handle.name, self.root / f"{key}.json")

    def forget(self, key: str) -> None:
        """Remove an entry if present."""
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{key}.json").unlink()
