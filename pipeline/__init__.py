"""cascade-clip: Cascade-CLIP zero-shot semantic segmentation as a reproducible pipeline.

Library only: no orchestration (Prefect), tracking (MLflow) or DVC inside model and data code.
Importing it changes nothing in the process (no environment variables, no matplotlib backend, no
logging set-up): the entry points (`python -m stages.<name>`, the `cascade-clip` command) do that.
"""

import os

__version__ = "0.1.0"


def choose_openmp_wait() -> None:
    """Make idle OpenMP threads sleep at once (OMP_WAIT_POLICY=PASSIVE) unless the user chose.

    Threads that spin while waiting make torch 10-25x slower on a CPU shared with other processes
    (measured on a 2-core machine, see README "OpenMP waits"). A GOMP_SPINCOUNT you set yourself
    (`make repro` sets 10000, for a process alone on its cores) chooses a short spin instead, and is
    left to take effect; so is an OMP_WAIT_POLICY of your own. Only works before torch is imported:
    OpenMP reads it when it loads. Called by the entry points, never on import.
    """
    if "GOMP_SPINCOUNT" not in os.environ:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
