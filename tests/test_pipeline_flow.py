"""The full-pipeline Prefect flow and its deployments."""

import importlib
import json

import pytest
import yaml

from tests.conftest import REPO


def test_prefect_yaml_deployments_point_to_flows_that_import():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert flow.name == "cascade-clip-pipeline"
        assert deployment["work_pool"]["name"] == "gpu"
        assert "CUDA_VISIBLE_DEVICES" in deployment["work_pool"]["job_variables"]["env"]
        assert deployment["concurrency_limit"] == 1
        preset = deployment["parameters"].get("preset")
        if preset:
            assert (REPO / "presets" / f"{preset}.yaml").exists(), preset
        flow.validate_parameters(deployment["parameters"])


@pytest.mark.slow
def test_pipeline_flow_returns_the_metrics_and_runs_overrides_as_a_dvc_experiment(tiny_pipeline, tmp_path, monkeypatch):
    """On a copy of the session's finished demo run: the flow's plain `dvc repro` finds it up to
    date and returns its metrics; an override runs as a DVC experiment, and only the stages it
    touches run again (no calibration: the inductive scores become the uncalibrated ones)."""
    from stages.pipeline_flow import pipeline

    run = tiny_pipeline.copy(tmp_path)
    for key in ("PATH", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, run.env[key])
    before = json.loads((run.repo / "artifacts/metrics.json").read_text())
    assert pipeline(project_dir=str(run.repo)) == before

    metrics = pipeline(overrides={"evaluate.calibration": 0.0}, experiment_name="no-calibration",
                       project_dir=str(run.repo))
    assert metrics == json.loads((run.repo / "artifacts/metrics.json").read_text())
    assert metrics["inductive"] == before["inductive_uncalibrated"] != before["inductive"]
    assert metrics["self_train"] == before["self_train"]
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import TAG_GROUP, TAG_PARENT_RUN, TAG_PREFECT_FLOW_RUN, TAG_ROLE, TAG_STAGE

    client = MlflowClient(run.env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cascade-clip").experiment_id])
    [evaluation] = [r for r in runs if TAG_STAGE in r.data.tags]
    assert evaluation.data.tags[TAG_STAGE] == "evaluate"
    assert evaluation.data.params["evaluate.calibration"] == "0.0"
    # nested under the flow's execution: named after the DVC experiment, tagged with the flow run
    [parent] = [r for r in runs if TAG_ROLE in r.data.tags]
    assert evaluation.data.tags[TAG_PARENT_RUN] == parent.info.run_id and parent.info.run_name == "no-calibration"
    assert parent.data.tags[TAG_GROUP].startswith("flow-") and len(parent.data.tags[TAG_PREFECT_FLOW_RUN]) == 36
    assert parent.data.metrics["hIoU"] == pytest.approx(metrics["self_train"]["hIoU"])


def test_the_flow_summary_tables_the_scored_settings_and_states_the_protocol():
    from stages.pipeline_flow import summary_markdown

    metrics = {"inductive": {"mIoU_seen": 40.0, "mIoU_unseen": 30.0, "hIoU": 34.29},
               "protocol": {"self_train_mode": "online", "dataset": "voc12", "unseen_split": "paper"}}
    text = summary_markdown(metrics, "voc12")
    assert "| inductive | 40.00 | 30.00 | 34.29 |" in text
    assert "| protocol" not in text and "nan" not in text
    assert "Protocol: dataset voc12, self_train_mode online, unseen_split paper" in text
