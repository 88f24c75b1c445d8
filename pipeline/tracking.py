"""MLflow helpers: where runs go, how they are tagged and grouped, how parameters are flattened."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig, params_hash

GROUP_ENV = "CASCADE_CLIP_GROUP"  # set by `make repro` / the pipeline flow to group one execution's runs
TAG_STAGE = "cascade.stage"
TAG_COMMIT = "cascade.git_commit"
TAG_PARAMS_HASH = "cascade.params_hash"
TAG_GROUP = "cascade.pipeline_group"
TAG_DVC_EXP = "cascade.dvc_experiment"
TAG_PID = "cascade.pid"  # the process a run belongs to, so a killed run can be recognised later
TAG_HOST = "cascade.host"


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding dvc.yaml; else `start`."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return start


def tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """params' tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite mlflow.db at the project root."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def git_commit(root: Path | None = None) -> str:
    """HEAD's commit (with '-dirty' when tracked files changed), or 'unknown' outside git."""
    cwd = root or project_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_tags(stage: str, stage_params: dict[str, Any], all_params: dict[str, Any], root: Path | None = None) -> dict[str, str]:
    commit = git_commit(root)
    dvc_exp = os.environ.get("DVC_EXP_NAME", "")
    # one pipeline execution: an explicit id, else the DVC experiment, else code + full parameters
    group = os.environ.get(GROUP_ENV) or dvc_exp or f"{commit[:12]}-{params_hash(all_params)}"
    tags = {
        TAG_STAGE: stage,
        TAG_COMMIT: commit,
        TAG_PARAMS_HASH: params_hash(stage_params),
        TAG_GROUP: group,
        "mlflow.runName": f"{stage}",
    }
    if dvc_exp:
        tags[TAG_DVC_EXP] = dvc_exp
    return tags


@contextmanager
def mlflow_run(
    cfg: TrackingConfig,
    *,
    stage: str,
    stage_params: dict[str, Any],
    all_params: dict[str, Any],
    logged_params: dict[str, Any] | None = None,
    root: Path | None = None,
) -> Iterator[Any]:
    """Start an MLflow run for one stage: tagged, with the stage's parameters (or `logged_params`) logged flat.

    An exception inside marks the run FAILED (MLflow's context manager); KeyboardInterrupt KILLED.
    """
    import mlflow

    root = root or project_root()
    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        artifacts = (root / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    mlflow.set_experiment(cfg.experiment)
    tags = run_tags(stage, stage_params, all_params, root) | {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}
    close_dead_runs(cfg.experiment)
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        flat = flatten(logged_params if logged_params is not None else stage_params)
        mlflow.log_params({k: _param_value(v) for k, v in flat.items()})
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise


def close_dead_runs(experiment_name: str) -> list[str]:
    """Mark KILLED the RUNNING runs (of any stage) on this host whose process is gone (kill -9,
    power loss): MLflow never heard of their end. Any stage's next run does it, since DVC may
    restore a killed stage's outputs from its cache without running that stage again."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(experiment_name)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{socket.gethostname()}'",
    )
    closed = []
    for run in runs:
        pid = int(run.data.tags.get(TAG_PID, "0"))
        if pid and not _alive(pid):
            client.set_terminated(run.info.run_id, status="KILLED")
            client.set_tag(run.info.run_id, "cascade.end", "process gone; marked KILLED by the next run")
            closed.append(run.info.run_id)
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."
