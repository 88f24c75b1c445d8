"""MLflow helpers: which store runs go to, how they are tagged, grouped under one parent run per
pipeline execution, and how parameters and model files are logged.

One store, whatever runs the pipeline: the default store (SQLite `mlflow.db` and `mlartifacts/`)
belongs to the project's own repository. A queued DVC experiment runs its stages in a temporary
copy (`.dvc/tmp/exps/tmpXXXX`) that DVC deletes afterwards; DVC tells the stages where the copy
came from in $DVC_ROOT (set to the originating repository for every `dvc exp run`, queued or
not), and such a copy is also recognised by its path. See docs/tracking.md.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.config import TrackingConfig, params_hash
from pipeline.io import sha256_file

GROUP_ENV = "CASCADE_CLIP_GROUP"  # set by `make repro` / the pipeline flow to group one execution's runs
PRESET_ENV = "CASCADE_CLIP_PRESET"  # set by the pipeline flow: the preset an execution runs
FLOW_RUN_ENV = "CASCADE_CLIP_FLOW_RUN"  # set by the pipeline flow: its Prefect flow run id
STORE_ENV = "CASCADE_CLIP_STORE"  # set by the pipeline flow in its clone: the project whose store the runs go to
TAG_STAGE = "cascade.stage"
TAG_COMMIT = "cascade.git_commit"
TAG_PARAMS_HASH = "cascade.params_hash"
TAG_GROUP = "cascade.pipeline_group"
TAG_DVC_EXP = "cascade.dvc_experiment"
TAG_PRESET = "cascade.preset"
TAG_PID = "cascade.pid"  # the process a run belongs to, so a killed run can be recognised later
TAG_HOST = "cascade.host"
TAG_ROLE = "cascade.role"  # "pipeline" on the parent run of one pipeline execution
TAG_PREFECT_FLOW_RUN = "cascade.prefect_flow_run_id"
TAG_MODEL_SHA256 = "cascade.model_sha256"  # on the run that logged a model file: the file's sha256 at logging
TAG_MODEL_ARTIFACT = "cascade.model_artifact"  # ... and its artifact path in that run
TAG_MODEL_PROJECT = "cascade.model_project"  # ... and the repository it was made in (whose DVC cache has its backbone)
TAG_SCORED_MODEL = "cascade.scored_model"  # on an evaluation: runs:/<run_id>/<path> of the model it scored
TAG_SCORED_SHA256 = "cascade.scored_model_sha256"  # ... and that file's sha256
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under this one
PIPELINE_ROLE = "pipeline"
# MLflow 3's UI opens an experiment of this kind in its model-training view (runs, charts), not GenAI traces
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
MODEL_ARTIFACT_DIR = "model"
EXPS_TMP = (".dvc", "tmp", "exps")  # where DVC runs queued experiments, in temporary copies
PARENT_LOCK = ".cascade-clip/locks/mlflow-parent.lock"  # serialises find-or-create of parent runs


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding dvc.yaml; else `start`."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return start


def store_root(root: Path | None = None) -> Path:
    """The repository whose tracking store runs go to: $CASCADE_CLIP_STORE when set (a flow run's clone
    records into the project it was cloned from), else `root` (default: the project root), or, when
    `root` is a DVC experiment's temporary copy, the repository the experiment was queued from."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).resolve()
    root = (root or project_root()).resolve()
    origin = os.environ.get("DVC_ROOT")
    if origin:
        origin_path = Path(origin).resolve()
        if root == origin_path or root.is_relative_to(origin_path.joinpath(*EXPS_TMP)):
            return origin_path
    parts = root.parts  # a temporary copy without $DVC_ROOT (a stage started by hand there)
    for i in range(len(parts) - len(EXPS_TMP) - 1, 0, -1):
        if parts[i:i + len(EXPS_TMP)] == EXPS_TMP:
            return Path(*parts[:i])
    return root


def tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """params' tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite mlflow.db in the store root
    (`store_root`). A relative SQLite or plain path is taken relative to the store root too, so a
    temporary experiment copy writes into the repository's store, not its own."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    base = store_root(root)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return f"sqlite:///{base / uri.removeprefix('sqlite:///')}"
    if not urlparse(uri).scheme and not Path(uri).is_absolute():
        return str(base / uri)
    return uri


def _local_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file", "sqlite")


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
        TAG_GROUP: group.replace("'", "_"),  # quoted in search filters
        "mlflow.runName": f"{stage}",
    }
    if dvc_exp:
        tags[TAG_DVC_EXP] = dvc_exp
    return tags


def parent_name(group: str) -> str:
    """A pipeline execution's run name: its preset and DVC experiment, else its group."""
    return " / ".join(n for n in (os.environ.get(PRESET_ENV), os.environ.get("DVC_EXP_NAME")) if n) or group


def ensure_experiment(client, name: str, root: Path, uri: str) -> str:
    """The experiment's id, created if missing (artifacts under the store root's mlartifacts/ for a
    local store), and kind-tagged for MLflow 3's model-training view."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (root / "mlartifacts").as_uri() if _local_store(uri) else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        except MlflowException:  # another stage process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND[0] not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def parent_runs(client, experiment_id: str, group: str) -> list:
    """The parent runs of `group`, oldest first (ties broken by run id): the first is the one."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_ROLE}` = '{PIPELINE_ROLE}' and tags.`{TAG_GROUP}` = '{group}'")
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def pipeline_parent(client, experiment_id: str, stage_tags: dict[str, str], all_params: dict[str, Any], root: Path) -> str:
    """The run id of the parent run of this stage's pipeline execution (its group), created by
    the first stage that needs it, with the execution's names, full params and their hash.

    Stage processes of one execution on this machine take turns (a file lock in the store root);
    processes on other machines sharing a group and a server converge on the oldest parent: one
    that finds it created a second one deletes its own."""
    group = stage_tags[TAG_GROUP]
    with _file_lock(root / PARENT_LOCK):
        found = parent_runs(client, experiment_id, group)
        if found:
            return found[0].info.run_id
        tags = {TAG_ROLE: PIPELINE_ROLE, TAG_GROUP: group, TAG_COMMIT: stage_tags[TAG_COMMIT],
                TAG_PARAMS_HASH: params_hash(all_params)}
        for tag, env in ((TAG_DVC_EXP, "DVC_EXP_NAME"), (TAG_PRESET, PRESET_ENV), (TAG_PREFECT_FLOW_RUN, FLOW_RUN_ENV)):
            if os.environ.get(env):
                tags[tag] = os.environ[env]
        mine = client.create_run(experiment_id, run_name=parent_name(group), tags=tags)
        log_params(client, mine.info.run_id, all_params)
        winner = parent_runs(client, experiment_id, group)[0].info.run_id
        if winner != mine.info.run_id:
            client.delete_run(mine.info.run_id)
        return winner


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
    for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=flat[start:start + 100])


def _end_parent(client, parent_id: str, status: str) -> None:
    """The parent shows its stages' state: RUNNING while one of them runs, else as the last one ended."""
    running = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT_RUN}` = '{parent_id}' and attributes.status = 'RUNNING'", max_results=1)
    if not running:
        client.set_terminated(parent_id, status=status)


@contextmanager
def mlflow_run(
    cfg: TrackingConfig,
    *,
    stage: str,
    stage_params: dict[str, Any],
    all_params: dict[str, Any],
    logged_params: dict[str, Any] | None = None,
    root: Path | None = None,
    system_metrics: bool = False,
    extra_tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """Start an MLflow run for one stage: tagged, nested under its pipeline execution's parent run
    (`pipeline_parent`), with the stage's parameters (or `logged_params`) logged flat, and with
    `system_metrics` MLflow's CPU/memory/disk/network (and GPU) samples every
    $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10).

    An exception inside marks the run FAILED (MLflow's context manager); KeyboardInterrupt KILLED.
    The parent run is RUNNING while a stage runs, and ends as its last stage did.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    root = root or project_root()
    store = store_root(root)
    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, cfg.experiment, store, uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    tags = run_tags(stage, stage_params, all_params, root) | {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}
    tags |= extra_tags or {}
    close_dead_runs(cfg.experiment)
    parent = pipeline_parent(client, experiment_id, tags, all_params, store)
    client.update_run(parent, status="RUNNING")
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=stage, tags=tags, parent_run_id=parent, log_system_metrics=system_metrics) as run:
            flat = flatten(logged_params if logged_params is not None else stage_params)
            mlflow.log_params({k: _param_value(v) for k, v in flat.items()})
            try:
                yield run
            except KeyboardInterrupt:
                status = "KILLED"
                mlflow.end_run(status="KILLED")
                raise
        status = "FINISHED"
    finally:
        _end_parent(client, parent, status)


def log_model_file(path: Path) -> str:
    """Log a model file as an artifact of the active run (under model/), tagged with its sha256
    (checked again whenever a registered copy is loaded) and the repository it was made in (where
    loading finds the frozen backbone it refers to). Returns the sha256."""
    import mlflow

    sha = sha256_file(path)
    mlflow.log_artifact(str(path), MODEL_ARTIFACT_DIR)
    mlflow.set_tags({TAG_MODEL_SHA256: sha, TAG_MODEL_ARTIFACT: f"{MODEL_ARTIFACT_DIR}/{path.name}",
                     TAG_MODEL_PROJECT: str(store_root())})
    return sha


def tag_scored_model(path: Path) -> str:
    """Record on the active (evaluation) run which logged model it scored, as a runs:/ URI: the
    run of this experiment that logged a file with the same sha256 (train, self_train), else the
    file logged here. Returns the URI."""
    import mlflow
    from mlflow.tracking import MlflowClient

    run = mlflow.active_run()
    sha = sha256_file(path)
    logged = MlflowClient().search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{TAG_MODEL_SHA256}` = '{sha}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if logged:
        source_id, artifact = logged[0].info.run_id, logged[0].data.tags[TAG_MODEL_ARTIFACT]
    else:  # a model that came from elsewhere (a DVC remote, another store): keep its bytes here
        log_model_file(path)
        source_id, artifact = run.info.run_id, f"{MODEL_ARTIFACT_DIR}/{path.name}"
    uri = f"runs:/{source_id}/{artifact}"
    mlflow.set_tags({TAG_SCORED_MODEL: uri, TAG_SCORED_SHA256: sha})
    return uri


def log_parent_metrics(run: Any, metrics: dict[str, float]) -> None:
    """Log metrics onto the parent run of `run` (the pipeline execution)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from mlflow.utils.time import get_current_time_millis

    parent = run.data.tags.get(TAG_PARENT_RUN)
    if parent:
        now = get_current_time_millis()
        MlflowClient().log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def close_dead_runs(experiment_name: str) -> list[str]:
    """Mark KILLED the RUNNING runs (of any stage) on this host whose process is gone (kill -9,
    power loss): MLflow never heard of their end. Any stage's next run does it, since DVC may
    restore a killed stage's outputs from its cache without running that stage again. Their
    parent run is marked KILLED too, unless another of its stages still runs."""
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
            parent = run.data.tags.get(TAG_PARENT_RUN)
            if parent and client.get_run(parent).info.status == "RUNNING":
                _end_parent(client, parent, "KILLED")
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
