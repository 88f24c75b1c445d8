"""kill -9 in the middle of a stage, then `dvc repro` again: the result equals an uninterrupted run."""

import hashlib
import os
import signal
import subprocess
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import copy_project, venv_env
from tests.tiny import tiny_params_yaml

pytestmark = pytest.mark.slow

TRAIN = {"train": {"iterations": 120, "checkpoint_every": 4, "batch_size": 2, "log_every": 10}}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dvc(args, cwd, env, **kw):
    return subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, **kw)


def checkpoint_step(path):
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def test_train_killed_mid_run_resumes_to_bit_identical_weights(tmp_path):
    repo = copy_project(tmp_path / "repo")
    (repo / "params.yaml").write_text(tiny_params_yaml(TRAIN))
    env = venv_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert dvc(["repro", "embed_text"], repo, env).returncode == 0

    # kill -9 the whole `dvc repro` process group once a checkpoint past step 8 exists
    checkpoint = repo / "artifacts/checkpoints/train/last.pt"
    victim = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while checkpoint_step(checkpoint) < 8 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, "the stage finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = checkpoint_step(checkpoint)
    assert 8 <= killed_at < 120
    assert not (repo / "artifacts/train").exists()  # nothing partial at the output path

    resumed = dvc(["repro", "train"], repo, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert not checkpoint.exists()
    after_crash = sha(repo / "artifacts/train/model.safetensors")

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cascade-clip").experiment_id],
                              filter_string="tags.`cascade.stage` = 'train'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]

    clean = dvc(["repro", "--force", "--single-item", "train"], repo, env)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "resuming from" not in clean.stdout + clean.stderr
    assert sha(repo / "artifacts/train/model.safetensors") == after_crash
