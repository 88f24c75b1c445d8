"""The `cascade-clip` command line: one sub-command per tool, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import CascadeError


def _cmd_params(args: argparse.Namespace) -> int:
    from pipeline.config import describe_fields, load_params, render_params_yaml

    if args.check:
        load_params(args.check)
        print(f"{args.check}: valid")
        return 0
    if args.defaults:
        sys.stdout.write(render_params_yaml())
        return 0
    rows = describe_fields()
    width = max(len(key) for key, _, _ in rows)
    for key, default, doc in rows:
        print(f"{key:<{width}}  {doc}  [default: {default}]")
    return 0


def _print_json(data: dict, path: Path | None = None) -> None:
    import json

    text = json.dumps(data, indent=2, default=str)
    print(text)
    if path is not None:
        from pipeline.io import atomic_file

        with atomic_file(path, "w") as handle:
            handle.write(text + "\n")


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _cmd_model_info(args: argparse.Namespace) -> int:
    from pipeline.model.tools import model_info

    info = model_info(args.preset, args.variant, image_size=args.image_size)
    if args.json:
        _print_json(info)
    else:
        _print_table([(k, f"{v:,}" if isinstance(v, int) else str(v)) for k, v in info.items()])
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.model.tools import bench_inference

    result = bench_inference(
        args.preset, variants=args.variant, dtype=args.dtype, image_size=args.image_size,
        runs=args.runs, warmup=args.warmup, batch_size=args.batch_size, device=args.device, threads=args.threads,
    )
    _print_json(result, args.json)
    return 0


def _cmd_import_checkpoint(args: argparse.Namespace) -> int:
    import logging

    from pipeline.model.tools import import_release_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = import_release_checkpoint(args.src, args.out, args.preset, allow_pickle=args.allow_pickle)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_json(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-clip", description="Cascade-CLIP zero-shot segmentation tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="list every parameter with its meaning, or check a params file")
    p.add_argument("--check", type=Path, metavar="FILE", help="validate FILE and report every problem")
    p.add_argument("--defaults", action="store_true", help="print a params.yaml with the defaults and comments")
    p.set_defaults(func=_cmd_params)

    presets = ["voc12", "coco", "context59", "demo"]
    variants = ["cascade", "zegclip", "fusion", "frozen"]
    p = sub.add_parser("model-info", help="parameters, multiply-adds/FLOPs per image, stages and NGA weights of a preset")
    p.add_argument("--preset", choices=presets, default="coco")
    p.add_argument("--variant", choices=variants, default="cascade")
    p.add_argument("--image-size", type=int, default=512, help="input side in pixels")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_model_info)

    p = sub.add_parser("bench", help="benchmarks (measured by hand, never in tests)")
    bench = p.add_subparsers(dest="bench", required=True)
    p = bench.add_parser("inference", help="median latency of randomly initialised preset models, variants side by side")
    p.add_argument("--preset", choices=presets, default="coco")
    p.add_argument("--variant", nargs="+", choices=variants, default=["cascade", "zegclip"])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--image-size", type=int, default=512, help="input side in pixels")
    p.add_argument("--runs", type=int, default=5, help="timed forward passes per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes first")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the result to FILE")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("import-checkpoint", help="convert an authors' release checkpoint (mmseg .pth) to our model file")
    p.add_argument("src", type=Path, help="release checkpoint, e.g. iter_80000.pth")
    p.add_argument("out", type=Path, help="model file to write (.safetensors)")
    p.add_argument("--preset", choices=[x for x in presets if x != "demo"], required=True, help="model configuration of the checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="unpickle arbitrary objects (trusted files only; prints a warning)")
    p.set_defaults(func=_cmd_import_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CascadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
