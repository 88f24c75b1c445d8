"""`dvc repro` end to end in a temporary copy of the repository, with a tiny demo size (the
session's shared run, `tiny_pipeline` in conftest.py)."""

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.io import sha256_file
from pipeline.tracking import TAG_MODEL_SHA256, TAG_PARENT_RUN, TAG_ROLE, TAG_SCORED_MODEL, TAG_STAGE
from tests.project import dvc

pytestmark = pytest.mark.slow

STAGES = ("prepare_data", "backbone", "embed_text", "train", "pseudo_label", "self_train", "evaluate")


def test_dvc_repro_runs_every_stage_and_writes_the_outputs(tiny_pipeline):
    repo = tiny_pipeline.repo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in tiny_pipeline.stdout
    assert (repo / "data/prepared/manifest.parquet").exists()
    assert (repo / "dvc.lock").exists()
    assert json.loads((repo / "data/prepare_metrics.json").read_text())["images_train"] == 16
    metrics = json.loads((repo / "artifacts/metrics.json").read_text())
    for setting in ("inductive", "inductive_uncalibrated", "self_train", "control_no_transfer"):
        assert {"mIoU_seen", "mIoU_unseen", "hIoU"} <= set(metrics[setting])
    assert (repo / "artifacts/eval/inductive_overlays.png").exists()
    assert (repo / "artifacts/train/model_half.safetensors").exists()
    assert not (repo / "artifacts/checkpoints/train").exists()  # removed once the stage succeeded
    assert not (repo / "artifacts/checkpoints/self_train").exists()


def test_dvc_repro_again_does_nothing_and_shows_metrics_and_plots(tiny_pipeline):
    repo, env = tiny_pipeline.repo, tiny_pipeline.env
    second = dvc(["repro"], repo, env)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert "Running stage" not in second.stdout

    shown = dvc(["metrics", "show", "--json"], repo, env)
    assert shown.returncode == 0 and "images_train" in shown.stdout and "hIoU" in shown.stdout
    plots = dvc(["plots", "show", "--json"], repo, env)
    assert plots.returncode == 0 and "train_curve.csv" in plots.stdout


def test_every_stage_logs_one_run_in_one_group_and_the_evaluation_carries_all_params(tiny_pipeline):
    client = MlflowClient(tiny_pipeline.env["MLFLOW_TRACKING_URI"])
    every = client.search_runs([client.get_experiment_by_name("cascade-clip").experiment_id])
    runs = [r for r in every if TAG_STAGE in r.data.tags]
    assert sorted(r.data.tags["cascade.stage"] for r in runs) == sorted(STAGES)
    assert {r.info.status for r in every} == {"FINISHED"}
    assert len({r.data.tags["cascade.pipeline_group"] for r in every}) == 1
    [evaluation] = [r for r in runs if r.data.tags["cascade.stage"] == "evaluate"]
    assert "hIoU" in evaluation.data.metrics and "train.iterations" in evaluation.data.params
    # one parent run for the execution, with the final scores
    [parent] = [r for r in every if TAG_ROLE in r.data.tags]
    assert {r.data.tags[TAG_PARENT_RUN] for r in runs} == {parent.info.run_id}
    assert parent.data.metrics["hIoU"] == evaluation.data.metrics["hIoU"]
    # the trained models are run artifacts with their sha256; the evaluation points to the one it scored
    by_stage = {r.data.tags[TAG_STAGE]: r for r in runs}
    for stage in ("train", "self_train"):
        tags = by_stage[stage].data.tags
        assert tags[TAG_MODEL_SHA256] == sha256_file(tiny_pipeline.repo / f"artifacts/{stage}/model.safetensors")
        assert [a.path for a in client.list_artifacts(by_stage[stage].info.run_id, "model")] == ["model/model.safetensors"]
    assert evaluation.data.tags[TAG_SCORED_MODEL] == f"runs:/{by_stage['self_train'].info.run_id}/model/model.safetensors"
