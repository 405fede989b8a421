"""Packaging: pyproject.toml and environment.yml describe the same environment."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# conda-forge names that differ from the PyPI ones
CONDA_TO_PYPI = {"pytorch": "torch"}
# only in environment.yml: the interpreter and the installer
CONDA_ONLY = {"python", "pip"}


def _name(requirement: str) -> str:
    raw = re.split(r"[\s<>=!~\[;]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", raw).lower()


def _pyproject_names() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return {_name(r) for r in [*project["dependencies"], *extras["s3"], *extras["dev"]]}


def _environment_names() -> set[str]:
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    names = set()
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):
            names |= {_name(r) for r in entry.get("pip", [])}
        else:
            name = _name(entry)
            names.add(CONDA_TO_PYPI.get(name, name))
    return names - CONDA_ONLY


def test_environment_yml_and_pyproject_agree_on_package_names() -> None:
    pyproject, conda = _pyproject_names(), _environment_names()
    assert pyproject - conda == set(), "in pyproject.toml but not environment.yml"
    assert conda - pyproject == set(), "in environment.yml but not pyproject.toml"


def test_environment_yml_uses_conda_forge() -> None:
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    assert environment["channels"] == ["conda-forge"]


def test_committed_notebooks_have_no_outputs_and_a_parameters_cell() -> None:
    for path in sorted((REPO / "notebooks").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        notebook = json.loads(path.read_text())
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), path
        assert "parameters" in code[0].get("metadata", {}).get("tags", []), path
