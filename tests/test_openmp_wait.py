"""How OpenMP threads wait in the entry points' processes (a stage, the `cascade-clip` command):
passive unless the user chose a spin count (make repro does). Importing the library alone changes
nothing (tests/test_import_side_effects.py)."""

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


def policy(entry: str, extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | extra
    done = subprocess.run([sys.executable, "-c", PROBE.format(start=ENTRY_POINTS[entry])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()[-1].split()


@pytest.mark.parametrize("entry", ["stages", "cli"])
def test_threads_sleep_at_once_by_default(entry):
    assert policy(entry, {}) == ["PASSIVE", "None"]


@pytest.mark.parametrize("entry", ["stages", "cli"])
def test_a_spin_count_you_set_is_left_to_take_effect(entry):
    assert policy(entry, {"GOMP_SPINCOUNT": "10000"}) == ["None", "10000"]


def test_your_own_wait_policy_is_kept():
    assert policy("stages", {"OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "None"]


def test_importing_the_library_leaves_the_choice_to_the_process():
    assert policy("library", {}) == ["None", "None"]
