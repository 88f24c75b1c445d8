"""How OpenMP threads wait in the entry points' processes (a stage, the `cascade-clip` command): a
short spin alone, passive in a queued DVC experiment, the user's own choice kept. Importing the
library alone changes nothing (tests/test_import_side_effects.py)."""

import os
import subprocess
import sys

import pytest

from tests.project import REPO

PROBE = "import os; {start}; import torch; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
ENTRY_POINTS = {
    "stages": "import stages",  # what `python -m stages.<name>` runs first
    "cli": "from pipeline.cli import main; main(['params', '--check', 'params.yaml'])",  # `cascade-clip ...`
    "library": "import pipeline",
}


def policy(entry: str, extra: dict[str, str], cwd=REPO) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "DVC_ROOT")} | extra
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", PROBE.format(start=ENTRY_POINTS[entry])], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()[-1].split()


@pytest.mark.parametrize("entry", ["stages", "cli"])
def test_threads_spin_briefly_by_default(entry):
    assert policy(entry, {}) == ["None", "10000"]


def test_threads_sleep_at_once_in_a_queued_dvc_experiment(tmp_path):
    # DVC runs a queued experiment in a copy under the project's .dvc/tmp, DVC_ROOT naming the project
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    assert policy("stages", {"DVC_ROOT": str(tmp_path)}, cwd=copy) == ["PASSIVE", "None"]
    # a stage of the project itself (dvc repro, dvc exp run in the workspace) is alone
    assert policy("stages", {"DVC_ROOT": str(tmp_path)}, cwd=tmp_path) == ["None", "10000"]


@pytest.mark.parametrize("entry", ["stages", "cli"])
def test_a_spin_count_you_set_is_left_to_take_effect(entry):
    assert policy(entry, {"GOMP_SPINCOUNT": "0"}) == ["None", "0"]


def test_your_own_wait_policy_is_kept():
    assert policy("stages", {"OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "None"]


def test_importing_the_library_leaves_the_choice_to_the_process():
    assert policy("library", {}) == ["None", "None"]
