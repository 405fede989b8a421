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
from nbconvert.exporters.templateexporter import TemplateExporter
from nbconvert.filters.highlight import Highlight2HTML
from nbconvert.filters.strings import clean_html
from nbconvert.filters.widgetsdatatypefilter import WidgetsDataTypeFilter

__all__ = [
    "ATTEMPT_STATUSES",
    "mark_notebook",
    "strip_ansi",
    "write_report",
    "write_report_shielded",
]

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
_exporter: ReportExporter | None = None
#: What nbconvert writes when an image has no alternative text.
NO_ALT_TEXT = "No description has been provided for this image"
_IMG = re.compile(r"<img\b[^>]*>")
_ALT = re.compile(r"\salt=")
_FOCUSABLE = re.compile(
    r'<div class="(?=(?:[^"]*\s)?(?:jp-Cell-inputWrapper|jp-OutputArea-output)[\s"])([^"]*)"'
    r"(?![^>]*\btabindex=)"
)


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


def write_report_shielded(
    nb: nbformat.NotebookNode, notebook_path: Path, html_path: Path
) -> BaseException | None:
    """Write the report (see :func:`write_report`) to the end, even while being stopped.

    Python raises a signal handler's exception in the main thread, wherever it is: the
    orchestrator's SIGTERM on a cancel (which Prefect turns into ``TerminationSignal``),
    or Ctrl-C. Arriving during the second it takes to render the HTML, it would leave
    the attempt with no notebook at all. Here the writing runs in a helper thread,
    which no signal interrupts, while this thread waits for it.

    Returns
    -------
    BaseException or None
        What interrupted the wait, for the caller to raise once its records are kept.

    Raises
    ------
    OSError
        The report could not be written (and nothing interrupted the wait).
    """
    failure: list[BaseException] = []
    written = threading.Event()

    def write() -> None:
        try:
            write_report(nb, notebook_path, html_path)
        except BaseException as exc:  # handed to the waiting thread
            failure.append(exc)
        finally:
            written.set()

    writer = threading.Thread(target=write, name="astr-report", daemon=True)
    interrupt: BaseException | None = None
    try:
        writer.start()  # returns once the thread runs: a signal can land in here too
    except BaseException as exc:
        interrupt = exc
    while not written.is_set():
        try:
            if not written.wait(1.0) and not writer.is_alive() and not written.is_set():
                write()  # the interrupt came before the thread could start
        except BaseException as exc:  # a signal handler raised here: finish first
            interrupt = interrupt or exc
    if failure and interrupt is None:
        raise failure[0]
    return interrupt


class ReportExporter(HTMLExporter):
    """nbconvert's HTML exporter without its BeautifulSoup pass; the same page.

    nbconvert re-parses the whole rendered page (figures included, as base64) with
    Python's HTML parser only to add ``alt`` text to images and ``tabindex`` to cells,
    a third of the rendering time. Both edits are made here on the template's own
    tags with two regular expressions.
    """

    def from_notebook_node(  # type: ignore[override]
        self, nb: nbformat.NotebookNode, resources: dict[str, Any] | None = None, **kw: Any
    ) -> tuple[str, dict[str, Any]]:
        """Render ``nb``; see ``HTMLExporter.from_notebook_node``."""
        langinfo = nb.metadata.get("language_info", {})
        lexer = langinfo.get("pygments_lexer", langinfo.get("name", None))
        highlight = self.filters.get(
            "highlight_code", _RememberedHighlight(pygments_lexer=lexer, parent=self)
        )
        resources = self._init_resources(resources)
        widgets = WidgetsDataTypeFilter(
            notebook_metadata=self._nb_metadata, parent=self, resources=resources
        )
        self.register_filter("highlight_code", highlight)
        self.register_filter("filter_data_type", widgets)
        html, resources = TemplateExporter.from_notebook_node(self, nb, resources, **kw)
        return accessible_html(html), resources


class _RememberedHighlight(Highlight2HTML):
    """Pygments highlighting of a code cell, remembered: cells repeat on every run."""

    def __call__(self, source: str, language: str | None = None, metadata: Any = None) -> str:
        if metadata and "magics_language" in metadata:  # the one key that matters
            return super().__call__(source, language, metadata)
        key = (source, language or self.pygments_lexer)
        html = _HIGHLIGHTED.get(key)
        if html is None:
            html = super().__call__(source, language)
            if len(_HIGHLIGHTED) >= _HIGHLIGHTED_MAX:
                _HIGHLIGHTED.pop(next(iter(_HIGHLIGHTED)))
            _HIGHLIGHTED[key] = html
        return html


#: Highlighted code cells by (source, language), oldest dropped first.
_HIGHLIGHTED: dict[tuple[str, str | None], str] = {}
_HIGHLIGHTED_MAX = 1024


def accessible_html(html: str) -> str:
    """Give every ``<img>`` an ``alt`` and make input and output cells focusable."""
    html = _IMG.sub(_with_alt, html)
    return _FOCUSABLE.sub(r'<div class="\1" tabindex="0"', html)


def _with_alt(match: re.Match[str]) -> str:
    tag = match.group(0)
    # A figure's tag holds megabytes of base64: test with `in` before the regex.
    if "alt=" in tag and _ALT.search(tag):
        return tag
    return f'<img alt="{NO_ALT_TEXT}"{tag[4:]}'


def _render_html(nb: nbformat.NotebookNode) -> str:
    global _exporter
    with _exporter_lock:
        if _exporter is None:
            _exporter = ReportExporter()
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
