import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see pipeline/__init__.py)
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Prefect and MLflow must never reach out from tests; keep their state in temp folders.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# Expensive session fixtures, each computed once per test process. Under pytest-xdist (`make test`
# runs two workers) the tests that use one are kept on one worker (`--dist loadgroup`), so each is
# computed once per session and the two heaviest groups start at once, one per worker.
SHARED_FIXTURES = ("tiny_pipeline", "default_toy")  # each one's users form an xdist group of its name


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture in SHARED_FIXTURES:
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(fixture))


@pytest.fixture(scope="session")
def prefect_harness():
    """A real temporary Prefect server (and database) for the whole test session, also handed to
    every stage process a test starts (PREFECT_API_URL), so none of them starts a server of its own."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url = PREFECT_API_URL.value()
        try:
            yield url
        finally:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A real MLflow store: SQLite file in a temp folder."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def copy_project(dest: Path) -> Path:
    """A copy of the project's tracked and untracked-but-not-ignored files, as a fresh git repo."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "-m", "copy"], cwd=dest, check=True, env=env)
    return dest


def venv_env(extra: dict | None = None) -> dict:
    """Environment whose PATH finds this interpreter's python and dvc first."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", **(extra or {})}


def dvc(args: list[str], cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """A real `dvc` command (the project environment's), its output captured."""
    return subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class PipelineRun:
    """A finished `dvc repro` of the demo at the test size (tests/tiny.py): its repository (outputs,
    dvc.lock and DVC cache included), the environment its stages ran in and what `dvc repro` printed."""

    repo: Path
    env: dict
    stdout: str

    def copy(self, dest: Path) -> "PipelineRun":
        """A private copy to change: the same repository and cache, and a new, empty MLflow store."""
        shutil.copytree(self.repo, dest / "repo", symlinks=True)
        env = {**self.env, "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}"}
        return PipelineRun(repo=dest / "repo", env=env, stdout=self.stdout)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, prefect_harness) -> PipelineRun:
    """One whole `dvc repro` of the demo at the test size, shared by the end-to-end tests: they read
    it, or change a `.copy()` of it. Its stages use the session's Prefect server."""
    from tests.tiny import tiny_params_yaml

    root = tmp_path_factory.mktemp("tiny_pipeline")
    repo = copy_project(root / "repo")
    (repo / "params.yaml").write_text(tiny_params_yaml())
    env = venv_env({"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    done = dvc(["repro"], repo, env, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return PipelineRun(repo=repo, env=env, stdout=done.stdout)
