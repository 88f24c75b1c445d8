"""Compare evaluation runs from MLflow (`cascade-clip compare`) and register the best model."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import CascadeError
from pipeline.tracking import TAG_DVC_EXP, TAG_GROUP, TAG_STAGE

METRICS = ("mIoU_seen", "mIoU_unseen", "hIoU")  # unprefixed: the pipeline's final model
TAG_MODEL_FILE = "cascade.model_file"  # set by the evaluate stage: the final model it scored


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


def register_best(client, runs, *, name: str, alias: str = "best"):
    """Register the final model of the run with the highest hIoU; tag the version with its hIoU."""
    best = max(runs, key=lambda r: r.data.metrics.get("hIoU", float("-inf")))
    model_file = best.data.tags.get(TAG_MODEL_FILE)
    if not model_file or not Path(model_file).is_file():
        raise CascadeError(f"run {best.info.run_id}: its model file {model_file!r} is gone; re-run its evaluation")
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises its own RestException for "not found"
        client.create_registered_model(name)
    hiou = best.data.metrics.get("hIoU")
    version = client.create_model_version(name, source=Path(model_file).resolve().as_uri(), run_id=best.info.run_id,
                                          tags={"hIoU": f"{hiou:.4f}", "mIoU_seen": f"{best.data.metrics.get('mIoU_seen', float('nan')):.4f}",
                                                "mIoU_unseen": f"{best.data.metrics.get('mIoU_unseen', float('nan')):.4f}"})
    client.set_registered_model_alias(name, alias, version.version)
    return best, version
