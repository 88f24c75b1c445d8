"""Each fact lives once: dataset names in catalog.yaml, presets in presets/*.yaml, variant names in
config.Variant; config validation, the CLI's choices and the model presets' rows derive from them."""

from typing import get_args

import pytest
import yaml

from pipeline import cli
from pipeline.config import PRESETS_DIR, ParamsError, Variant, model_preset_names, preset_params, validate_params
from pipeline.data import catalog
from pipeline.model.build import VARIANTS
from pipeline.model.presets import preset


def choices(command: str, option: str) -> list[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


def test_dataset_names_are_validated_against_the_catalog(monkeypatch):
    with pytest.raises(ParamsError, match="dataset.name: invalid value 'voc'; valid choices: 'demo', 'voc12', "
                                          "'coco_stuff164k', 'context59'"):
        validate_params({"dataset": {"name": "voc"}})
    raw = catalog._raw() | {"datasets": catalog._raw()["datasets"] | {"ade20k": {"sources": {"zip": {}}}}}
    monkeypatch.setattr(catalog, "_raw", lambda: raw)  # a dataset added to the catalog is valid at once
    assert validate_params({"dataset": {"name": "ade20k"}, "evaluate": {"cross_dataset": "ade20k"}}).dataset.name == "ade20k"


def test_cross_dataset_takes_the_catalogs_real_datasets_only():
    assert validate_params({"evaluate": {"cross_dataset": "context59"}}).evaluate.cross_dataset == "context59"
    with pytest.raises(ParamsError, match="evaluate.cross_dataset: invalid value 'demo'; valid choices: 'voc12', "
                                          "'coco_stuff164k', 'context59'"):
        validate_params({"evaluate": {"cross_dataset": "demo"}})


def test_variant_names_are_the_builders_names():
    assert list(get_args(Variant)) == list(VARIANTS)
    assert choices("model-info", "--variant") == list(VARIANTS)


def test_model_presets_are_demo_and_the_preset_files_that_train_a_model():
    assert model_preset_names() == ["demo", "coco", "coco_vitb16_laion", "coco_vitl14", "context59", "voc12",
                                    "voc12_vitb16_laion", "voc12_vitl14"]  # not ablations, coco_to_voc, coco_to_context
    assert {p.stem for p in PRESETS_DIR.glob("*.yaml")} >= set(model_preset_names()[1:])
    assert choices("model-info", "--preset") == model_preset_names()
    assert choices("import-checkpoint", "--preset") == model_preset_names()[1:]
    with pytest.raises(ValueError, match="unknown model preset 'coco_to_voc'"):
        preset("coco_to_voc")


def test_model_preset_rows_come_from_the_preset_files_and_the_catalog():
    paper = [(6, 8), (9, 11), (12, 12)]
    assert preset("coco") == {"arch": "ViT-B-16-quickgelu", "image_size": 512, "prompt_tokens": 50, "num_classes": 171,
                              "stages": paper, "release": True}
    assert preset("voc12")["prompt_tokens"] == 10 and preset("voc12")["num_classes"] == 20
    assert preset("context59")["prompt_tokens"] == 35 and preset("context59")["num_classes"] == 59
    assert preset("demo") == {"arch": "toy", "image_size": 96, "prompt_tokens": 10, "num_classes": 16, "stages": paper,
                              "release": False}
    for name in model_preset_names()[1:]:
        data = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())
        assert preset(name)["prompt_tokens"] == data["model"]["prompt_tokens"]
        assert preset(name)["num_classes"] == len(catalog.get_dataset(data["dataset"]["name"]).classes)
        assert preset_params(name).dataset.name == data["dataset"]["name"]  # over the defaults, not params.yaml
