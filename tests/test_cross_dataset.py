"""Cross-dataset evaluation: another dataset's val split, all its classes, the model's text tower."""

import numpy as np

from pipeline.config import load_params
from pipeline.engine.evaluate import evaluate
from pipeline.engine.setup import normalizer
from stages.common import StageContext
from stages.evaluate import cross_dataset, cross_embeddings
from tests.fake_datasets import make_voc
from tests.project import REPO
from tests.tiny import tiny_model


def test_voc_val_is_prepared_once_and_scored_with_all_its_classes(tmp_path):
    fake = make_voc(tmp_path / "sources")
    params = load_params(REPO / "params.yaml", overrides={
        "dataset.source_dir": str(fake.folder), "dataset.download": False, "dataset.verify_checksums": False,
        "dataset.workers": 1, "evaluate.cross_dataset": "voc12", "evaluate.short_side": 32, "evaluate.crop_size": 32,
        "evaluate.stride": 24, "evaluate.max_long_side": 64,
    })
    ctx = StageContext(name="evaluate", params=params, sections=("evaluate",), root=tmp_path / "project")
    root, classes = cross_dataset(ctx, "voc12")
    assert root == tmp_path / "project/data/cross/voc12"
    assert classes.num_classes == 20 and classes.seen_ids == [] and classes.unseen_ids == list(range(20))
    assert (root / "labels").exists() and not (root / "images" / "train").exists()  # val split only
    stamp = (root / "classes.json").stat().st_mtime_ns
    cross_dataset(ctx, "voc12")
    assert (root / "classes.json").stat().st_mtime_ns == stamp  # prepared once

    model = tiny_model()
    embeddings = cross_embeddings(model, classes)
    assert embeddings.shape == (20, 32)
    assert np.allclose(embeddings.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    [result] = evaluate(model, embeddings, root, classes, cfg=params.evaluate, normalize=normalizer("imagenet"),
                        progress=False)
    assert result.confusion.shape == (20, 20) and result.confusion.sum() > 0
    assert not np.isnan(result.metrics["mIoU"]) and np.isnan(result.metrics["mIoU_seen"])
