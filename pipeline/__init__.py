"""cascade-clip: Cascade-CLIP zero-shot semantic segmentation as a reproducible pipeline.

Library only: no orchestration (Prefect), tracking (MLflow) or DVC inside model and data code.
"""

__version__ = "0.1.0"
