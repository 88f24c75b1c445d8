from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.compare import TAG_MODEL_FILE, compare, evaluation_runs, fetch_registered_model, register_best
from pipeline.errors import CascadeError
from pipeline.io import sha256_file
from pipeline.tracking import (
    TAG_MODEL_SHA256,
    TAG_SCORED_MODEL,
    TAG_STAGE,
    ensure_experiment,
    log_model_file,
    tag_scored_model,
)


def log_run(tmp_path, stage, hiou, seen, unseen, params, status="FINISHED"):
    model = tmp_path / f"model_{hiou}.safetensors"
    model.write_bytes(f"weights {hiou}".encode())
    with mlflow.start_run(tags={TAG_STAGE: stage, TAG_MODEL_FILE: str(model)}) as run:
        mlflow.log_params(params)
        mlflow.log_metrics({"hIoU": hiou, "mIoU_seen": seen, "mIoU_unseen": unseen, "inductive.hIoU": hiou - 5})
        if stage == "evaluate":
            tag_scored_model(model)  # no run logged these bytes before: the evaluation logs them itself
    if status != "FINISHED":
        MlflowClient().set_terminated(run.info.run_id, status)
    return run


@pytest.fixture
def store(tmp_path, mlflow_uri):
    mlflow.set_tracking_uri(mlflow_uri)
    client = MlflowClient(mlflow_uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(client, "cascade-clip", tmp_path, mlflow_uri))
    log_run(tmp_path, "evaluate", 60.0, 80.0, 48.0, {"model.aggregator": "nga", "seed": "0"})
    log_run(tmp_path, "evaluate", 70.0, 82.0, 61.0, {"model.aggregator": "sum", "seed": "0"})
    log_run(tmp_path, "evaluate", 99.0, 99.0, 99.0, {"model.aggregator": "x", "seed": "0"}, status="FAILED")
    log_run(tmp_path, "train", 0.0, 0.0, 0.0, {"model.aggregator": "nga", "seed": "0"})
    return client


def stored_file(client, uri: str) -> Path:
    """Where a runs:/ artifact lies in the local store (to tamper with it)."""
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    return Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / path


def test_table_has_finished_evaluations_best_first_and_only_differing_params(store):
    table = compare(evaluation_runs(store, ["cascade-clip"]))
    assert [row["hIoU"] for row in table.rows] == [70.0, 60.0]
    assert "model.aggregator" in table.columns and "seed" not in table.columns
    assert table.rows[0]["inductive.hIoU"] == 65.0
    assert table.to_markdown().splitlines()[0].startswith("| run_id |")
    assert "70.00" in table.to_text() and table.to_csv().count("\n") == 3


def test_best_run_is_registered_from_its_logged_artifact_with_alias_hiou_and_sha256(store, tmp_path):
    best, version = register_best(store, evaluation_runs(store, ["cascade-clip"]), name="cascade-clip-demo")
    assert best.data.metrics["hIoU"] == 70.0
    by_alias = store.get_model_version_by_alias("cascade-clip-demo", "best")
    assert by_alias.version == version.version and by_alias.tags["hIoU"] == "70.0000"
    assert by_alias.source == f"runs:/{best.info.run_id}/model/model_70.0.safetensors"  # never a workspace path
    assert by_alias.tags[TAG_MODEL_SHA256] == sha256_file(tmp_path / "model_70.0.safetensors")


def test_a_registered_model_is_fetched_with_its_sha256_checked_and_a_changed_file_refused(store, tmp_path, mlflow_uri, capsys):
    register_best(store, evaluation_runs(store, ["cascade-clip"]), name="demo")
    (tmp_path / "model_70.0.safetensors").write_bytes(b"the workspace moved on")  # irrelevant: the store's copy counts
    got = fetch_registered_model(store, "demo", tmp_path / "out/model.safetensors")
    assert got.read_bytes() == b"weights 70.0"
    assert main(["fetch-model", "demo", "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert (tmp_path / "cli.safetensors").read_bytes() == b"weights 70.0"
    with pytest.raises(CascadeError, match="exists"):
        fetch_registered_model(store, "demo", got)

    stored = stored_file(store, store.get_model_version_by_alias("demo", "best").source)
    stored.write_bytes(b"weights 70.0, tampered")
    with pytest.raises(CascadeError, match="demo version 1: runs:/.* has sha256 .* but .* was recorded when run .* logged it"):
        fetch_registered_model(store, "demo", tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()
    assert not list(tmp_path.glob(".again.safetensors.tmp-*"))
    capsys.readouterr()
    assert main(["fetch-model", "demo", "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "again.safetensors")]) == 2
    assert "refusing to use it" in capsys.readouterr().err and not (tmp_path / "again.safetensors").exists()


def test_an_evaluation_points_to_the_model_its_training_run_logged(store, tmp_path):
    model = tmp_path / "trained.safetensors"
    model.write_bytes(b"trained weights")
    with mlflow.start_run(tags={TAG_STAGE: "self_train"}) as training:
        log_model_file(model)
    with mlflow.start_run(tags={TAG_STAGE: "evaluate"}) as evaluation:
        tag_scored_model(model)
    tags = store.get_run(evaluation.info.run_id).data.tags
    assert tags[TAG_SCORED_MODEL] == f"runs:/{training.info.run_id}/model/trained.safetensors"
    assert not store.list_artifacts(evaluation.info.run_id)  # the bytes are stored once


def test_an_evaluation_without_a_logged_model_cannot_be_registered(store, tmp_path):
    with mlflow.start_run(tags={TAG_STAGE: "evaluate", TAG_MODEL_FILE: str(tmp_path / "model_70.0.safetensors")}):
        mlflow.log_metrics({"hIoU": 80.0})  # as evaluations logged before models were logged to MLflow
    with pytest.raises(CascadeError, match="records no logged model .*`dvc repro --force --single-item evaluate`"):
        register_best(store, evaluation_runs(store, ["cascade-clip"]), name="old")


def test_cli_writes_csv_and_markdown(store, tmp_path, capsys, mlflow_uri):
    assert main(["compare", "--tracking-uri", mlflow_uri, "--csv", str(tmp_path / "t.csv"),
                 "--markdown", str(tmp_path / "t.md"), "--register", "demo"]) == 0
    out = capsys.readouterr().out
    assert "hIoU" in out and "registered run" in out
    assert (tmp_path / "t.csv").read_text().startswith("run_id,")


def test_unknown_experiment_is_a_clear_error(store):
    with pytest.raises(CascadeError, match="no MLflow experiment named 'nope'; experiments in this store: .*cascade-clip"):
        evaluation_runs(store, ["nope"])
