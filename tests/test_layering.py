"""Imports point one way (stages -> pipeline); model and data code never import orchestration."""

import ast
from pathlib import Path

from tests.conftest import REPO

ORCHESTRATION = {"prefect", "mlflow", "dvc"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def top_level(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_pipeline_never_imports_stages():
    for path in (REPO / "pipeline").rglob("*.py"):
        assert "stages" not in top_level(imported_modules(path)), path


def test_model_data_and_engine_code_never_import_orchestration_or_tracking():
    for package in ("model", "data", "engine"):
        for path in (REPO / "pipeline" / package).rglob("*.py"):
            bad = top_level(imported_modules(path)) & ORCHESTRATION
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_every_dvc_stage_has_a_module():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        assert spec["cmd"].startswith(f"python -m stages.{name}"), name
        assert (REPO / "stages" / f"{name}.py").exists(), name
        assert f"stages/{name}.py" in spec["deps"], name
