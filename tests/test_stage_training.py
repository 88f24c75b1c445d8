"""What the train and self_train stages share (pipeline.engine.stage_training): train, then write the
model folder, the curve and the metrics, log them through the caller's function, drop the checkpoints."""

import csv
import json

from pipeline.engine.stage_training import HALF_MODEL, TrainingOutputs, run_training
from pipeline.engine.train import CURVE_KEYS
from pipeline.model import model_extra
from tests.train_fixtures import setup, train_cfg


def test_a_training_run_writes_its_outputs_logs_them_and_removes_its_checkpoints(tmp_path):
    model, embeddings, dataset, cfg, loss_cfg = setup(tmp_path / "data", cfg=train_cfg(iterations=4, log_every=2))
    outputs = TrainingOutputs(model_dir=tmp_path / "out", checkpoints=tmp_path / "ckpt", curve=tmp_path / "curve.csv",
                              metrics=tmp_path / "metrics.json")
    logged = []
    values = run_training(
        model, embeddings, dataset, cfg=cfg, loss_cfg=loss_cfg, seed=0, iterations=4, warmup=1, outputs=outputs,
        card={"setting": "inductive"}, resume_key={"run": "h"}, keep_half=True,
        log_metrics=lambda metrics, step=None: logged.append((step, sorted(metrics))),
        write_config=lambda folder: (folder / "stage_params.yaml").write_text("seed: 0\n"),
    )
    assert sorted(p.name for p in outputs.model_dir.iterdir()) == sorted([HALF_MODEL, "model.safetensors",
                                                                          "stage_params.yaml"])
    assert model_extra(outputs.model_dir / "model.safetensors")["setting"] == "inductive"
    assert not outputs.checkpoints.exists()
    with open(outputs.curve) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [2, 4] and list(rows[0]) == list(CURVE_KEYS)
    assert json.loads(outputs.metrics.read_text()) == values and values["resumed_from"] == 0
    assert logged == [(2, ["dice", "focal", "loss", "lr"]), (4, ["dice", "focal", "loss", "lr"]), (None, sorted(values))]
