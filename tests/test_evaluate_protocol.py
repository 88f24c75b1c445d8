"""The evaluate stage records how the evaluated models were made: the self-training protocol and
the unseen split, as MLflow tags and in metrics.json (METHOD.md: "always record which split a
result used"; the paper's +ST numbers come from online pseudo-labels)."""

import json

import numpy as np
import pytest
import torch

import stages.evaluate as evaluate_stage
from pipeline.config import load_params
from pipeline.data.catalog import get_dataset
from pipeline.data.prepared import ClassInfo
from pipeline.engine.evaluate import EvalResult
from stages.common import StageContext
from tests.project import REPO


@pytest.mark.parametrize("mode,split", [("online", "release"), ("offline", "paper")])
def test_evaluation_records_the_self_training_protocol_and_the_unseen_split(tmp_path, monkeypatch, mode, split):
    classes = ClassInfo.from_catalog(get_dataset("context59"), split)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/classes.json").write_text(classes.to_json())
    # the models, embeddings and scoring stood in for: only what main() records is checked
    cards = {evaluate_stage.INDUCTIVE: {"setting": "inductive"},
             evaluate_stage.SELF_TRAINED: {"setting": f"self_train_{mode}"}}
    monkeypatch.setattr(evaluate_stage, "model_extra", lambda path: cards[str(path.relative_to(tmp_path))])
    monkeypatch.setattr(evaluate_stage, "load", lambda path, map_location=None, backbone=None: object())
    monkeypatch.setattr(evaluate_stage, "read_backbone_meta", lambda path: {})
    monkeypatch.setattr(evaluate_stage, "load_text_embeddings", lambda path, classes: torch.eye(classes.num_classes, 8))
    scores = {"mIoU": 50.0, "mIoU_seen": 60.0, "mIoU_unseen": 40.0, "hIoU": 48.0, "pixel_accuracy": 70.0}
    result = EvalResult(metrics=scores, confusion=np.eye(classes.num_classes, dtype=np.int64),
                        iou=np.full(classes.num_classes, 0.5), samples=[])
    monkeypatch.setattr(evaluate_stage, "evaluate", lambda *args, calibrations, **kw: [result] * len(calibrations))
    params = load_params(REPO / "params.yaml", preset="context59", overrides={"self_train.mode": mode})
    ctx = StageContext(name="evaluate", params=params, sections=evaluate_stage.SECTIONS, root=tmp_path)
    tags = {}
    monkeypatch.setattr(ctx, "set_tags", tags.update)
    threads = torch.get_num_threads()
    try:
        evaluate_stage.main(ctx)
    finally:
        torch.set_num_threads(threads)

    assert tags["cascade.self_train_mode"] == mode
    assert tags["cascade.unseen_split"] == split
    metrics = json.loads((tmp_path / evaluate_stage.METRICS).read_text())
    assert metrics["protocol"] == {"self_train_mode": mode, "unseen_split": split, "dataset": "context59"}
    assert metrics["self_train"]["hIoU"] == 48.0  # the settings' numbers stay as they were
    assert all(isinstance(v, float) for k, v in ctx.metrics.items())  # no string reaches MLflow's metrics
