import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.compare import TAG_MODEL_FILE, compare, evaluation_runs, register_best
from pipeline.errors import CascadeError
from pipeline.tracking import TAG_STAGE


def log_run(tmp_path, stage, hiou, seen, unseen, params, status="FINISHED"):
    model = tmp_path / f"model_{hiou}.safetensors"
    model.write_bytes(b"weights")
    with mlflow.start_run(tags={TAG_STAGE: stage, TAG_MODEL_FILE: str(model)}) as run:
        mlflow.log_params(params)
        mlflow.log_metrics({"hIoU": hiou, "mIoU_seen": seen, "mIoU_unseen": unseen, "inductive.hIoU": hiou - 5})
    if status != "FINISHED":
        MlflowClient().set_terminated(run.info.run_id, status)
    return run


@pytest.fixture
def store(tmp_path, mlflow_uri):
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("cascade-clip")
    log_run(tmp_path, "evaluate", 60.0, 80.0, 48.0, {"model.aggregator": "nga", "seed": "0"})
    log_run(tmp_path, "evaluate", 70.0, 82.0, 61.0, {"model.aggregator": "sum", "seed": "0"})
    log_run(tmp_path, "evaluate", 99.0, 99.0, 99.0, {"model.aggregator": "x", "seed": "0"}, status="FAILED")
    log_run(tmp_path, "train", 0.0, 0.0, 0.0, {"model.aggregator": "nga", "seed": "0"})
    return MlflowClient(mlflow_uri)


def test_table_has_finished_evaluations_best_first_and_only_differing_params(store):
    table = compare(evaluation_runs(store, ["cascade-clip"]))
    assert [row["hIoU"] for row in table.rows] == [70.0, 60.0]
    assert "model.aggregator" in table.columns and "seed" not in table.columns
    assert table.rows[0]["inductive.hIoU"] == 65.0
    assert table.to_markdown().splitlines()[0].startswith("| run_id |")
    assert "70.00" in table.to_text() and table.to_csv().count("\n") == 3


def test_best_run_is_registered_with_alias_and_hiou_tag(store):
    best, version = register_best(store, evaluation_runs(store, ["cascade-clip"]), name="cascade-clip-demo")
    assert best.data.metrics["hIoU"] == 70.0
    by_alias = store.get_model_version_by_alias("cascade-clip-demo", "best")
    assert by_alias.version == version.version and by_alias.tags["hIoU"] == "70.0000"
    assert by_alias.source.endswith("model_70.0.safetensors")


def test_cli_writes_csv_and_markdown(store, tmp_path, capsys, mlflow_uri):
    assert main(["compare", "--tracking-uri", mlflow_uri, "--csv", str(tmp_path / "t.csv"),
                 "--markdown", str(tmp_path / "t.md"), "--register", "demo"]) == 0
    out = capsys.readouterr().out
    assert "hIoU" in out and "registered run" in out
    assert (tmp_path / "t.csv").read_text().startswith("run_id,")


def test_unknown_experiment_is_a_clear_error(store):
    with pytest.raises(CascadeError, match="no MLflow experiment named 'nope'; experiments in this store: .*cascade-clip"):
        evaluation_runs(store, ["nope"])
