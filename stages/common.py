"""The stage framework: `python -m stages.<name> [--params FILE]` runs one stage as a Prefect flow
inside an MLflow run.

Order of work: parse and validate params (a bad params file stops here, before any server starts),
then the stage's lock (a second run of the same stage in the same project stops here, naming the
first one's pid), then the flow (on a temporary local server of the stage's own when
PREFECT_API_URL is unset, stopped even if the stage is killed), then the MLflow run (tagged, and
nested under its pipeline execution's parent run: pipeline.tracking, docs/tracking.md), then the
stage's `main(ctx)`.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import matplotlib
import yaml

from pipeline.config import DEFAULT_PARAMS, Params, load_params, params_hash
from pipeline.errors import CascadeError
from pipeline.io import OLD_MARK, TMP_MARK, sha256_file
from pipeline.tracking import (
    TAG_PREFECT_FLOW_RUN,
    log_model_file,
    log_parent_metrics,
    mlflow_run,
    project_root,
    tag_scored_model,
)

log = logging.getLogger("cascade_clip.stages")

# no telemetry from Prefect's temporary server (there is no internet to send it to), and time for
# that server to start on a busy machine (Prefect's default of 20 s is too short on 2 loaded cores)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@dataclass
class StageContext:
    """What a stage's main() gets: validated params, the project root and the active MLflow run."""

    name: str
    params: Params
    sections: tuple[str, ...]
    root: Path
    run: Any = None  # None on DDP ranks other than 0: they train but log nothing
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def stage_params(self) -> dict[str, Any]:
        return self.params.section_dict(*self.sections)

    def path(self, relative: str | Path) -> Path:
        return self.root / relative

    def resume_key(self) -> dict[str, str]:
        """What this stage's result depends on, for resuming a checkpoint only when nothing changed:
        a hash of each params section it reads, and a digest of each dependency dvc.yaml lists for
        it (input files and folders, and its code)."""
        key = {f"params {section}": params_hash(self.params.section_dict(section)) for section in self.sections}
        return key | {dep: content_digest(self.root / dep) for dep in stage_deps(self.root, self.name)}

    def pin_threads(self) -> None:
        """torch's CPU threads set to `train.threads` for the rest of the stage process (0 keeps
        torch's default), so the outputs' bytes do not depend on the machine's core count."""
        import torch

        if self.params.train.threads:
            torch.set_num_threads(self.params.train.threads)

    def write_config(self, folder: Path) -> None:
        """Save the stage's merged parameters beside its outputs (params.yaml of this stage)."""
        (folder / "stage_params.yaml").write_text(yaml.safe_dump(self.stage_params, sort_keys=True))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items()}
        self.metrics.update(clean)
        if self.run is not None:
            mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        if self.run is not None:
            mlflow.set_tags(tags)

    def log_dict(self, data: dict, name: str) -> None:
        import mlflow

        if self.run is not None:
            mlflow.log_dict(data, name)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        import mlflow

        if self.run is not None:
            mlflow.log_artifact(str(path), folder)

    def log_figure(self, figure: Any, name: str) -> None:
        import mlflow

        if self.run is not None:
            mlflow.log_figure(figure, name)

    def log_pipeline_metrics(self, metrics: dict[str, float]) -> None:
        """Log metrics onto the parent run of this pipeline execution too (the final scores)."""
        if self.run is not None:
            log_parent_metrics(self.run, metrics)

    def log_model_file(self, path: Path) -> None:
        """Log a model file as an artifact of this run, with its sha256 as a tag."""
        if self.run is not None:
            log_model_file(path)

    def tag_scored_model(self, path: Path) -> None:
        """Record which logged model file this (evaluation) run scored, as a runs:/ URI and sha256."""
        if self.run is not None:
            tag_scored_model(path)


StageMain = Callable[[StageContext], None]

# Tracking per stage, kept here rather than in the stage modules: those are DVC deps of their
# stages, and an edit there would re-run the (long) stages for every user.
SYSTEM_METRICS = frozenset({"backbone", "train", "self_train"})  # long stages: CPU/GPU/memory samples in their runs
# the inductive model and the one at half its schedule, by the name params pseudo.checkpoint and self_train.init use
TRAINED_MODELS = {"half": "artifacts/train/model_half.safetensors", "final": "artifacts/train/model.safetensors"}
MODEL_FILES = {  # the model file a stage writes, logged as an artifact of its run with its sha256
    "train": TRAINED_MODELS["final"],
    "self_train": "artifacts/self_train/model.safetensors",
}


def stage_deps(root: Path, name: str) -> list[str]:
    """The deps dvc.yaml lists for stage `name` (none when there is no dvc.yaml or no such stage)."""
    path = root / "dvc.yaml"
    if not path.exists():
        return []
    stage = (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(name) or {}
    return [str(dep) for dep in stage.get("deps", [])]


def _skipped(path: Path) -> bool:
    """Not content: Python's bytecode caches and the leftovers of interrupted atomic writes."""
    return path.name == "__pycache__" or path.suffix == ".pyc" or TMP_MARK in path.name or OLD_MARK in path.name


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's relative file names and their bytes ('missing'
    when absent). Reads everything: about 1 s per GB (the demo's inputs take well under a second)."""
    if not path.exists():
        return "missing"
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and not any(_skipped(part) for part in (file, *file.relative_to(path).parents)):
            digest.update(f"{file.relative_to(path).as_posix()}\0{content_digest(file)}\n".encode())
    return digest.hexdigest()


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry condition for tasks: retry only an error that may pass (its `transient` attribute,
    pipeline.errors.CascadeError), never a bug, bad input or a checksum mismatch."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the condition only looks at it
        return bool(getattr(exc, "transient", False))
    return False


EXIT_TRANSIENT = 75  # exit code of a stage whose error may pass when run again (EX_TEMPFAIL): the pipeline flow retries it
LOCKS = ".cascade-clip/locks"  # one lock file per stage, under the project root


class StageBusyError(CascadeError):
    """Another process is running the same stage in the same project."""


@contextmanager
def stage_lock(root: Path, name: str) -> Iterator[None]:
    """Hold the stage's lock while it runs: one writer per stage and project, so two runs never
    share a checkpoint or sweep each other's half-written outputs. The OS releases the lock when
    the process ends, however it ends (kill -9 included); the file keeps the holder's pid."""
    import fcntl

    path = root / LOCKS / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "not yet recorded"
            raise StageBusyError(
                f"stage {name} is already running in {root} (pid {holder}); a second run would share its "
                f"checkpoints and outputs. Wait for it to end, or stop it (`kill {holder}`): a killed `dvc repro` "
                "can leave its stage running"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


@contextmanager
def prefect_api() -> Iterator[None]:
    """The Prefect API the stage's flow reports to: $PREFECT_API_URL when set (a shared or a real
    server), else a temporary local server of the stage's own that does not outlive the stage,
    even one killed with SIGKILL (stages.prefect_server)."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from stages.prefect_server import temporary_server

    with temporary_server() as url, temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def parse_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=f"Run the {name} stage.")
    parser.add_argument("--params", type=Path, default=None, help="params file (default: params.yaml at the project root)")
    return parser.parse_args(argv)


def run_stage(
    name: str,
    main: StageMain,
    sections: tuple[str, ...],
    argv: list[str] | None = None,
    *,
    log_all_params: bool = False,
) -> int:
    """Validate params, then run `main` as the Prefect flow `name` inside an MLflow run. Returns an exit code:
    0, 2 (invalid params), EXIT_TRANSIENT (an error that may pass, e.g. a download that kept failing on
    network errors) or 1 (any other error the user can fix).

    `sections` are the params the stage reads (hashed and logged); `log_all_params` logs every
    section instead (the evaluation run, so runs compare in the MLflow UI). Under torchrun, ranks
    other than 0 run `main` without a flow or an MLflow run.

    When the stage is the process's main program (`python -m stages.<name>`), a stage that returns
    ends the process here (`end_process`) instead of returning.
    """
    code = _run_stage(name, main, sections, argv, log_all_params=log_all_params)
    main_module = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_module is not None and main_module.name == f"stages.{name}":
        end_process(code)
    return code


def end_process(code: int) -> NoReturn:
    """End the process with exit code `code` as Python's own exit does (non-daemon threads joined,
    atexit handlers run: logging, Prefect's and MLflow's queues flushed), but without the
    interpreter's teardown of every module and object, which takes 1.7-2.1 s once torch,
    open_clip, Prefect and MLflow are imported (stages' outputs are written and closed by then)."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and not stream.closed:
            stream.flush()
    os._exit(code)


def _run_stage(name: str, main: StageMain, sections: tuple[str, ...], argv: list[str] | None, *, log_all_params: bool) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    matplotlib.use("Agg")  # figures are drawn for files and MLflow, never for a screen
    args = parse_args(name, argv)
    root = project_root()
    try:
        params = load_params(args.params or (root / DEFAULT_PARAMS.name))
    except CascadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if int(os.environ.get("RANK", "0")) > 0:  # DDP ranks other than 0 run beside rank 0, which holds the lock
            main(StageContext(name=name, params=params, sections=sections, root=root))
        else:
            with stage_lock(root, name), prefect_api():
                stage_flow(name, main, sections, root, log_all_params)(params.model_dump(mode="json"))
    except CascadeError as exc:
        print(f"error [{name}]: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT if exc.transient else 1
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"error [{name}]: disk full (no space left on device) while writing {exc.filename or 'an output'}; "
              "free space and re-run the stage", file=sys.stderr)
        return 1
    return 0


def stage_flow(name: str, main: StageMain, sections: tuple[str, ...], root: Path, log_all_params: bool = False):
    """The Prefect flow of one stage; its only flow parameter is the (JSON) parameter set."""
    from prefect import flow

    @flow(name=name, log_prints=True)
    def _stage(params: dict) -> dict[str, float]:
        from prefect.runtime import flow_run

        ctx = StageContext(name=name, params=Params.model_validate(params), sections=sections, root=root)
        all_params = ctx.params.section_dict()
        with mlflow_run(ctx.params.tracking, stage=name, stage_params=ctx.stage_params, all_params=all_params,
                        logged_params=all_params if log_all_params else None, root=ctx.root,
                        system_metrics=name in SYSTEM_METRICS,
                        extra_tags={TAG_PREFECT_FLOW_RUN: str(flow_run.id)}) as run:
            ctx.run = run
            main(ctx)
            if name in MODEL_FILES:
                ctx.log_model_file(ctx.path(MODEL_FILES[name]))
        return ctx.metrics

    return _stage
