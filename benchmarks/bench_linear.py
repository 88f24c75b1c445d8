"""oneDNN's linear against torch's (MKL) on the model's layer shapes, side by side in one process.

    python -m benchmarks.bench_linear [--runs 25] [--threads 2]

For each shape (rows x in -> out) of the paper-size model (ViT-B/16 at 512x512 with 50 prompt
tokens, its COCO-Stuff decoders with 171 classes) and of the demo model (width 64), times
`F.linear` and oneDNN's `_linear_pointwise` interleaved (median of --runs after five untimed
rounds) and prints both, their ratio, and which one `frozen_linear` takes for a layer whose
weights need no gradient (pipeline.model.frozen_linear's MIN_WIDTH and MIN_MACS rule).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.model.frozen_linear import MIN_MACS, MIN_WIDTH, ONEDNN, _takes_onednn

SHAPES = (  # (rows, in, out, what)
    (1025, 768, 2304, "ViT-B/16 block: q, k, v of the CLS and patch tokens"),
    (50, 768, 1536, "ViT-B/16 block: k, v of the 50 prompt tokens"),
    (1025, 768, 768, "ViT-B/16 block: attention output"),
    (1025, 768, 3072, "ViT-B/16 block: MLP in"),
    (1025, 3072, 768, "ViT-B/16 block: MLP out"),
    (1024, 768, 512, "tap projection"),
    (171, 1024, 512, "text projection, 171 classes"),
    (1024, 512, 512, "decoder: k, v of the stage features"),
    (171, 512, 512, "decoder: q, attention output"),
    (171, 512, 2048, "decoder: FFN in"),
    (171, 2048, 512, "decoder: FFN out"),
    (6240, 64, 192, "demo toy CLIP pretraining, batch 96: q, k, v"),
    (6240, 64, 256, "demo toy CLIP pretraining: MLP in"),
    (6240, 256, 64, "demo toy CLIP pretraining: MLP out"),
    (1160, 64, 192, "demo training, batch 8: q, k, v"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=25, help="timed rounds per shape")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    if not ONEDNN:
        raise SystemExit("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32; rule: in and out >= {MIN_WIDTH}, "
          f"rows x in x out >= {MIN_MACS}")
    print(f"{'rows x in -> out':>22}  {'MKL ms':>8}  {'oneDNN ms':>9}  {'ratio':>5}  {'takes':>6}  layer")
    for rows, width_in, width_out, what in SHAPES:
        x = torch.randn(rows, width_in, generator=gen)
        weight, bias = torch.randn(width_out, width_in, generator=gen), torch.randn(width_out, generator=gen)
        calls = {"mkl": lambda: F.linear(x, weight, bias),
                 "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for i in range(5 + args.runs):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if i >= 5:
                    times[name].append(time.perf_counter() - start)
        mkl, onednn = (statistics.median(times[name]) * 1e3 for name in ("mkl", "onednn"))
        with torch.no_grad():
            takes = "oneDNN" if _takes_onednn(x, weight, bias) else "MKL"
        shape = f"{rows} x {width_in} -> {width_out}"
        print(f"{shape:>22}  {mkl:8.3f}  {onednn:9.3f}  {onednn / mkl:5.2f}  {takes:>6}  {what}")


if __name__ == "__main__":
    main()
