"""How OpenMP's wait policy changes a demo training step, alone and with a second process beside it.

    python -m benchmarks.bench_omp_wait [--steps 40] [--threads 2]

Each setting runs the default demo model (a randomly initialised toy CLIP with prompts and
cascade head, params.yaml's model/loss/crop) for `--steps` training steps on a fixed synthetic
batch, in fresh processes: one alone, then two at once (as when two experiments or a test run
share the cores). Prints seconds per step for each. torch reads the policy when it loads, hence
one process per measurement. Settings: passive (what the stages use by default), short spins
(GOMP_SPINCOUNT, which `make repro` sets to 10000) and ACTIVE (spin until work comes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=3000": {"GOMP_SPINCOUNT": "3000"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=30000": {"GOMP_SPINCOUNT": "30000"},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
}
ROOT = Path(__file__).resolve().parent.parent


def child(steps: int, threads: int) -> None:
    """Time `steps` training steps and print the seconds per step (the last line of output)."""
    import torch

    from pipeline.config import load_params
    from pipeline.model import build_model
    from pipeline.model.clip import toy_arch
    from pipeline.model.loss import segmentation_loss

    torch.set_num_threads(threads)
    params = load_params(ROOT / "params.yaml")
    torch.manual_seed(0)
    model = build_model(params.model, toy_arch(params.clip.toy)).train()
    optimizer = torch.optim.AdamW(model.param_groups(1e-5, 0.01, 10.0), lr=1e-5)
    side = params.train.crop_size
    embeddings = torch.nn.functional.normalize(torch.randn(12, params.clip.toy.embed_dim), dim=-1)
    images = torch.randn(params.train.batch_size, 3, side, side)
    labels = torch.full((params.train.batch_size, side, side), 255, dtype=torch.long)
    labels[:, side // 5 : side // 2, side // 5 : side // 2], labels[:, side // 2 :, side // 2 :] = 3, 7

    def step() -> None:
        loss = segmentation_loss(model(images, embeddings), labels, params.loss, num_masks=2.0 * len(images))
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(f"{(time.perf_counter() - start) / steps:.4f}")


def measure(env_extra: dict[str, str], copies: int, steps: int, threads: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | env_extra
    cmd = [sys.executable, "-m", "benchmarks.bench_omp_wait", "--child", "--steps", str(steps), "--threads", str(threads)]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a benchmark process failed ({env_extra})")
    return [float(out.split()[-1]) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.threads)
        return
    print(f"{os.cpu_count()} CPUs, {args.threads} torch threads per process, {args.steps} steps\n")
    print(f"{'setting':<24} {'alone s/step':>13} {'two at once s/step (each)':>28}")
    for name, extra in SETTINGS.items():
        alone = measure(extra, 1, args.steps, args.threads)[0]
        pair = measure(extra, 2, args.steps, args.threads)
        print(f"{name:<24} {alone:>13.3f} {' / '.join(f'{t:.3f}' for t in pair):>28}", flush=True)


if __name__ == "__main__":
    main()
