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
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("prepare_data", "backbone", "embed_text", "train", "pseudo_label", "self_train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (repo / "data/prepared/manifest.parquet").exists()
    assert (repo / "dvc.lock").exists()
    assert json.loads((repo / "data/prepare_metrics.json").read_text())["images_train"] == 16
    metrics = json.loads((repo / "artifacts/metrics.json").read_text())
    for setting in ("inductive", "inductive_uncalibrated", "self_train", "control_no_transfer"):
        assert {"mIoU_seen", "mIoU_unseen", "hIoU"} <= set(metrics[setting])
    assert (repo / "artifacts/eval/inductive_overlays.png").exists()
    assert (repo / "artifacts/train/model_half.safetensors").exists()
    assert not (repo / "artifacts/checkpoints/train").exists()  # removed once the stage succeeded

    second = dvc(["repro"], repo, env)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert "Running stage" not in second.stdout

    shown = dvc(["metrics", "show", "--json"], repo, env)
    assert shown.returncode == 0 and "images_train" in shown.stdout and "hIoU" in shown.stdout
    plots = dvc(["plots", "show", "--json"], repo, env)
    assert plots.returncode == 0 and "train_curve.csv" in plots.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cascade-clip").experiment_id])
    assert {r.data.tags["cascade.stage"] for r in runs} >= {"prepare_data", "train", "evaluate"}
    assert len({r.data.tags["cascade.pipeline_group"] for r in runs}) == 1
    [evaluation] = [r for r in runs if r.data.tags["cascade.stage"] == "evaluate"]
    assert "hIoU" in evaluation.data.metrics and "train.iterations" in evaluation.data.params
