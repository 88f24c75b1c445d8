"""Each stage's SECTIONS (what it hashes into its resume key and logs to MLflow) agree with the
params dvc.yaml lists for it (what invalidates its cache), and with what its module reads."""

import importlib
import re

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import Params
from tests.project import REPO

DVC_STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def inside(key: str, entry: str) -> bool:
    """`key` is `entry` or a key below it (train.normalization is inside train)."""
    return key == entry or key.startswith(f"{entry}.")


@pytest.mark.parametrize("name", sorted(DVC_STAGES))
def test_every_dvc_param_is_inside_a_declared_section(name):
    sections = importlib.import_module(f"stages.{name}").SECTIONS
    for key in DVC_STAGES[name].get("params", []):
        assert any(inside(key, s) for s in sections), f"dvc.yaml {name}: param {key} is not in stages/{name}.py SECTIONS {sections}"


@pytest.mark.parametrize("name", sorted(DVC_STAGES))
def test_every_declared_section_is_listed_in_dvc_yaml(name):
    params = DVC_STAGES[name].get("params", [])
    for section in importlib.import_module(f"stages.{name}").SECTIONS:
        assert any(inside(key, section) or inside(section, key) for key in params), (
            f"stages/{name}.py SECTIONS has {section} but dvc.yaml {name}: params {params} does not list it")


@pytest.mark.parametrize("name", sorted(DVC_STAGES))
def test_declared_sections_are_params_keys(name):
    for section in importlib.import_module(f"stages.{name}").SECTIONS:
        model: type[BaseModel] | None = Params
        for part in section.split("."):
            assert model is not None and part in model.model_fields, f"stages/{name}.py SECTIONS: {section} is no params key"
            annotation = model.model_fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


@pytest.mark.parametrize("name", sorted(DVC_STAGES))
def test_stage_module_reads_only_declared_sections(name):
    # `ctx.params.<section>` and `p.<section>` (with p = ctx.params) in the stage's own module
    source = (REPO / "stages" / f"{name}.py").read_text()
    read = set(re.findall(r"(?:ctx\.params|\bp)\.([a-z_]+)", source)) & set(Params.model_fields)
    declared = {s.split(".")[0] for s in importlib.import_module(f"stages.{name}").SECTIONS}
    assert read <= declared, f"stages/{name}.py reads params sections {sorted(read - declared)} not in its SECTIONS"


def test_a_dotted_section_gives_just_that_key_nested():
    params = Params()
    assert params.section_dict("seed", "dataset.demo.rotation") == {"seed": 0, "dataset": {"demo": {"rotation": 0.0}}}
    assert params.section_dict("train")["train"] == params.train.model_dump(mode="json")
