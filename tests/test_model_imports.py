import ast
import sys
from pathlib import Path

from tests.conftest import REPO

MODEL_DIR = REPO / "pipeline" / "model"
ALLOWED_THIRD_PARTY = {"torch", "open_clip", "timm", "numpy", "safetensors"}
# pipeline.io (atomic, byte-stable writes) and pipeline.errors are leaves: checked below to pull in
# nothing else, so the model package's whole dependency closure stays free of orchestration
ALLOWED_PIPELINE = {"pipeline.config", "pipeline.model", "pipeline.io", "pipeline.errors"}
LEAVES = [REPO / "pipeline" / "io.py", REPO / "pipeline" / "errors.py"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_model_package_imports_no_orchestration_or_tracking():
    files = sorted(MODEL_DIR.glob("*.py"))
    assert files
    for path in files + LEAVES:
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in {"prefect", "mlflow", "dvc", "yaml"}, f"{path.name} imports {name}"
            if top == "pipeline":
                assert any(name == p or name.startswith(p + ".") for p in ALLOWED_PIPELINE), f"{path.name} imports {name}"
            elif top not in sys.stdlib_module_names and top != "__future__":
                assert top in ALLOWED_THIRD_PARTY, f"{path.name} imports {name}"
