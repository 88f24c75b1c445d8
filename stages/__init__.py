"""DVC stage entry points: one thin module per stage (`python -m stages.<name>`).

This package, run before any stage module's imports, sets up the stage process: how OpenMP
threads wait (before torch loads) and a clear error when this Python lacks the project's packages.
The library (`pipeline`) leaves the process alone on import.
"""

from pipeline import choose_openmp_wait

choose_openmp_wait()


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
