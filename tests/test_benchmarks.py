"""The benchmarks and diagnostics in benchmarks/ import and answer --help, import nothing from stages/,
and declare what they import, so that a moved name or a missing package cannot break them unseen."""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib

import pytest

from tests.project import REPO

MODULES = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.stem.startswith("_"))
OWN = {"benchmarks", "pipeline", "tests"}
RELEASE_CODE = {"models"}  # the authors' release, which release_parity imports from a fetched copy


def imports(name: str) -> set[str]:
    tree = ast.parse((REPO / "benchmarks" / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["bench"]]
    return {re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


def test_the_benchmarks_are_found():
    assert {"bench_convert", "border_accuracy", "release_parity"} <= set(MODULES)
    assert not list((REPO / "scripts").glob("*.py")), "benchmarks and diagnostics belong in benchmarks/"


# runs each module as `python -m` does (runpy, as __main__, with argv), in one fresh interpreter: one torch import
HELP_ALL = """
import contextlib, io, json, runpy, sys
answers = {}
for name in sys.argv[1:]:
    sys.argv, out = [name, "--help"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
        code = "returned without exiting"
    except SystemExit as exc:
        code = exc.code
    answers[name] = [code, out.getvalue()]
print(json.dumps(answers))
"""


def test_every_benchmark_answers_help_without_running():
    done = subprocess.run([sys.executable, "-c", HELP_ALL, *MODULES], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for name, (code, out) in json.loads(done.stdout.splitlines()[-1]).items():
        assert code == 0 and out.startswith("usage: "), f"python -m benchmarks.{name} --help: {code}\n{out}"
        assert f"python -m benchmarks.{name}" in (REPO / "benchmarks" / f"{name}.py").read_text(), f"{name}'s docstring"


@pytest.mark.parametrize("name", MODULES + ["_demo"])
def test_benchmarks_import_nothing_from_stages_and_only_declared_packages(name):
    found = imports(name) - OWN - RELEASE_CODE - set(sys.stdlib_module_names)
    assert "stages" not in found, f"benchmarks/{name}.py imports from stages/: import from pipeline or define it"
    providers = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    missing = {module for module in found
               if not {d.lower().replace("_", "-") for d in providers.get(module, [module])} & declared}
    assert not missing, f"benchmarks/{name}.py imports {sorted(missing)}: add them to the bench extra in pyproject.toml"
