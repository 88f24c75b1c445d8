"""train.deterministic on and off: time of training steps of the test-size model, interleaved.

    python -m benchmarks.bench_deterministic [--steps 30] [--repeats 5] [--threads 2]

Trains the model of tests/train_fixtures.py for `--steps` steps with train.deterministic off and on,
alternately, `--repeats` times, and prints the median times and their ratio (figures in
docs/reliability.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.engine.train import Schedule, train
from tests.train_fixtures import setup, train_cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per setting (the median is printed)")
    parser.add_argument("--threads", type=int, default=2, help="train.threads")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp())
    times = {False: [], True: []}
    for rep in range(args.repeats):
        for det in (False, True):
            cfg = train_cfg(iterations=args.steps, threads=args.threads, deterministic=det, checkpoint_every=1000)
            model, emb, ds, cfg, loss = setup(data, cfg=cfg)
            start = time.perf_counter()
            train(model, emb, ds, cfg=cfg, loss_cfg=loss, schedule=Schedule(args.steps, 2), seed=0,
                  checkpoint=data / f"c{rep}{det}.pt", resume_key={"run": str(rep)}, progress=False)
            times[det].append(time.perf_counter() - start)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.steps} steps, median of {args.repeats}: deterministic off {off:.2f} s, on {on:.2f} s, "
          f"ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
