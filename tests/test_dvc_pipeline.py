"""`dvc repro` end to end in a temporary copy of the repository, with a tiny demo size."""

import json
import subprocess

import pytest

from tests.conftest import copy_project, venv_env
from tests.tiny import tiny_params_yaml

pytestmark = pytest.mark.slow


def dvc(args, cwd, env):
    return subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)


def test_dvc_repro_runs_then_does_nothing(tmp_path):
    repo = copy_project(tmp_path / "repo")
    (repo / "params.yaml").write_text(tiny_params_yaml())
    env = venv_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})

    first = dvc(["repro"], repo, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (repo / "data/prepared/manifest.parquet").exists()
    assert (repo / "dvc.lock").exists()
    metrics = json.loads((repo / "data/prepare_metrics.json").read_text())
    assert metrics["images_train"] == 16

    second = dvc(["repro"], repo, env)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert "Running stage" not in second.stdout

    shown = dvc(["metrics", "show", "--json"], repo, env)
    assert shown.returncode == 0 and "images_train" in shown.stdout
