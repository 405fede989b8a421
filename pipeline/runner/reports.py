"""Executed notebooks as reports: marked with how the attempt ended, rendered to HTML."""

from __future__ import annotations

import functools
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import nbformat
from nbconvert import HTMLExporter
from nbconvert.filters.strings import clean_html

__all__ = ["ATTEMPT_STATUSES", "mark_notebook", "strip_ansi", "write_report"]

#: How an attempt can end.
ATTEMPT_STATUSES = ("completed", "failed", "cancelled", "timed_out", "kernel_died")

_BANNERS = {
    "failed": "FAILED",
    "cancelled": "CANCELLED",
    "timed_out": "TIMED OUT",
    "kernel_died": "KERNEL DIED",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_exporter_lock = threading.Lock()
_exporter: HTMLExporter | None = None


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes (IPython tracebacks carry them)."""
    return _ANSI.sub("", text)


def mark_notebook(
    nb: nbformat.NotebookNode, *, status: str, attempt: int, info: dict[str, Any]
) -> nbformat.NotebookNode:
    """Record how an attempt ended: in the metadata, and in a banner cell unless it completed.

    Parameters
    ----------
    nb : NotebookNode
        The executed (possibly partial) notebook; modified in place and returned.
    status : str
        One of ``ATTEMPT_STATUSES``.
    attempt : int
        Attempt number, from 1.
    info : dict
        JSON-serialisable facts stored under ``metadata["astr"]`` (error, timings...).
    """
    if status not in ATTEMPT_STATUSES:
        raise ValueError(f"unknown attempt status {status!r}; expected one of {ATTEMPT_STATUSES}")
    nb.metadata["astr"] = {"status": status, "attempt": attempt, **info}
    if status != "completed":
        error = strip_ansi(str(info.get("error") or "")).strip()
        text = f"**{_BANNERS[status]}** — attempt {attempt} of this notebook did not finish."
        if error:
            first = error.splitlines()[0]
            text += f"\n\n`{first[:500]}`"
        banner = nbformat.v4.new_markdown_cell(text)
        banner.metadata["tags"] = ["astr-status"]
        nb.cells.insert(0, banner)
    return nb


def write_report(nb: nbformat.NotebookNode, notebook_path: Path, html_path: Path) -> None:
    """Write the executed notebook and its HTML rendering, each atomically.

    The HTML is rendered in-process (a fresh ``jupyter nbconvert`` costs seconds).
    """
    _atomic_write(notebook_path, nbformat.writes(nb))
    _atomic_write(html_path, _render_html(nb))


def _render_html(nb: nbformat.NotebookNode) -> str:
    global _exporter
    with _exporter_lock:
        if _exporter is None:
            _exporter = HTMLExporter()
            _exporter.register_filter("clean_html", _clean_html)
        body, _resources = _exporter.from_notebook_node(nb)
    return body


#: Longest HTML (characters) whose sanitised form is remembered: code cells, small outputs.
_CLEAN_CACHE_CHARS = 32_768


def _clean_html(element: str | bytes) -> str:
    """The ``clean_html`` filter of nbconvert, remembered for short inputs; the same result.

    The report template sanitises every highlighted code cell with bleach, about half of
    the rendering time; a notebook's cells are the same on every run, so each is cleaned
    once per process. Long HTML (tables, figures as SVG) is cleaned every time.
    """
    text = element.decode() if isinstance(element, bytes) else str(element)
    if len(text) > _CLEAN_CACHE_CHARS:
        return clean_html(text)
    return _clean_html_cached(text)


@functools.lru_cache(maxsize=512)
def _clean_html_cached(text: str) -> str:
    return clean_html(text)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False
    ) as handle:
        handle.write(text)
    os.replace(handle.name, path)
