"""Where runs go and how they are grouped: real MLflow (SQLite in a temp folder), no DVC or Prefect."""

import os
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking import (
    EXPERIMENT_KIND,
    GROUP_ENV,
    PRESET_ENV,
    TAG_GROUP,
    TAG_PARAMS_HASH,
    TAG_PARENT_RUN,
    TAG_PID,
    TAG_PRESET,
    TAG_ROLE,
    TAG_STAGE,
    close_dead_runs,
    ensure_experiment,
    mlflow_run,
    pipeline_parent,
    store_root,
    tracking_uri,
)

PARAMS = {"seed": 0, "train": {"iterations": 3}}


@pytest.fixture
def origin(tmp_path, monkeypatch):
    """A project with a DVC experiment's temporary copy inside it, as `dvc queue start` makes."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    copy = tmp_path / ".dvc/tmp/exps/tmpab12cd"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "MLFLOW_TRACKING_URI", GROUP_ENV, PRESET_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_a_dvc_experiments_temporary_copy_tracks_into_the_repository_it_came_from(origin, monkeypatch):
    copy = origin / ".dvc/tmp/exps/tmpab12cd"
    monkeypatch.setenv("DVC_ROOT", str(origin))  # what DVC sets for every experiment it runs
    assert store_root(copy) == origin
    assert tracking_uri(TrackingConfig(), copy) == f"sqlite:///{origin / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/runs.db")  # relative: to the repository
    assert tracking_uri(TrackingConfig(), copy) == f"sqlite:///{origin / 'stores/runs.db'}"
    assert tracking_uri(TrackingConfig(tracking_uri="http://mlflow:5000"), copy) == "http://mlflow:5000"
    monkeypatch.delenv("DVC_ROOT")  # a stage started by hand in the copy: found by the path alone
    assert store_root(copy) == origin
    assert store_root(origin) == origin


def test_a_stray_dvc_root_does_not_move_another_projects_store(origin, tmp_path_factory, monkeypatch):
    other = tmp_path_factory.mktemp("other")
    monkeypatch.setenv("DVC_ROOT", str(origin))
    assert store_root(other) == other.resolve()
    assert tracking_uri(TrackingConfig(), other) == f"sqlite:///{other.resolve() / 'mlflow.db'}"


def stage(origin, name, *, fail=False, **kwargs):
    with mlflow_run(TrackingConfig(), stage=name, stage_params={"seed": 0}, all_params=PARAMS, root=origin, **kwargs) as run:
        if fail:
            raise RuntimeError("the stage broke")
        return run


def runs_of(uri):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cascade-clip")
    runs = client.search_runs([experiment.experiment_id])
    return experiment, [r for r in runs if TAG_STAGE in r.data.tags], [r for r in runs if TAG_ROLE in r.data.tags]


def test_the_stages_of_one_execution_nest_under_one_parent_named_after_the_experiment(origin, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "no-calibration")
    monkeypatch.setenv(PRESET_ENV, "voc12")
    stage(origin, "prepare_data")
    stage(origin, "train")
    experiment, stages, [parent] = runs_of(tracking_uri(TrackingConfig(), origin))
    assert experiment.tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    assert experiment.artifact_location == (origin / "mlartifacts").as_uri()
    assert {r.data.tags[TAG_PARENT_RUN] for r in stages} == {parent.info.run_id}
    assert parent.info.run_name == "voc12 / no-calibration" and parent.data.tags[TAG_PRESET] == "voc12"
    assert parent.data.tags[TAG_GROUP] == "no-calibration" and len(parent.data.tags[TAG_PARAMS_HASH]) == 16
    assert parent.data.params["train.iterations"] == "3" and parent.info.status == "FINISHED"
    assert TAG_PID not in parent.data.tags  # a parent outlives its stage processes

    monkeypatch.setenv("DVC_EXP_NAME", "another")  # another execution: another parent
    with pytest.raises(RuntimeError):
        stage(origin, "train", fail=True)
    _, _, parents = runs_of(tracking_uri(TrackingConfig(), origin))
    assert {p.info.run_name: p.info.status for p in parents} == {"voc12 / no-calibration": "FINISHED", "voc12 / another": "FAILED"}


def test_concurrent_stage_processes_of_one_execution_make_one_parent(origin):
    uri = tracking_uri(TrackingConfig(), origin)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, "cascade-clip", origin, uri)
    tags = {TAG_GROUP: "exec-1", "cascade.git_commit": "abc"}
    found, errors = [], []

    def claim():
        try:  # each its own client and lock file handle, as separate processes would have
            found.append(pipeline_parent(MlflowClient(uri), experiment_id, tags, PARAMS, origin))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(found) == 4 and len(set(found)) == 1
    [parent] = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_GROUP}` = 'exec-1'")
    assert parent.info.run_id == found[0]


def test_a_second_parent_made_elsewhere_loses_to_the_oldest(origin):
    """Two machines sharing a server and a group, without a common lock: both find the oldest."""
    uri = tracking_uri(TrackingConfig(), origin)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, "cascade-clip", origin, uri)
    tags = {TAG_GROUP: "exec-2", "cascade.git_commit": "abc"}
    first = client.create_run(experiment_id, tags={TAG_ROLE: "pipeline", TAG_GROUP: "exec-2"})
    time.sleep(0.01)
    client.create_run(experiment_id, tags={TAG_ROLE: "pipeline", TAG_GROUP: "exec-2"})
    assert pipeline_parent(client, experiment_id, tags, PARAMS, origin) == first.info.run_id


def test_a_dead_stage_leaves_its_parent_killed_until_the_execution_goes_on(origin, monkeypatch):
    import subprocess

    monkeypatch.setenv(GROUP_ENV, "exec-3")
    uri = tracking_uri(TrackingConfig(), origin)
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = stage(origin, "train")
    client, parent = MlflowClient(uri), run.data.tags[TAG_PARENT_RUN]
    client.set_tag(run.info.run_id, TAG_PID, str(dead.pid))  # as a kill -9 leaves them: RUNNING, the process gone
    client.update_run(run.info.run_id, status="RUNNING")
    client.update_run(parent, status="RUNNING")
    assert close_dead_runs("cascade-clip") == [run.info.run_id]
    assert client.get_run(parent).info.status == "KILLED"
    stage(origin, "train")  # the rerun
    assert client.get_run(parent).info.status == "FINISHED"


def test_long_stages_record_system_metrics_without_a_gpu_or_network(origin, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with mlflow_run(TrackingConfig(), stage="train", stage_params={}, all_params=PARAMS, root=origin,
                    system_metrics=True) as run:
        time.sleep(1.5)
    metrics = MlflowClient(tracking_uri(TrackingConfig(), origin)).get_run(run.info.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert not any(m.startswith("system/gpu") for m in metrics) or os.path.exists("/dev/nvidia0")
