"""Small notebooks written on the fly for the runner tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest

PARAMETERS = """\
x = 1  # a number echoed into outputs.json
output_dir = "."  # where outputs.json goes
sleep = 0.0  # seconds to sleep in the middle
fail = ""  # raise ValueError(fail) when non-empty
flaky = ""  # path of a marker: the first attempt raises ConnectionError and leaves it
crash = ""  # path of a marker: the first attempt kills its own kernel and leaves it
write_outputs = True  # write outputs.json (the notebook contract)
"""

BODY = [
    "import json, os, sys, time\nfrom pathlib import Path\nprint('started', x, flush=True)",
    "if flaky and not Path(flaky).exists():\n    Path(flaky).touch()\n"
    "    raise ConnectionError('flaky network')",
    "if crash and not Path(crash).exists():\n    Path(crash).touch()\n    os.kill(os.getpid(), 9)",
    "time.sleep(sleep)\nprint('slept', flush=True)",
    "if fail:\n    raise ValueError(fail)",
    "leak_check = 'leak' in globals()\nleak = True",
    "if write_outputs:\n"
    "    Path(output_dir, 'result.txt').write_text(str(x))\n"
    "    Path(output_dir, 'outputs.json').write_text(json.dumps({\n"
    "        'x': x, 'pid': os.getpid(), 'cwd': os.getcwd(), 'leak': leak_check,\n"
    "        'numpy_preloaded': 'numpy' in sys.modules}))",
]


@pytest.fixture
def make_notebook(tmp_path: Path) -> Callable[..., Path]:
    """Write the test notebook (optionally with extra cells) and return its path."""

    def make(name: str = "probe", extra: tuple[str, ...] = ()) -> Path:
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell(PARAMETERS)
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, *(nbformat.v4.new_code_cell(src) for src in (*BODY, *extra))]
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        path = tmp_path / "notebooks" / f"{name}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        return path

    return make
