"""The full pipeline as one Prefect flow: `dvc repro`, or `dvc exp run` with a preset and
parameter overrides, so DVC's cache and lineage stay the single source of truth. Deployed per
preset on a `gpu` work pool by prefect.yaml; run by hand with `python -m stages.pipeline_flow`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from pipeline.experiments import Experiment, preset_overrides
from pipeline.tracking import FLOW_RUN_ENV, GROUP_ENV, PRESET_ENV, project_root

METRICS = "artifacts/metrics.json"


@task(retries=2, retry_delay_seconds=[30, 120])
def run_dvc(args: list[str], cwd: str, tracking_env: dict[str, str]) -> str:
    """One DVC command; retried (a flaky download, a busy GPU) with back-off. `tracking_env` tells
    the stages' MLflow runs which execution they belong to (pipeline.tracking)."""
    env = {**os.environ, **tracking_env}
    done = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def summary_markdown(metrics: dict[str, dict], title: str) -> str:
    """The scored settings of metrics.json as a table, then how they were made (its "protocol")."""
    lines = [f"# {title}", "", "| setting | mIoU^S | mIoU^U | hIoU |", "|---|---|---|---|"]
    scored = {setting: values for setting, values in metrics.items() if "hIoU" in values}
    for setting, values in scored.items():
        lines.append(f"| {setting} | {values.get('mIoU_seen', float('nan')):.2f} | "
                     f"{values.get('mIoU_unseen', float('nan')):.2f} | {values.get('hIoU', float('nan')):.2f} |")
    if "protocol" in metrics:
        lines += ["", "Protocol: " + ", ".join(f"{k} {v}" for k, v in sorted(metrics["protocol"].items()))]
    return "\n".join(lines) + "\n"


def report_markdown(cwd: str) -> str | None:
    """`cascade-clip report`'s paper table from the MLflow store this project's params.yaml names
    (read only: no report run is logged); None, with the reason printed, when it cannot be made:
    the pipeline ran, and a report is not worth failing it for."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_params
    from pipeline.report import build_report, load_runs
    from pipeline.tracking import tracking_uri

    try:
        cfg = load_params(Path(cwd) / "params.yaml").tracking
        runs, _ = load_runs(MlflowClient(tracking_uri(cfg, Path(cwd))), cfg.experiment)
        return build_report(runs, source=f"experiment {cfg.experiment!r}").to_markdown()
    except Exception as exc:  # noqa: BLE001 - reported, never raised (see the docstring)
        print(f"no results report artifact: {type(exc).__name__}: {exc}")
        return None


@flow(name="cascade-clip-pipeline", log_prints=True)
def pipeline(
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    experiment_name: str | None = None,
    project_dir: str | None = None,
) -> dict:
    """Run the whole pipeline; with a preset or overrides as a DVC experiment. Returns the final metrics.

    Its stages' MLflow runs nest under one parent run, named after the DVC experiment and preset
    (else `flow-<time>`) and tagged with this flow run's id."""
    from prefect.runtime import flow_run

    cwd = str(Path(project_dir) if project_dir else project_root())
    group = f"flow-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    tracking_env = {GROUP_ENV: group, PRESET_ENV: preset or "", FLOW_RUN_ENV: str(flow_run.id or "")}
    settings = {**preset_overrides(preset), **(overrides or {})}
    if settings or experiment_name:
        args = ["exp", "run", *Experiment(name=experiment_name or "", overrides=settings).set_args()]
        if experiment_name:
            args += ["--name", experiment_name]
    else:
        args = ["repro"]
    print(run_dvc(args, cwd, tracking_env))
    metrics = json.loads((Path(cwd) / METRICS).read_text())
    title = f"cascade-clip {preset or 'params.yaml'}" + (f" ({experiment_name})" if experiment_name else "")
    create_markdown_artifact(markdown=summary_markdown(metrics, title), key="cascade-clip-metrics",
                             description="final mIoU^S / mIoU^U / hIoU of the pipeline run")
    report = report_markdown(cwd)
    if report is not None:
        create_markdown_artifact(markdown=report, key="cascade-clip-report",
                                 description="the paper's Tables 2-3 filled from MLflow (`cascade-clip report`)")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.pipeline_flow", description=__doc__)
    parser.add_argument("--preset", default=None, help="preset name from presets/ (runs as a DVC experiment)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="parameter override (repeatable)")
    parser.add_argument("--name", default=None, help="DVC experiment name")
    args = parser.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    print(json.dumps(pipeline(preset=args.preset, overrides=overrides, experiment_name=args.name), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
