"""The project under test, for tests that run it as a user would: its root, a private copy of it as
a git repository, the environment its stages run in and the real `dvc` command. Not a test module."""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
