import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see pipeline/__init__.py)
import pytest
import torch

from tests.project import PipelineRun, copy_project, dvc, venv_env

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


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run ~100x slower with 2 OpenMP threads when the other core is busy; every test
    uses one (and gets back whatever number of threads it found, even if it changed it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
