"""A queued DVC experiment (`dvc exp run --queue` + `dvc queue start`) runs in a temporary copy
under .dvc/tmp/exps/ that DVC deletes afterwards: its MLflow runs must land in the repository's
own default store (mlflow.db, mlartifacts/), nested under one parent run that carries hIoU, and
its model must register and load from there."""

import json
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main as cli
from pipeline.compare import load_registered_model
from pipeline.errors import CascadeError
from pipeline.io import sha256_file
from pipeline.tracking import TAG_DVC_EXP, TAG_PARENT_RUN, TAG_ROLE, TAG_SCORED_MODEL, TAG_STAGE
from tests.conftest import dvc

pytestmark = pytest.mark.slow

EXPERIMENT = "no-calibration"


def wait_for_queue(repo: Path, env: dict, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dvc(["queue", "status"], repo, env).stdout
        if EXPERIMENT in status and not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(2)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


@pytest.fixture(scope="module")
def queued(tiny_pipeline, tmp_path_factory):
    """A copy of the session's demo run with no MLFLOW_TRACKING_URI (the default store at the
    repository root), and one queued experiment that changes only evaluate's parameters, run."""
    run = tiny_pipeline.copy(tmp_path_factory.mktemp("queued"))
    env = {k: v for k, v in run.env.items() if k != "MLFLOW_TRACKING_URI"}
    done = dvc(["exp", "run", "--queue", "--name", EXPERIMENT, "-S", "evaluate.calibration=0.0"], run.repo, env)
    assert done.returncode == 0, done.stderr
    started = dvc(["queue", "start", "--jobs", "1"], run.repo, env)
    assert started.returncode == 0, started.stderr
    status = wait_for_queue(run.repo, env)
    logs = dvc(["queue", "logs", EXPERIMENT], run.repo, env).stdout
    assert "Success" in status, status + logs
    assert "Running stage 'evaluate'" in logs and "Running stage 'train'" not in logs, logs
    return run.repo, env


def test_a_queued_experiment_records_into_the_repositorys_store_under_a_parent_with_hiou(queued, tiny_pipeline):
    repo, _ = queued
    assert not list((repo / ".dvc/tmp/exps").glob("tmp*")), "the temporary copy is still there"
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")  # the default store of the repository itself
    experiment = client.get_experiment_by_name("cascade-clip")
    runs = client.search_runs([experiment.experiment_id])
    [evaluation] = [r for r in runs if TAG_STAGE in r.data.tags]
    [parent] = [r for r in runs if TAG_ROLE in r.data.tags]
    assert evaluation.data.tags[TAG_STAGE] == "evaluate" and evaluation.info.status == "FINISHED"
    assert evaluation.data.tags[TAG_PARENT_RUN] == parent.info.run_id
    assert parent.info.run_name == EXPERIMENT and parent.data.tags[TAG_DVC_EXP] == EXPERIMENT
    assert parent.info.status == "FINISHED" and parent.data.params["evaluate.calibration"] == "0.0"
    before = json.loads((tiny_pipeline.repo / "artifacts/metrics.json").read_text())["self_train"]
    for metric in ("mIoU_seen", "mIoU_unseen", "hIoU"):  # the final (self-trained) model's, calibration-free
        assert parent.data.metrics[metric] == pytest.approx(before[metric]) == evaluation.data.metrics[metric]
    # its artifacts outlived the temporary copy: they are in the repository's mlartifacts/
    stored = Path(urlparse(evaluation.info.artifact_uri).path)
    assert stored.is_relative_to(repo / "mlartifacts") and (stored / "per_class_iou.parquet").is_file()


def test_the_queued_experiments_model_registers_as_a_runs_uri_and_loads_checked(queued):
    repo, _ = queued
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    assert cli(["compare", "--tracking-uri", uri, "--register", "demo"]) == 0
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("demo", "best")
    [evaluation] = client.search_runs([client.get_experiment_by_name("cascade-clip").experiment_id],
                                      filter_string=f"tags.`{TAG_STAGE}` = 'evaluate'")
    assert version.source == evaluation.data.tags[TAG_SCORED_MODEL] and version.source.startswith("runs:/")
    model = load_registered_model(client, "demo")
    assert sum(p.numel() for p in model.parameters()) > 0

    run_id, _, path = version.source.removeprefix("runs:/").partition("/")
    stored = Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / path
    assert sha256_file(stored) == sha256_file(repo / "artifacts/self_train/model.safetensors")
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped in the store
        with pytest.raises(CascadeError, match="refusing to use it"):
            load_registered_model(client, "demo")
    finally:
        stored.write_bytes(original)
