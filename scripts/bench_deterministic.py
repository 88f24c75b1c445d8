"""train.deterministic on and off: time of 30 training steps of the test-size model (tests/train_fixtures.py),
interleaved, median of 5. Run from the project root: PYTHONPATH=. python scripts/bench_deterministic.py"""
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.engine.train import Schedule, train
from tests.train_fixtures import setup, train_cfg

data = Path(tempfile.mkdtemp())
times = {False: [], True: []}
for rep in range(5):
    for det in (False, True):
        model, emb, ds, cfg, loss = setup(data, cfg=train_cfg(iterations=30, threads=2, deterministic=det, checkpoint_every=1000))
        t = time.perf_counter()
        train(model, emb, ds, cfg=cfg, loss_cfg=loss, schedule=Schedule(30, 2), seed=0, checkpoint=data / f"c{rep}{det}.pt",
              resume_key={"run": str(rep)}, progress=False)
        times[det].append(time.perf_counter() - t)
off, on = statistics.median(times[False]), statistics.median(times[True])
print(f"30 steps, median of 5: deterministic off {off:.2f} s, on {on:.2f} s, ratio {on/off:.3f}")
