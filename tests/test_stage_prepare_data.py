"""prepare_data as a real stage: a Prefect flow (test harness server) inside an MLflow run (SQLite)."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import render_params_yaml, load_params
from pipeline.data.prepared import read_manifest
from pipeline.tracking import TAG_COMMIT, TAG_GROUP, TAG_PARAMS_HASH, TAG_PARENT_RUN, TAG_PREFECT_FLOW_RUN, TAG_ROLE, TAG_STAGE
from stages import prepare_data
from stages.common import run_stage
from tests.project import REPO

TINY = {"dataset": {"demo": {"n_train": 12, "n_val": 4, "image_size": 40, "workers": 1}}}


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_uri, prefect_harness):
    """A temp project folder (dvc.yaml marks the root) with tiny demo params."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = yaml.safe_load(render_params_yaml())
    params["dataset"]["demo"].update(TINY["dataset"]["demo"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def runs(uri, role=TAG_STAGE):
    """The stage runs (role=TAG_ROLE: the pipeline executions' parent runs)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cascade-clip")
    return [r for r in client.search_runs([experiment.experiment_id]) if role in r.data.tags]


def test_stage_writes_outputs_and_a_tagged_mlflow_run(project, mlflow_uri):
    assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, []) == 0
    rows = read_manifest(project / "data/prepared")
    assert len(rows) == 16
    assert (project / "data/prepared/stage_params.yaml").exists()
    metrics = json.loads((project / "data/prepare_metrics.json").read_text())
    assert metrics["images_train"] == 12 and metrics["classes"] == 16

    [run] = runs(mlflow_uri)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags[TAG_STAGE] == "prepare_data"
    assert tags[TAG_COMMIT] and tags[TAG_GROUP]
    assert len(tags[TAG_PARAMS_HASH]) == 16
    assert run.data.params["dataset.demo.n_train"] == "12"
    assert run.data.params["dataset.name"] == "demo"
    assert run.data.params["seed"] == "0"
    assert "train.iterations" not in run.data.params  # only the sections the stage reads
    assert run.data.metrics["images_val"] == 4
    [parent] = runs(mlflow_uri, role=TAG_ROLE)  # the pipeline execution it belongs to
    assert run.data.tags[TAG_PARENT_RUN] == parent.info.run_id and parent.data.tags[TAG_GROUP] == tags[TAG_GROUP]
    assert parent.info.status == "FINISHED" and parent.info.run_name == tags[TAG_GROUP]
    assert len(tags[TAG_PREFECT_FLOW_RUN]) == 36  # the Prefect flow run of the stage


def test_params_hash_tag_follows_the_parameters_the_stage_reads(project, mlflow_uri):
    run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, [])
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["iterations"] = 3  # not read by prepare_data
    (project / "other.yaml").write_text(yaml.safe_dump(params))
    run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, ["--params", "other.yaml"])
    params["dataset"]["demo"]["n_val"] = 3
    (project / "third.yaml").write_text(yaml.safe_dump(params))
    run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, ["--params", "third.yaml"])
    hashes = [r.data.tags[TAG_PARAMS_HASH] for r in sorted(runs(mlflow_uri), key=lambda r: r.info.start_time)]
    assert hashes[0] == hashes[1] != hashes[2]


def test_invalid_params_stop_before_any_work(project, mlflow_uri, capsys):
    (project / "bad.yaml").write_text("dataset:\n  name: imagenet\n")
    assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, ["--params", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert "dataset.name: invalid value 'imagenet'" in err and "'demo'" in err
    assert not (project / "data").exists()
    assert not (project / "mlflow.db").exists()


def test_real_dataset_missing_offline_fails_with_a_clear_message(project, mlflow_uri, capsys):
    (project / "voc.yaml").write_text("dataset:\n  name: voc12\n  download: false\n")
    assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, ["--params", "voc.yaml"]) == 1
    err = capsys.readouterr().err
    assert "VOCtrainval_11-May-2012.tar" in err and "dataset.source_dir" in err and "Traceback" not in err
    assert not (project / "data/prepared").exists()
    [run] = runs(mlflow_uri)
    assert run.info.status == "FAILED"


def test_failure_in_the_middle_of_writing_leaves_no_output(project, mlflow_uri, monkeypatch, capsys):
    # a previous complete output must survive a failed rerun untouched
    assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, []) == 0
    before = {p.name: p.read_bytes() for p in (project / "data/prepared/images/train").iterdir()}
    calls = {"n": 0}
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):  # the disk "fills up" after 7 images
        calls["n"] += 1
        if calls["n"] > 7:
            raise OSError(28, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    params = load_params(project / "params.yaml", overrides={"seed": 1}).model_dump(mode="json")
    (project / "seed1.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, ["--params", "seed1.yaml"]) == 1
    assert f"error [prepare_data]: {project / 'data/prepared'}: disk full (no space left on device)" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in (project / "data/prepared/images/train").iterdir()}
    assert after == before
    assert sorted(p.name for p in (project / "data").iterdir()) == ["prepare_metrics.json", "prepared"]


def test_a_run_whose_process_died_is_marked_killed_by_the_next_run(project, mlflow_uri):
    import mlflow

    from pipeline.tracking import TAG_HOST, TAG_PID, TAG_STAGE

    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("cascade-clip")
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = MlflowClient(mlflow_uri).create_run(
        mlflow.get_experiment_by_name("cascade-clip").experiment_id,
        tags={TAG_STAGE: "prepare_data", TAG_PID: str(dead.pid), TAG_HOST: socket.gethostname()},
    )
    assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, []) == 0
    killed = MlflowClient(mlflow_uri).get_run(orphan.info.run_id)
    assert killed.info.status == "KILLED"


def test_a_second_run_of_a_running_stage_stops_at_once_naming_the_first(project, mlflow_uri, capsys):
    """One writer per stage: the second run touches nothing of the first's (its output folder being
    written aside survives), and once the first is gone (kill -9) the stage runs again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.io import PAUSE_BEFORE_RENAME_ENV

    first = subprocess.Popen([sys.executable, "-m", "stages.prepare_data"], cwd=project, start_new_session=True,
                             env={**os.environ, PAUSE_BEFORE_RENAME_ENV: "120", "PYTHONPATH": str(REPO)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((project / "data").glob(".prepared.tmp-*/manifest.parquet")) and time.monotonic() < deadline:
            assert first.poll() is None, "the first run ended before it could be caught writing"
            time.sleep(0.05)
        [aside] = (project / "data").glob(".prepared.tmp-*")
        assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, []) == 1
        err = capsys.readouterr().err
        assert f"error [prepare_data]: stage prepare_data is already running in {project} (pid {first.pid})" in err
        assert f"kill {first.pid}" in err
        assert aside.exists() and not (project / "data/prepared").exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, []) == 0
    assert len(read_manifest(project / "data/prepared")) == 16


@pytest.mark.parametrize("answer, code", [("503", 75), ("404", 1)])
def test_a_download_that_may_pass_exits_with_the_code_the_flow_retries(project, answer, code, capsys, monkeypatch):
    """A source fetched from a mirror (dataset.mirrors) that keeps answering 503 fails for a reason that passes:
    the stage's fetch task tries again (twice), then the stage exits with EXIT_TRANSIENT, which the pipeline flow
    retries; a 404 will not pass: one try, exit code 1."""
    from stages.common import EXIT_TRANSIENT
    from tests.http_server import FileServer

    assert EXIT_TRANSIENT == 75
    monkeypatch.setattr(prepare_data, "fetch_sources", prepare_data.fetch_sources.with_options(retry_delay_seconds=0))
    with FileServer(b"never served", plan=[answer] * 10) as server:
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["dataset"].update(name="voc12", download_retries=1, download_backoff=0.0, mirrors={
            "voc2012": {"url": server.url("VOCtrainval_11-May-2012.tar"), "md5": "0" * 32},
            "sbd": {"url": server.url("benchmark.tgz"), "md5": "0" * 32}})
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, []) == code
    tries = 1 + prepare_data.FETCH_RETRIES if answer == "503" else 1
    assert len(server.requests) == tries * (1 + (params["dataset"]["download_retries"] if answer == "503" else 0))
    assert "VOCtrainval_11-May-2012.tar" in capsys.readouterr().err
