"""How OpenMP threads wait: passive unless the user chose a spin count (make repro does)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = "import os, {module}, torch; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def policy(module: str, extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | extra
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.parametrize("module", ["pipeline", "stages"])
def test_threads_sleep_at_once_by_default(module):
    assert policy(module, {}) == ["PASSIVE", "None"]


@pytest.mark.parametrize("module", ["pipeline", "stages"])
def test_a_spin_count_you_set_is_left_to_take_effect(module):
    assert policy(module, {"GOMP_SPINCOUNT": "10000"}) == ["None", "10000"]


def test_your_own_wait_policy_is_kept():
    assert policy("stages", {"OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "None"]

