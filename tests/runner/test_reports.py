"""The HTML report: the same page as nbconvert's exporter, made without its HTML re-parse."""

from __future__ import annotations

import base64

import nbformat
from bs4 import BeautifulSoup
from nbconvert import HTMLExporter

from pipeline.runner.reports import NO_ALT_TEXT, ReportExporter, accessible_html

#: A 1x1 PNG.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()


def _notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("import numpy as np\nprint(np.arange(3))")
    code.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="[0 1 2]\n"),
        nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Fig>"}),
        nbformat.v4.new_output(
            "display_data",
            data={"text/html": '<table><tr><td><img src="x.png" alt="kept"></td></tr></table>'},
        ),
    ]
    code.metadata["papermill"] = {"duration": 0.1}  # executed cells carry metadata
    nb.cells = [nbformat.v4.new_markdown_cell("# Title\nsome *text*"), code]
    nb.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    return nb


def test_report_is_nbconvert_page_up_to_serialisation():
    nb = _notebook()
    expected, _ = HTMLExporter().from_notebook_node(nb)
    ours, _ = ReportExporter().from_notebook_node(nb)
    # nbconvert re-serialises its page through BeautifulSoup; doing the same to ours
    # must give exactly its page (alt texts, tabindex attributes and all).
    assert str(BeautifulSoup(ours, features="html.parser")) == expected
    again, _ = ReportExporter().from_notebook_node(nb)  # remembered highlighting
    assert again == ours
    assert ours.count(f'alt="{NO_ALT_TEXT}"') == 1 and 'alt="kept"' in ours


def test_accessible_html_edits_only_what_it_should():
    html = (
        '<img src="data:image/png;base64,QUJD">'
        '<img src="y" alt="given">'
        '<div class="jp-Cell-inputWrapper">'
        '<div class="a jp-OutputArea-output b" tabindex="1">'
        '<div class="jp-OutputArea-outputx">'
    )
    out = accessible_html(html)
    assert out.count("alt=") == 2 and f'<img alt="{NO_ALT_TEXT}" src="data:' in out
    assert '<div class="jp-Cell-inputWrapper" tabindex="0">' in out
    assert 'tabindex="1"' in out and out.count("tabindex") == 2  # not the -outputx one
