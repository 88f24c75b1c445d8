"""The full-pipeline Prefect flow and its deployments."""

import importlib
import json
import subprocess

import pytest
import yaml

from tests.project import REPO


def test_prefect_yaml_deployments_point_to_flows_that_import():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert flow.name == "cascade-clip-pipeline"
        assert deployment["work_pool"]["name"] == "gpu"
        assert "CUDA_VISIBLE_DEVICES" in deployment["work_pool"]["job_variables"]["env"]
        assert deployment["concurrency_limit"] == 1
        preset = deployment["parameters"].get("preset")
        if preset:
            assert (REPO / "presets" / f"{preset}.yaml").exists(), preset
        flow.validate_parameters(deployment["parameters"])


def commit_all(repo, env) -> None:
    """Commit the copy's params and dvc.lock: a flow run clones the project, and a clone has only what is committed."""
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tiny run"], cwd=repo, env=env,
                   check=True)


@pytest.mark.slow
def test_pipeline_flow_returns_the_metrics_and_runs_overrides_as_a_dvc_experiment(tiny_pipeline, tmp_path, monkeypatch):
    """On a copy of the session's finished demo run: in place, the flow's plain `dvc repro` finds it
    up to date and returns its metrics. By default a flow run works in a clone of its own (sharing the
    project's DVC cache): an override runs there as a DVC experiment in which only the stages it
    touches run again (no calibration: the inductive scores become the uncalibrated ones); the
    experiment is pushed back to the project, the project's workspace is untouched and the clone is gone."""
    from stages.pipeline_flow import pipeline

    run = tiny_pipeline.copy(tmp_path)
    for key in ("PATH", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, run.env[key])
    monkeypatch.setenv("CASCADE_CLIP_WORKDIR", str(tmp_path / "runs"))
    commit_all(run.repo, run.env)
    before = json.loads((run.repo / "artifacts/metrics.json").read_text())
    assert pipeline(project_dir=str(run.repo), workspace="in_place") == before

    metrics = pipeline(overrides={"evaluate.calibration": 0.0}, experiment_name="no-calibration",
                       project_dir=str(run.repo))
    assert metrics["inductive"] == before["inductive_uncalibrated"] != before["inductive"]
    assert metrics["self_train"] == before["self_train"]
    assert json.loads((run.repo / "artifacts/metrics.json").read_text()) == before  # the project's workspace: untouched
    assert not list((tmp_path / "runs" / "cascade-clip-runs").iterdir())  # the clone is removed
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=run.repo, env=run.env, capture_output=True, text=True)
    assert "no-calibration" in shown.stdout, shown.stderr
    # a deployment runs under the same name again, with other settings: the project's ref becomes the new run's
    again = pipeline(overrides={"evaluate.calibration": 0.05}, experiment_name="no-calibration", project_dir=str(run.repo))
    assert again["inductive"] != metrics["inductive"]
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname)", "refs/exps/**/no-calibration"], cwd=run.repo,
                          capture_output=True, text=True, check=True).stdout.split()
    assert len(refs) == 1
    pushed = subprocess.run(["git", "show", f"{refs[0]}:params.yaml"], cwd=run.repo, capture_output=True, text=True).stdout
    assert "calibration: 0.05" in pushed
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import TAG_GROUP, TAG_PARENT_RUN, TAG_PREFECT_FLOW_RUN, TAG_ROLE, TAG_STAGE

    client = MlflowClient(run.env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cascade-clip").experiment_id])
    [evaluation] = [r for r in runs if TAG_STAGE in r.data.tags and r.data.params["evaluate.calibration"] == "0.0"]
    assert evaluation.data.tags[TAG_STAGE] == "evaluate"
    # nested under the flow's execution: named after the DVC experiment, tagged with the flow run
    [parent] = [r for r in runs if r.info.run_id == evaluation.data.tags[TAG_PARENT_RUN]]
    assert TAG_ROLE in parent.data.tags and parent.info.run_name == "no-calibration"
    assert parent.data.tags[TAG_GROUP].startswith("flow-") and len(parent.data.tags[TAG_PREFECT_FLOW_RUN]) == 36
    assert parent.data.metrics["hIoU"] == pytest.approx(metrics["self_train"]["hIoU"])


COUNTING_STAGE = """stages:
  flaky:
    cmd: python -c "import pathlib, sys; p = pathlib.Path('tries'); n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1)); code = {codes}[min(n, {last})]; code or pathlib.Path('out').write_text('made'); sys.exit(code)"
    outs: [out]
"""


def tried(tmp_path, codes: list[int], monkeypatch) -> tuple[int, str]:
    """Run a real `dvc repro` of a one-stage project whose command exits with codes[i] on its i-th try, through
    the flow's DVC task (its retry rule, no back-off); returns how often the command ran and the error, if any."""
    from prefect import flow

    from stages.pipeline_flow import run_dvc
    from tests.project import venv_env

    env = venv_env()
    monkeypatch.setenv("PATH", env["PATH"])
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, env=env, check=True)
    (tmp_path / "dvc.yaml").write_text(COUNTING_STAGE.format(codes=codes, last=len(codes) - 1))

    @flow
    def repro() -> str:
        return run_dvc.with_options(retry_delay_seconds=0)(["repro"], str(tmp_path), {})

    try:
        repro()
        error = ""
    except Exception as exc:  # noqa: BLE001 - the failure is what the test looks at
        error = str(exc)
    return len((tmp_path / "tries").read_text()), error


def test_a_failing_stage_is_not_retried_but_a_passing_failure_is(tmp_path, monkeypatch, prefect_harness):
    for name in ("bad", "net", "kill"):
        (tmp_path / name).mkdir()
    runs, error = tried(tmp_path / "bad", [1], monkeypatch)
    assert runs == 1 and "not retried" in error  # a bug or bad params: the same failure again
    runs, error = tried(tmp_path / "net", [75, 0], monkeypatch)
    assert runs == 2 and error == ""  # a download that kept failing for a passing reason: tried again, then done
    runs, error = tried(tmp_path / "kill", [143, 143, 143, 0], monkeypatch)
    assert runs == 3 and "may pass" in error  # preempted three times: two retries, then the flow fails


def test_failures_that_may_pass_are_told_from_those_that_will_not():
    from stages.pipeline_flow import failure_is_transient

    dvc_said = "ERROR: failed to reproduce 'train': failed to run: python -m stages.train, exited with {}"
    assert failure_is_transient(255, dvc_said.format(75)) and failure_is_transient(255, dvc_said.format(-9))
    assert not failure_is_transient(255, dvc_said.format(1)) and not failure_is_transient(255, dvc_said.format(2))
    assert failure_is_transient(255, "ERROR: failed to pull data from the cloud - Connection reset by peer")
    assert failure_is_transient(-15, "") and not failure_is_transient(1, "ERROR: unexpected error")


def test_the_flow_summary_tables_the_scored_settings_and_states_the_protocol():
    from stages.pipeline_flow import summary_markdown

    metrics = {"inductive": {"mIoU_seen": 40.0, "mIoU_unseen": 30.0, "hIoU": 34.29},
               "protocol": {"self_train_mode": "online", "dataset": "voc12", "unseen_split": "paper"}}
    text = summary_markdown(metrics, "voc12")
    assert "| inductive | 40.00 | 30.00 | 34.29 |" in text
    assert "| protocol" not in text and "nan" not in text
    assert "Protocol: dataset voc12, self_train_mode online, unseen_split paper" in text
