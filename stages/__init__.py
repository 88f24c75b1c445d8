"""DVC stage entry points: one thin module per stage (`python -m stages.<name>`)."""

import os

# before any stage module imports torch: OpenMP threads that spin while waiting make training
# 10x slower on a CPU shared with another process (see pipeline/__init__.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _require_environment() -> None:
    """Fail with the fix when the Python running a stage is not the project's environment."""
    import importlib.util
    import sys

    missing = [name for name in ("torch", "open_clip", "mlflow", "prefect") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"error: {sys.executable} has no {', '.join(missing)}: this Python is not the project's environment. "
            "Run `make repro` (creates .venv if missing), or `source .venv/bin/activate` before `dvc repro`."
        )


_require_environment()
