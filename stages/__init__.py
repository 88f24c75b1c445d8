"""DVC stage entry points: one thin module per stage (`python -m stages.<name>`)."""

import os

# before any stage module imports torch: OpenMP threads that spin while waiting make training
# 10x slower on a CPU shared with another process (see pipeline/__init__.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
