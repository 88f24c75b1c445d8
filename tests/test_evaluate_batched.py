"""Batched prediction (evaluate.batch_size): the same scores as one image at a time, whatever the
mix of image sizes, for evaluation and offline pseudo-labels alike."""

import numpy as np
import torch

from pipeline.config import IGNORE_INDEX, EvaluateConfig
from pipeline.data.dataset import read_label
from pipeline.data.prepared import read_manifest
from pipeline.engine.evaluate import evaluate, predict_batch, predict_image
from pipeline.engine.pseudo import generate
from pipeline.engine.setup import normalizer
from tests.tiny import class_embeddings, tiny_model
from tests.train_fixtures import make_data


def cfg(batch_size: int) -> EvaluateConfig:
    return EvaluateConfig(short_side=40, max_long_side=80, crop_size=32, stride=24, batch_size=batch_size)


def rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_a_batch_of_mixed_sizes_gives_each_image_its_one_by_one_scores():
    model = tiny_model(prompt_dropout=0.0, decoder_dropout=0.0).eval()
    embeddings = class_embeddings(num_classes=5)
    # two share a test-time size (batched together), one is wider, one is smaller than the crop
    images = [rgb(32, 32, 0), rgb(30, 50, 1), rgb(32, 32, 2), rgb(12, 20, 3)]
    batched = predict_batch(model, images, embeddings, cfg=cfg(4), normalize=normalizer("backbone"))
    for image, scores in zip(images, batched):
        label, single = predict_image(model, image, embeddings, cfg=cfg(1), normalize=normalizer("backbone"))
        assert scores.shape == (5, *image.shape[:2])
        assert torch.allclose(scores, single, atol=1e-5)
        assert np.array_equal(scores.argmax(0).numpy(), label)


def test_evaluate_and_pseudo_labels_do_not_depend_on_the_batch_size(tmp_path):
    classes = make_data(tmp_path / "data", n_train=5)
    model = tiny_model(prompt_dropout=0.0, decoder_dropout=0.0).eval()
    embeddings = class_embeddings(num_classes=classes.num_classes)
    runs = {}
    for batch_size in (1, 3):
        [result] = evaluate(model, embeddings, tmp_path / "data", classes, cfg=cfg(batch_size),
                            normalize=normalizer("backbone"), keep_samples=2, progress=False)
        out = tmp_path / f"pseudo{batch_size}"
        stats, _ = generate(model, embeddings, tmp_path / "data", classes, out, cfg=cfg(batch_size),
                            normalize=normalizer("backbone"), threshold=0.0, progress=False)
        runs[batch_size] = result, stats, sorted(p.relative_to(out) for p in out.rglob("*.png"))
    (one, stats_one, files_one), (three, stats_three, files_three) = runs[1], runs[3]
    labelled = sum(int((read_label(tmp_path / "data" / r["label"]) != IGNORE_INDEX).sum())
                   for r in read_manifest(tmp_path / "data", "val"))
    assert one.confusion.sum() == labelled > 0  # every labelled val pixel counted once
    assert np.array_equal(one.confusion, three.confusion)
    assert [s["id"] for s in one.samples] == [s["id"] for s in three.samples]
    assert stats_one == stats_three and files_one == files_three and len(files_one) == 2 * 5
