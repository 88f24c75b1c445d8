"""The full pipeline as one Prefect flow: `dvc repro`, or `dvc exp run` with a preset and
parameter overrides, so DVC's cache and lineage stay the single source of truth. Deployed per
preset on a `gpu` work pool by prefect.yaml; run by hand with `python -m stages.pipeline_flow`.

Each flow run works in a workspace of its own (`workspace="clone"`, the default): a git clone of
the project under $CASCADE_CLIP_WORKDIR (default: the system's temporary folder), so runs on one
machine never share DVC's lock or outputs. A clone of a project folder on this machine uses the
project's DVC cache; a clone of a git URL first pulls what the DVC remote has (outputs and the
stages' run history). Afterwards the clone pushes what it made to the DVC remote (if one is
configured), pushes its DVC experiment back to the project (`dvc exp show` there lists it), and
its stages record into the project's MLflow store (or $MLFLOW_TRACKING_URI). A failing stage is not retried; a run that failed for a
passing reason (a network error, a preempted or killed process) is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from pipeline.experiments import Experiment, preset_overrides
from pipeline.tracking import FLOW_RUN_ENV, GROUP_ENV, PRESET_ENV, STORE_ENV, project_root
from stages.common import EXIT_TRANSIENT, retry_if_transient

METRICS = "artifacts/metrics.json"
WORKDIR_ENV = "CASCADE_CLIP_WORKDIR"  # where flow runs make their clones (default: the system's temporary folder)
# exit codes of a process that was stopped from outside (preemption, a restarted machine): 128 + SIGKILL/SIGTERM/SIGINT
STOPPED_EXIT_CODES = (137, 143, 130)
# what DVC and git print when a remote or the network fails for a reason that passes
NETWORK_MARKERS = ("Temporary failure in name resolution", "Connection reset", "Connection refused", "Connection aborted",
                   "timed out", "Network is unreachable", "Remote end closed connection", "503 Service Unavailable")


class CommandFailed(RuntimeError):
    """A command of the flow that failed; `transient` says whether trying again may succeed."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


def failure_is_transient(returncode: int, output: str) -> bool:
    """Whether a failed DVC or git command may succeed when run again: a stage that exited with
    EXIT_TRANSIENT (a download that kept failing for a passing reason) or was stopped from outside,
    or a network error talking to a remote. Anything else (bad params, a bug, bad data) fails the same way again."""
    codes = {int(code) for code in re.findall(r"exited with (-?\d+)", output)}
    if returncode < 0 or returncode in STOPPED_EXIT_CODES:  # the command itself was killed
        return True
    if codes & {EXIT_TRANSIENT, *STOPPED_EXIT_CODES, -9, -15, -2}:
        return True
    return any(marker in output for marker in NETWORK_MARKERS)


def run_command(args: list[str], cwd: str, env: dict[str, str] | None = None) -> str:
    """Run one command; its stdout, or `CommandFailed` with the end of its output."""
    done = subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        transient = failure_is_transient(done.returncode, f"{done.stdout}\n{done.stderr}")
        raise CommandFailed(f"{' '.join(args)} failed ({done.returncode}, {'may pass: retried' if transient else 'not retried'}):"
                            f"\n{output}", transient=transient)
    return done.stdout


@task(retries=2, retry_delay_seconds=[30, 120], retry_condition_fn=retry_if_transient)
def run_dvc(args: list[str], cwd: str, tracking_env: dict[str, str]) -> str:
    """One DVC command, retried with back-off only when it failed for a passing reason. `tracking_env`
    tells the stages' MLflow runs which execution and store they belong to (pipeline.tracking)."""
    return run_command(["dvc", *args], cwd, tracking_env)


def is_local_project(source: str) -> bool:
    return "://" not in source and Path(source).is_dir()


@task(retries=2, retry_delay_seconds=[30, 120], retry_condition_fn=retry_if_transient)
def make_workspace(source: str, name: str, rev: str | None, remote: str | None) -> str:
    """A clone of `source` (a project folder or git URL) for one flow run: on this machine it shares the
    project's DVC cache; `remote` (a DVC remote URL or the name of one in the project's config) becomes its
    default remote."""
    root = Path(os.environ.get(WORKDIR_ENV) or tempfile.gettempdir()) / "cascade-clip-runs"
    root.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-", dir=root))
    run_command(["git", "clone", "--quiet", source, str(dest)], str(root))
    if rev:
        run_command(["git", "checkout", "--quiet", rev], str(dest))
    if is_local_project(source):
        run_command(["dvc", "cache", "dir", "--local", str(Path(source).resolve() / ".dvc" / "cache")], str(dest))
    if remote:
        if "://" in remote or remote.startswith("/"):
            run_command(["dvc", "remote", "add", "--local", "--force", "--default", "flow", remote], str(dest))
        else:
            run_command(["dvc", "remote", "default", "--local", remote], str(dest))
    return str(dest)


def default_remote(cwd: str) -> str:
    """The workspace's default DVC remote ('' when none is configured)."""
    done = subprocess.run(["dvc", "remote", "default"], cwd=cwd, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


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
    workspace: Literal["clone", "in_place"] = "clone",
    rev: str | None = None,
    remote: str | None = None,
) -> dict:
    """Run the whole pipeline as a DVC experiment (with a preset and overrides, if any). Returns the final metrics.

    `project_dir`: the project, a folder or a git URL (default: $CASCADE_CLIP_DIR, else the project
    around the working directory). `workspace`: "clone" (default) runs in a fresh clone of it at
    `rev` (default: its HEAD; uncommitted changes are not in a clone), removed afterwards unless the
    run failed; "in_place" runs in `project_dir` itself (`dvc repro` without preset or overrides),
    one run at a time. `remote`: a DVC remote URL or name to pull from and push to (default: the
    project's default remote, if any). Its stages' MLflow runs nest under one parent run, named
    after the DVC experiment and preset, tagged with this flow run's id."""
    from prefect.runtime import flow_run

    source = project_dir or os.environ.get("CASCADE_CLIP_DIR") or str(project_root())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    group = f"flow-{stamp}"
    settings = {**preset_overrides(preset), **(overrides or {})}
    tracking_env = {GROUP_ENV: group, PRESET_ENV: preset or "", FLOW_RUN_ENV: str(flow_run.id or "")}
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        tracking_env["OMP_WAIT_POLICY"] = "PASSIVE"  # a worker may run flow runs side by side (pipeline.choose_openmp_wait)
    if workspace == "in_place":
        if not is_local_project(source):
            raise ValueError(f"workspace 'in_place' needs a project folder on this machine, got {source!r}")
        cwd, name = str(Path(source).resolve()), experiment_name
    else:
        name = experiment_name or f"{preset or 'params'}-{stamp}".replace("_", "-").lower()
        cwd = make_workspace(source, name, rev, remote)
        if is_local_project(source) and not os.environ.get("MLFLOW_TRACKING_URI"):
            tracking_env[STORE_ENV] = str(Path(source).resolve())  # the project's own store, not the clone's
        print(f"workspace: {cwd} (a clone of {source}{' at ' + rev if rev else ''})")
    if settings or name:
        args = ["exp", "run", *Experiment(name=name or "", overrides=settings).set_args()]
        if name:
            args += ["--name", name]
    else:
        args = ["repro"]
    has_remote = bool(default_remote(cwd))
    shared_cache = is_local_project(source)  # a clone on this machine uses the project's own DVC cache
    if workspace == "clone" and has_remote and not shared_cache:
        # what the remote has (outputs and the stages' run history) is fetched, not computed again
        print(run_dvc(["pull", "--run-cache", "--allow-missing"], cwd, tracking_env))
    print(run_dvc(args, cwd, tracking_env))
    metrics = json.loads((Path(cwd) / METRICS).read_text())
    if workspace == "clone":
        if has_remote:  # outputs and run history for the other machines
            print(run_dvc(["push", "--run-cache"], cwd, tracking_env))
        if is_local_project(source) or has_remote:  # the experiment's commit (and, with a remote, its outputs)
            # --force: a scheduled deployment runs under the same name every time; the project keeps the latest
            print(run_dvc(["exp", "push", "--force", *([] if has_remote else ["--no-cache"]), "origin", name], cwd,
                          tracking_env))
    title = f"cascade-clip {preset or 'params.yaml'}" + (f" ({name})" if name else "")
    create_markdown_artifact(markdown=summary_markdown(metrics, title), key="cascade-clip-metrics",
                             description="final mIoU^S / mIoU^U / hIoU of the pipeline run")
    report = report_markdown(source if is_local_project(source) else cwd)
    if report is not None:
        create_markdown_artifact(markdown=report, key="cascade-clip-report",
                                 description="the paper's Tables 2-3 filled from MLflow (`cascade-clip report`)")
    if workspace == "clone":
        shutil.rmtree(cwd, ignore_errors=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.pipeline_flow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="preset name from presets/ (runs as a DVC experiment)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="parameter override (repeatable)")
    parser.add_argument("--name", default=None, help="DVC experiment name")
    parser.add_argument("--in-place", action="store_true", help="run in this checkout instead of a fresh clone of it")
    parser.add_argument("--remote", default=None, help="DVC remote (URL or name) to pull from and push to")
    parser.add_argument("--rev", default=None, help="git revision of the project to run (default: HEAD)")
    args = parser.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    metrics = pipeline(preset=args.preset, overrides=overrides, experiment_name=args.name,
                       workspace="in_place" if args.in_place else "clone", rev=args.rev, remote=args.remote)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
