"""cascade-clip: Cascade-CLIP zero-shot semantic segmentation as a reproducible pipeline.

Library only: no orchestration (Prefect), tracking (MLflow) or DVC inside model and data code.
"""

import os

# OpenMP threads that spin while waiting make torch 10-25x slower on a CPU shared with other
# processes (measured on a 2-core machine, see README "OpenMP waits"), so they sleep at once by
# default; set before torch loads. A GOMP_SPINCOUNT you set yourself (`make repro` sets 10000,
# for a process alone on its cores) chooses a short spin instead, and is left to take effect.
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
