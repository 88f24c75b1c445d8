"""cascade-clip: Cascade-CLIP zero-shot semantic segmentation as a reproducible pipeline.

Library only: no orchestration (Prefect), tracking (MLflow) or DVC inside model and data code.
"""

import os

# OpenMP threads that spin while waiting make torch 10-25x slower on a CPU shared with other
# processes (measured on a 2-core machine, see README "Performance notes"); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
