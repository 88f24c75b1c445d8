"""Run by `torchrun --nproc_per_node 2` from tests: a few DDP steps (gloo on CPU), then each rank
saves its trainable parameters so the test can check they stayed in sync."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.engine.train import Schedule, train  # noqa: E402
from tests.train_fixtures import setup, train_cfg, trainable_vector  # noqa: E402

data, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
model, embeddings, dataset, cfg, loss_cfg = setup(data, dropout=0.0, cfg=train_cfg(batch_size=2, iterations=4))
result = train(model, embeddings, dataset, cfg=cfg, loss_cfg=loss_cfg, schedule=Schedule(4, 2), seed=0,
               checkpoint=out / "ckpt.pt", resume_key={"run": "ddp"}, progress=False)
torch.save(trainable_vector(model), out / f"rank{dist.get_rank()}.pt")
dist.destroy_process_group()
