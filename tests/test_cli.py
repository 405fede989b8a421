"""The ``astr`` command: run as a user would, through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table


def _astr(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    exe = shutil.which("astr", path=str(Path(sys.executable).parent)) or "astr"
    return subprocess.run(
        [exe, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=120,
    )


def test_help_lists_the_commands() -> None:
    result = _astr("--help")
    assert result.returncode == 0, result.stderr
    for command in (
        "config",
        "store",
        "server",
        "observe",
        "worker",
        "demo",
        "train",
        "hpo",
        "evaluate",
        "deploy",
        "rollback",
        "retrain",
        "models",
        "dataset",
    ):
        assert command in result.stdout


def test_config_show_json_masks_secrets(tmp_path: Path) -> None:
    result = _astr(
        "config",
        "show",
        "--json",
        env={
            "ASTR_API_TOKENS": "very-secret-token",
            "ASTR_MAX_CONCURRENT_FLOWS": "6",
            "ASTR_DATABASE_URL": "postgresql+psycopg://astr:pw123@db/astr",
        },
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["max_concurrent_flows"] == 6
    assert shown["api_tokens"] == ["****"]
    assert "very-secret-token" not in result.stdout and "pw123" not in result.stdout
    assert shown["home"] == os.environ["ASTR_HOME"]


def test_invalid_setting_exits_with_a_clear_error() -> None:
    result = _astr("config", "show", env={"ASTR_RETRY_ATTEMPTS": "lots"})
    assert result.returncode == 2
    assert "retry_attempts" in result.stderr and "0 to 20" in result.stderr
    assert "Traceback" not in result.stderr


def test_store_init_and_status(tmp_path: Path) -> None:
    home = Path(os.environ["ASTR_HOME"])
    init = _astr("store", "init")
    assert init.returncode == 0, init.stderr
    assert (home / "catalogue.db").is_file() and (home / "artifacts").is_dir()
    status = _astr("store", "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["revision"] == data["head_revision"] is not None
    assert data["records"]["observations"] == 0
    assert data["storage_check"].startswith("ok")


@pytest.mark.integration
def test_demo_runs_a_simulated_night(tmp_path: Path, prefect_server_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASTR_")}
    env["ASTR_PREFECT_SERVER_URL"] = prefect_server_url  # the session's server, not :4200
    result = subprocess.run(
        [
            shutil.which("astr", path=str(Path(sys.executable).parent)) or "astr",
            "demo",
            "--pairs",
            "1",
            "--size",
            "512",
            "--model-pairs",
            "4",
            "--model-size",
            "1024",
            "--model-epochs",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert "night: recovered" in out and "transients with injected S/N >= 7" in out
    # no model was deployed: the demo trained one first, and the night was scored with it
    assert "real/bogus model: version 1 deployed to production" in out
    assert "rb_score: real/bogus model v1" in out
    table = Table.read(
        tmp_path / ".astr" / "demo" / "output" / "pair-01" / "candidates.ecsv", format="ascii.ecsv"
    )
    scores = np.asarray(table["rb_score"], dtype=float)
    assert len(scores) and np.all((scores >= 0) & (scores <= 1))
    assert (tmp_path / ".astr" / "demo" / "output" / "pair-01" / "candidates.ecsv").is_file()
    assert (
        tmp_path / ".astr" / "demo" / "output" / "pair-01" / "reports" / "validation.html"
    ).is_file()


@pytest.mark.parametrize("args", [["config"], ["store"]])
def test_groups_without_a_command_show_help(args: list[str]) -> None:
    result = _astr(*args)
    assert "Usage" in result.stdout + result.stderr


@pytest.mark.integration
def test_model_commands_build_train_deploy_list_and_refuse(prefect_server_url: str) -> None:
    env = {"ASTR_PREFECT_SERVER_URL": prefect_server_url}
    built = _astr(
        "dataset", "simulate", "--pairs", "3", "--size", "512", "--no-vary", "--json", env=env
    )
    assert built.returncode == 0, built.stderr
    dataset = json.loads(built.stdout)
    assert dataset["candidates"] == sum(sum(c.values()) for c in dataset["counts"].values())

    trained = _astr(
        "train",
        "--dataset",
        dataset["dataset_id"],
        "--set",
        "epochs=2",
        "--set",
        "width=4",
        "--deploy",
        "production",
        "--json",
        env=env,
    )
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout)
    assert result["model_id"] == "1" and result["deployment"]["deployed"]
    listed = _astr("models", "list", "--json", env=env)
    (version,) = json.loads(listed.stdout)
    assert version["aliases"] == ["production"] and version["dataset_id"] == dataset["dataset_id"]
    assert version["metrics"]["auc"] == pytest.approx(result["metrics"]["auc"])

    nothing = _astr("rollback", "--env", "production", env=env)
    assert nothing.returncode == 2 and "first version deployed" in nothing.stderr
    unknown = _astr("train", "--dataset", "nope", env=env)
    assert unknown.returncode == 2 and "no dataset 'nope'" in unknown.stderr
    bad = _astr("train", "--set", "epochs", env=env)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    for failed in (nothing, unknown, bad):
        assert "Traceback" not in failed.stderr
