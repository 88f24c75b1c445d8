"""Every preset loads and validates over the repository's params.yaml and sets the paper's settings."""

import pytest
import yaml

from pipeline.config import PRESETS_DIR, load_params
from tests.conftest import REPO

PRESETS = ["voc12", "coco", "context59", "coco_to_voc", "coco_to_context"]

# (dataset, prompt tokens, iterations, templates, self-training iterations) from METHOD.md
PAPER = {
    "voc12": ("voc12", 10, 20000, "single", 10000),
    "coco": ("coco_stuff164k", 50, 80000, "paper15", 40000),
    "context59": ("context59", 35, 40000, "paper15", 20000),
    "coco_to_voc": ("coco_stuff164k", 50, 80000, "paper15", 40000),
    "coco_to_context": ("coco_stuff164k", 50, 80000, "paper15", 40000),
}


def test_the_dataset_presets_exist():
    assert set(PRESETS) <= {p.stem for p in PRESETS_DIR.glob("*.yaml")}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_sets_the_paper_settings(name):
    p = load_params(REPO / "params.yaml", preset=name)
    dataset, prompts, iterations, templates, st_iterations = PAPER[name]
    assert p.dataset.name == dataset
    assert (p.model.prompt_tokens, p.train.iterations, p.text.templates, p.self_train.iterations) == (
        prompts, iterations, templates, st_iterations)
    assert p.clip.source == "openai" and p.model.release_double_cls and p.model.image_size == 512
    assert p.train.batch_size * p.train.grad_accum == 16
    assert (p.train.lr, p.train.warmup_iters, p.train.normalization) == (2e-5, 1500, "imagenet")
    assert (p.train.crop_size, tuple(p.train.scale)) == (512, (2048, 512))
    assert (p.evaluate.crop_size, p.evaluate.stride, p.evaluate.short_side, p.evaluate.max_long_side) == (
        512, 426, 512, 2048)


@pytest.mark.parametrize("name,target", [("coco_to_voc", "voc12"), ("coco_to_context", "context59")])
def test_cross_dataset_presets_are_coco_plus_the_target(name, target):
    cross = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())
    coco = yaml.safe_load((PRESETS_DIR / "coco.yaml").read_text())
    assert cross["evaluate"].pop("cross_dataset") == target
    assert cross == coco
    assert load_params(REPO / "params.yaml", preset=name).evaluate.cross_dataset == target
    assert load_params(REPO / "params.yaml", preset="coco").evaluate.cross_dataset is None
