"""The full-pipeline Prefect flow and its deployments."""

import importlib
import json

import pytest
import yaml

from tests.conftest import REPO, copy_project, venv_env
from tests.tiny import tiny_params_yaml


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
def test_full_pipeline_flow_runs_the_demo_end_to_end(tmp_path, monkeypatch, prefect_harness):
    from stages.pipeline_flow import pipeline

    repo = copy_project(tmp_path / "repo")
    (repo / "params.yaml").write_text(tiny_params_yaml())
    env = venv_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    metrics = pipeline(project_dir=str(repo))
    assert {"inductive", "self_train"} <= set(metrics)
    assert metrics == json.loads((repo / "artifacts/metrics.json").read_text())
