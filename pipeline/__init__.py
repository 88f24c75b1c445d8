"""cascade-clip: Cascade-CLIP zero-shot semantic segmentation as a reproducible pipeline.

Library only: no orchestration (Prefect), tracking (MLflow) or DVC inside model and data code.
Importing it changes nothing in the process (no environment variables, no matplotlib backend, no
logging set-up): the entry points (`python -m stages.<name>`, the `cascade-clip` command) do that.
"""

import os

__version__ = "0.1.0"


SHORT_SPIN = "10000"
"""GOMP_SPINCOUNT of a process alone on its cores (docs/performance.md, "OpenMP waits")"""


def choose_openmp_wait() -> None:
    """How idle OpenMP threads wait, unless the user chose (OMP_WAIT_POLICY or GOMP_SPINCOUNT set).

    Alone on its cores, a process spins briefly (GOMP_SPINCOUNT=10000): 1.9x faster than sleeping
    at once. Beside other busy processes, spinning threads make each several times slower, so a
    queued DVC experiment (run in a copy under the project's .dvc/tmp, beside the queue's other
    jobs) sleeps at once (OMP_WAIT_POLICY=PASSIVE), as do the Prefect flow's runs (the flow sets
    it). Only works before torch is imported: OpenMP reads it when it loads. Called by the entry
    points, never on import.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    if _in_queued_experiment():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = SHORT_SPIN


def _in_queued_experiment() -> bool:
    """Whether this process runs in a DVC queue's temporary copy of the project (DVC sets DVC_ROOT
    to the project and runs the stage under its .dvc/tmp)."""
    root = os.environ.get("DVC_ROOT")
    if not root:
        return False
    cwd = os.path.realpath(os.getcwd())
    return cwd.startswith(os.path.join(os.path.realpath(root), ".dvc", "tmp") + os.sep)
