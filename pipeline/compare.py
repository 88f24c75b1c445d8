"""Compare evaluation runs from MLflow (`cascade-clip compare`), register the best model, and
fetch a registered model with its bytes checked."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import CascadeError
from pipeline.io import sha256_file
from pipeline.tracking import (
    TAG_DVC_EXP,
    TAG_GROUP,
    TAG_MODEL_ARTIFACT,
    TAG_MODEL_PROJECT,
    TAG_MODEL_SHA256,
    TAG_SCORED_MODEL,
    TAG_SCORED_SHA256,
    TAG_STAGE,
)

METRICS = ("mIoU_seen", "mIoU_unseen", "hIoU")  # unprefixed: the pipeline's final model
TAG_MODEL_FILE = "cascade.model_file"  # set by the evaluate stage: the workspace path of the final model it scored (information only)
TAG_EVALUATION_RUN = "cascade.evaluation_run"  # on a model version: the evaluation run whose scores it carries


@dataclass
class Comparison:
    columns: list[str]
    rows: list[dict]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_fmt(row.get(c)) for c in self.columns) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        cells = [self.columns] + [[_fmt(row.get(c)) for c in self.columns] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells) + "\n"


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def evaluation_runs(client, experiments: list[str]):
    ids = []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise CascadeError(f"no MLflow experiment named {name!r}; experiments in this store: {known}")
        ids.append(experiment.experiment_id)
    runs = client.search_runs(ids, filter_string=f"tags.`{TAG_STAGE}` = 'evaluate' and attributes.status = 'FINISHED'",
                              order_by=["metrics.hIoU DESC"])
    if not runs:
        raise CascadeError(f"no finished evaluate runs in {', '.join(experiments)}; run `dvc repro` first")
    return runs


def compare(runs) -> Comparison:
    """One row per evaluation run: seen/unseen/hIoU (final and inductive) and the params that differ."""
    params = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in params if len({r.data.params.get(k) for r in runs}) > 1]
    columns = ["run_id", "dvc_experiment", "group", *METRICS, *(f"inductive.{m}" for m in METRICS), *differing]
    rows = []
    for run in runs:
        metrics = run.data.metrics
        row = {"run_id": run.info.run_id[:12], "dvc_experiment": run.data.tags.get(TAG_DVC_EXP, ""),
               "group": run.data.tags.get(TAG_GROUP, "")}
        row |= {m: metrics.get(m) for m in METRICS}
        row |= {f"inductive.{m}": metrics.get(f"inductive.{m}") for m in METRICS}
        row |= {k: run.data.params.get(k) for k in differing}
        rows.append(row)
    return Comparison(columns=columns, rows=rows)


def _runs_uri(uri: str) -> tuple[str, str]:
    """runs:/<run_id>/<artifact path> -> (run_id, artifact path)."""
    run_id, _, artifact = uri.removeprefix("runs:/").partition("/")
    if not uri.startswith("runs:/") or not run_id or not artifact:
        raise CascadeError(f"{uri!r} is not a runs:/<run_id>/<path> URI of a logged artifact")
    return run_id, artifact


def _run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise CascadeError(f"run {run_id}, which logged the model, is not in this tracking store: {exc}") from None


def register_best(client, runs, *, name: str, alias: str = "best"):
    """Register the final model of the run with the highest hIoU; tag the version with its hIoU.

    The version's source is the runs:/ URI of the logged model file that evaluation scored (kept
    in the tracking store's artifacts, whatever later happens to the workspace), and it records
    the sha256 taken when that file was logged."""
    best = max(runs, key=lambda r: r.data.metrics.get("hIoU", float("-inf")))
    uri = best.data.tags.get(TAG_SCORED_MODEL)
    if not uri:
        raise CascadeError(f"run {best.info.run_id} records no logged model (evaluated before models were logged to MLflow); "
                           "re-run its evaluation (`dvc repro --force --single-item evaluate`)")
    source_id, artifact = _runs_uri(uri)
    source = _run(client, source_id)
    sha = source.data.tags.get(TAG_MODEL_SHA256)
    if not sha or source.data.tags.get(TAG_MODEL_ARTIFACT) != artifact or sha != best.data.tags.get(TAG_SCORED_SHA256):
        raise CascadeError(f"run {best.info.run_id} scored {uri}, but run {source_id} does not record that file with the "
                           "same sha256; re-run the evaluation")
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises its own RestException for "not found"
        client.create_registered_model(name)
    metrics = best.data.metrics
    tags = {m: f"{metrics.get(m, float('nan')):.4f}" for m in METRICS} | {TAG_MODEL_SHA256: sha, TAG_EVALUATION_RUN: best.info.run_id}
    version = client.create_model_version(name, source=uri, run_id=source_id, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return best, version


def fetch_registered_model(client, name: str, dst: Path, *, alias: str | None = "best", version: str | None = None,
                           overwrite: bool = False) -> Path:
    """Download a registered model version's file to `dst`, refusing it unless its sha256 equals
    the one recorded when its run logged it. Returns `dst`."""
    mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    label = f"{name} version {mv.version}"
    if not mv.source.startswith("runs:/"):
        raise CascadeError(f"{label} points to {mv.source}, not to a run's logged artifact; register it again "
                           "with `cascade-clip compare --register`")
    run_id, artifact = _runs_uri(mv.source)
    expected = _run(client, run_id).data.tags.get(TAG_MODEL_SHA256)
    if not expected:
        raise CascadeError(f"{label}: run {run_id} recorded no sha256 for {artifact}; cannot check the file")
    if mv.tags.get(TAG_MODEL_SHA256, expected) != expected:
        raise CascadeError(f"{label}: the version's sha256 tag differs from the one run {run_id} recorded at logging")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CascadeError(f"{dst} exists; choose another path or overwrite it explicitly")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.tmp-") as tmp:
        local = Path(client.download_artifacts(run_id, artifact, tmp))
        actual = sha256_file(local)
        if actual != expected:
            raise CascadeError(f"{label}: {mv.source} has sha256 {actual}, but {expected} was recorded when run "
                               f"{run_id} logged it; the stored file changed since, refusing to use it")
        os.replace(local, dst)
    return dst


def load_registered_model(client, name: str, *, alias: str | None = "best", version: str | None = None, map_location="cpu",
                          backbone: str | Path | None = None):
    """The registered model, built from its checked file (`fetch_registered_model`); its frozen CLIP backbone
    from `backbone` or where the file says (`pipeline.model.load`)."""
    from pipeline.model import load

    if backbone is None:  # the repository the model was made in, when it is on this machine
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
        project = _run(client, _runs_uri(mv.source)[0]).data.tags.get(TAG_MODEL_PROJECT, "")
        backbone = project if project and Path(project).is_dir() else None
    with tempfile.TemporaryDirectory(prefix="cascade-clip-model-") as tmp:
        path = fetch_registered_model(client, name, Path(tmp) / "model.safetensors", alias=alias, version=version)
        return load(path, map_location=map_location, backbone=backbone)
