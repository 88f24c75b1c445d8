"""Numeric parity with the authors' release: its state dict, imported with import-checkpoint's code,
gives the release's logits, inference scores and loss (golden values from benchmarks/release_parity.py)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import IGNORE_INDEX, LossConfig, ModelConfig
from pipeline.model import load, segmentation_loss
from pipeline.model.release import import_release_checkpoint

GOLDEN = Path(__file__).parent / "data" / "release_golden.safetensors"
RTOL = 1e-5  # of the golden values' largest magnitude


@pytest.fixture(scope="module")
def golden():
    tensors = load_file(str(GOLDEN))
    meta = json.loads(GOLDEN.with_suffix(".json").read_text())
    return tensors, meta


@pytest.fixture(scope="module")
def imported(golden, tmp_path_factory):
    """Our model from the golden release state dict, through a release-format .pth and import-checkpoint."""
    tensors, meta = golden
    tmp = tmp_path_factory.mktemp("release")
    state = {k.removeprefix("release/"): v for k, v in tensors.items() if k.startswith("release/")}
    torch.save({"meta": {"iter": 0}, "state_dict": state, "optimizer": {}}, tmp / "iter_0.pth")
    summary = import_release_checkpoint(
        tmp / "iter_0.pth", tmp / "model.safetensors",
        model_cfg=ModelConfig(**meta["ours"]["model_config"]), arch=meta["ours"]["arch"],
    )
    assert summary["imported_tensors"] + sum(summary["dropped"].values()) + 1 == len(state)  # + 1: the two prompt sets are one
    return load(summary["out"]).eval()


def assert_matches(name, ours, expected):
    diff = (ours - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"{name}: max abs difference {diff:.3g}, relative to max |golden| {scale:.3g}: {diff / scale:.3g}")
    assert diff <= RTOL * scale, f"{name} differs from the release by {diff:.3g} (allowed {RTOL * scale:.3g})"


def test_golden_file_was_made_from_the_release_with_non_trivial_logits(golden):
    tensors, meta = golden
    assert meta["release"]["repository"] == "HVision-NKU/Cascade-CLIP" and len(meta["release"]["commit"]) == 40
    assert 1 < tensors["output/logits"].std() < 10 and tensors["output/logits"].abs().max() > 5
    assert GOLDEN.stat().st_size < 4_000_000


def test_imported_release_logits_and_scores_match_the_release(golden, imported):
    tensors, _ = golden
    images, text = tensors["input/images"], tensors["input/class_embeddings"]
    seen = torch.zeros(len(text), dtype=torch.bool)
    seen[tensors["input/seen"]] = True
    with torch.no_grad():
        out = imported(images, text)
    assert out.logits.shape == tensors["output/logits"].shape
    assert_matches("logits", out.logits, tensors["output/logits"])
    assert_matches("inference scores", out.scores(0.1, seen), tensors["output/scores"])


def test_imported_release_loss_matches_the_release(golden, imported):
    tensors, meta = golden
    images, text, seen = tensors["input/images"], tensors["input/class_embeddings"], tensors["input/seen"]
    # inductive training: seen classes only, labels as indices into them, unseen pixels ignored
    to_seen = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    to_seen[seen] = torch.arange(len(seen))
    labels = to_seen[tensors["input/labels"]]
    cfg = LossConfig()
    with torch.no_grad():
        loss = segmentation_loss(imported(images, text[seen]), labels, cfg)
    assert_matches("loss_mask (weighted focal)", cfg.focal_weight * loss.focal, tensors["output/loss_mask"])
    assert_matches("loss_dice", cfg.dice_weight * loss.dice, tensors["output/loss_dice"])
    assert_matches("loss", loss.total, tensors["output/loss_mask"] + tensors["output/loss_dice"])
