"""Imports point one way (stages -> pipeline): library code never imports the stages, model, data and
engine code never import orchestration or tracking, and the model package depends on torch and a few
leaf modules only. Each rule is checked once, on the source (every import statement, even one inside
a function), so a rule holds whatever a test happens to import first."""

import ast
import sys
from pathlib import Path

import yaml

from tests.project import REPO

ORCHESTRATION = {"prefect", "mlflow", "dvc"}

# Code that runs inside training and evaluation, or that users import on its own (pipeline.config: the
# model package imports it): no Prefect, MLflow or DVC.
NO_ORCHESTRATION = [REPO / "pipeline" / "model", REPO / "pipeline" / "data", REPO / "pipeline" / "engine",
                    REPO / "pipeline" / "weights.py", REPO / "pipeline" / "text.py", REPO / "pipeline" / "config.py"]

# The model package and the two leaves it uses besides pipeline.config, pipeline.io (atomic, byte-stable
# writes) and pipeline.errors, import only the standard library, these libraries and these modules.
MODEL_PACKAGE = sorted((REPO / "pipeline" / "model").glob("*.py")) + [REPO / "pipeline" / "io.py",
                                                                      REPO / "pipeline" / "errors.py"]
MODEL_THIRD_PARTY = {"torch", "open_clip", "timm", "numpy", "safetensors"}
MODEL_PIPELINE = {"pipeline.config", "pipeline.model", "pipeline.io", "pipeline.errors"}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved to their absolute names."""
    package = path.relative_to(REPO).parts[:-1]  # what `from .` means in this file
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            names.add(".".join(part for part in (base, node.module) if part))
    return names


def top_level(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def python_files(*places: Path) -> list[Path]:
    files = [f for p in places for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p])]
    assert files and all(f.is_file() for f in files), places  # a renamed folder must not empty the check
    return files


def test_pipeline_never_imports_stages():
    for path in python_files(REPO / "pipeline"):
        assert "stages" not in top_level(imported_modules(path)), path.relative_to(REPO)


def test_model_data_engine_weights_and_text_code_never_import_orchestration_or_tracking():
    for path in python_files(*NO_ORCHESTRATION):
        bad = top_level(imported_modules(path)) & ORCHESTRATION
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_model_package_imports_only_torch_its_few_libraries_and_leaf_pipeline_modules():
    for path in python_files(*MODEL_PACKAGE):
        for name in imported_modules(path):
            top = name.split(".")[0]
            where = f"{path.relative_to(REPO)} imports {name}"
            if top == "pipeline":
                assert any(name == p or name.startswith(p + ".") for p in MODEL_PIPELINE), where
            else:  # yaml, pydantic, prefect, mlflow, dvc, pandas...: none of them
                assert top in sys.stdlib_module_names or top == "__future__" or top in MODEL_THIRD_PARTY, where


def test_every_dvc_stage_has_a_module():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        assert spec["cmd"].startswith(f"python -m stages.{name}"), name
        assert (REPO / "stages" / f"{name}.py").exists(), name
        assert f"stages/{name}.py" in spec["deps"], name
