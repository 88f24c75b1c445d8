"""The `cascade-clip` command line: one sub-command per tool, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pipeline import choose_openmp_wait
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
    if args.apply_preset:
        from pipeline.experiments import apply_preset

        changed = apply_preset(args.file, args.apply_preset)
        print(f"{args.file}: preset {args.apply_preset} applied, {len(changed)} keys changed, comments kept "
              "(commit it, then `dvc repro`)")
        return 0
    rows = describe_fields()
    width = max(len(key) for key, _, _ in rows)
    for key, default, doc in rows:
        print(f"{key:<{width}}  {doc}  [default: {default}]")
    return 0


def _print_json(data: dict, path: Path | None = None) -> None:
    import json

    print(json.dumps(data, indent=2, default=str))
    if path is not None:
        _write_json(data, path)


def _write_json(data: dict, path: Path) -> None:
    """`data` as indented JSON in `path`, written aside and renamed into place."""
    import json

    from pipeline.io import atomic_file

    with atomic_file(path, "w") as handle:
        handle.write(json.dumps(data, indent=2, default=str) + "\n")


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
    from pipeline.model.tools import bench_inference, bench_train_step

    if args.bench == "train-step":
        result = bench_train_step(args.preset, variants=args.variant, image_size=args.image_size, batch_size=args.batch_size,
                                  runs=args.runs, warmup=args.warmup, device=args.device, threads=args.threads)
        _print_json(result, args.json)
        return 0
    old_amp = {"fp32": "none", "bf16": "bf16", None: None}[args.dtype]  # --dtype: the option's old name
    if args.amp is not None and old_amp is not None and args.amp != old_amp:
        raise CascadeError(f"--amp {args.amp} and --dtype {args.dtype} disagree; pass --amp alone")
    result = bench_inference(
        args.preset, variants=args.variant, amp=args.amp or old_amp or "none", image_size=args.image_size,
        runs=args.runs, warmup=args.warmup, batch_size=args.batch_size, device=args.device, threads=args.threads,
    )
    _print_bench_inference(result)
    if args.json is not None:
        _write_json(result, args.json)
    return 0


PAPER_NAMES = {"cascade": "Cascade-CLIP", "zegclip": "ZegCLIP"}


def _print_bench_inference(result: dict) -> None:
    """`bench inference`'s result as a few lines: settings, one row per variant, the paper's Table 12."""
    cuda = result["device"].startswith("cuda")
    print(f"bench inference: preset {result['preset']}, {result['image_size']}x{result['image_size']} images, "
          f"batch {result['batch_size']}, AMP {result['amp']}, torch {result['torch_version']}")
    threads = "" if cuda else f", {result['torch_threads']} torch threads"
    print(f"device: {result['device']} ({result['device_name']}){threads}")
    header = ["variant", "median latency", "FPS (images/s)", "peak GPU memory" if cuda else "peak RSS"]
    rows = [header]
    for variant, row in result["variants"].items():
        memory = row["peak_gpu_mem_mb"] if cuda else row["peak_rss_mb"]
        rows.append([variant, f"{row['median_latency_s'] * 1000:.4g} ms", f"{row['fps']:.2f}", f"{memory:,.0f} MB"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths)).rstrip())
    if "cascade_over_zegclip_latency" in result:
        print(f"cascade / zegclip latency: {result['cascade_over_zegclip_latency']}")
    paper = result["paper_table12"]
    fps = ", ".join(f"{PAPER_NAMES.get(v, v)} {f} FPS" for v, f in paper["fps"].items())
    print(f"paper, Table 12 (COCO-Stuff model, {paper['gpu']}, batch {paper['batch_size']}): {fps}")


def _cmd_import_checkpoint(args: argparse.Namespace) -> int:
    import logging

    from pipeline.model.tools import import_release_checkpoint

    if args.out.exists() and not args.overwrite:
        raise CascadeError(f"{args.out} exists; pass --overwrite to replace it, or choose another output file")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = import_release_checkpoint(args.src, args.out, args.preset, allow_pickle=args.allow_pickle)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_json(summary)
    return 0


DEFAULT_MODELS = ("artifacts/self_train/model.safetensors", "artifacts/train/model.safetensors")


def _cmd_predict(args: argparse.Namespace) -> int:
    import matplotlib
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from pipeline.config import load_params
    from pipeline.data.catalog import palette
    from pipeline.predict import Segmenter, output_files, parse_classes, plan_outputs
    from pipeline.viz import close, legend_figure

    matplotlib.use("Agg")  # the legend is drawn for a file
    classes = parse_classes(args.classes)
    plan = plan_outputs(args.inputs, args.out, scores=args.scores, overwrite=args.overwrite)
    model_path = args.model or next((Path(m) for m in DEFAULT_MODELS if Path(m).is_file()), Path(DEFAULT_MODELS[-1]))
    inference = load_params(args.params).evaluate if args.params.is_file() else None
    if inference is not None:
        inference = inference.model_copy(update={k: v for k, v in {"mode": args.mode, "crop_size": args.crop,
                                                                     "stride": args.stride, "short_side": args.short_side}.items() if v})
    segmenter = Segmenter.from_file(model_path, device=args.device, templates=args.templates, inference=inference,
                                    backbone=args.backbone)
    colours = palette(len(classes))
    for path, stem in tqdm(plan, desc="segmenting", unit="img", disable=len(plan) < 2):
        result = segmenter(path, classes, threshold=args.threshold)
        label_file, overlay_file, *scores_file = output_files(stem, scores=args.scores)
        stem.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(result.label.astype(np.uint8)).save(label_file)
        figure = legend_figure(np.asarray(Image.open(path).convert("RGB")), result.label, classes, colours)
        figure.savefig(overlay_file, dpi=110, bbox_inches="tight")
        close(figure)
        if scores_file:
            np.save(scores_file[0], result.scores.astype(np.float16))
        present = ", ".join(f"{classes[i]} {np.mean(result.label == i) * 100:.0f}%" for i in np.unique(result.label) if i < len(classes))
        tqdm.write(f"{path}: {present}")
    print(f"wrote {len(plan)} label maps and overlays to {args.out} (model {model_path})")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from pipeline.compare import compare, evaluation_runs, register_best
    from pipeline.config import TrackingConfig
    from pipeline.tracking import tracking_uri

    client = MlflowClient(args.tracking_uri or tracking_uri(TrackingConfig()))
    runs = evaluation_runs(client, args.experiment or [TrackingConfig().experiment])
    table = compare(runs)
    print(table.to_text(), end="")
    if args.csv:
        args.csv.write_text(table.to_csv())
    if args.markdown:
        args.markdown.write_text(table.to_markdown())
    if args.register:
        best, version = register_best(client, runs, name=args.register, alias=args.alias)
        print(f"registered run {best.info.run_id} (hIoU {best.data.metrics.get('hIoU', float('nan')):.2f}) "
              f"as {args.register} version {version.version}, alias '{args.alias}'")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrackingConfig
    from pipeline.report import build_report, check_table, load_runs, log_report, write_report
    from pipeline.tracking import tracking_uri

    check_table(args.table)
    uri = args.tracking_uri or tracking_uri(TrackingConfig())
    client = MlflowClient(uri)
    experiment = args.experiment or TrackingConfig().experiment
    runs, experiment_id = load_runs(client, experiment)
    report = build_report(runs, args.table, source=f"experiment {experiment!r}")
    files = write_report(report, args.out)
    print(report.to_markdown(), end="")
    if experiment_id is None:
        print(f"wrote {files[0]} and {files[1]}; no MLflow experiment {experiment!r}, so the report was not logged")
    else:
        run_id = log_report(client, experiment_id, args.table, files)
        print(f"wrote {files[0]} and {files[1]}; logged to MLflow run {run_id} (experiment {experiment!r})")
    return 0


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from pipeline.compare import fetch_registered_model
    from pipeline.config import TrackingConfig
    from pipeline.tracking import tracking_uri

    client = MlflowClient(args.tracking_uri or tracking_uri(TrackingConfig()))
    path = fetch_registered_model(client, args.name, args.out, alias=args.alias, version=args.version, overwrite=args.overwrite)
    print(f"wrote {path} ({args.name} {f'version {args.version}' if args.version else f'alias {args.alias!r}'}, sha256 checked)")
    return 0


def _cmd_queue(args: argparse.Namespace) -> int:
    from pipeline.experiments import ablation_tables, queue, table_experiments

    if args.table is None:
        for name, spec in ablation_tables().items():
            print(f"{name:<8} {len(spec['rows'])} runs  base={spec.get('base')}  {spec['description']}")
        return 0
    experiments = table_experiments(args.table, base=args.base)
    for experiment in experiments:
        print(shlex.join(["dvc", "exp", "run", "--queue", "--name", experiment.name, *experiment.set_args()]))
    if not args.dry_run:
        queue(experiments)
        print(f"queued {len(experiments)} experiments; run them with `dvc queue start` (then `cascade-clip compare`)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-clip", description="Cascade-CLIP zero-shot segmentation tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="list every parameter with its meaning, or check a params file")
    p.add_argument("--check", type=Path, metavar="FILE", help="validate FILE and report every problem")
    p.add_argument("--defaults", action="store_true", help="print a params.yaml with the defaults and comments")
    p.add_argument("--apply-preset", metavar="NAME", help="merge presets/NAME.yaml into --file in place: only the preset's keys change, comments stay")
    p.add_argument("--file", type=Path, default=Path("params.yaml"), help="params file for --apply-preset")
    p.set_defaults(func=_cmd_params)

    from typing import get_args

    from pipeline.config import Variant, model_preset_names

    presets = model_preset_names()  # "demo" and presets/*.yaml that define a model
    variants = list(get_args(Variant))  # the names of pipeline.model.VARIANTS (light: no torch import here)
    p = sub.add_parser("model-info", help="parameters, multiply-adds/FLOPs per image, stages and NGA weights of a preset")
    p.add_argument("--preset", choices=presets, default="coco")
    p.add_argument("--variant", choices=variants, default="cascade")
    p.add_argument("--image-size", type=int, default=512, help="input side in pixels")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_model_info)

    p = sub.add_parser("bench", help="benchmarks (measured by hand, never in tests)")
    bench = p.add_subparsers(dest="bench", required=True)
    # name, help, default variants, timed unit, default runs / warm-up
    for name, text, default_variants, unit, runs, warmup in (
        ("inference", "median latency of randomly initialised preset models, variants side by side",
         ["cascade", "zegclip"], "forward passes", 5, 2),
        ("train-step", "median time of one training step (forward, loss, backward, AdamW), fp32", ["cascade"], "steps", 3, 1),
    ):
        p = bench.add_parser(name, help=text)
        p.add_argument("--preset", choices=presets, default="coco")
        p.add_argument("--variant", nargs="+", choices=variants, default=default_variants)
        if name == "inference":
            p.add_argument("--amp", choices=["none", "fp16", "bf16"], default=None,
                           help="autocast to float16 or bfloat16 on the device (default: none, fp32)")
            p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="old name of --amp: fp32 is none")
        p.add_argument("--image-size", type=int, default=512, help="input side in pixels")
        p.add_argument("--runs", type=int, default=runs, help=f"timed {unit} per variant")
        p.add_argument("--warmup", type=int, default=warmup, help=f"untimed {unit} first")
        p.add_argument("--batch-size", type=int, default=1, help="images per forward pass or step")
        p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
        p.add_argument("--json", type=Path, default=None, metavar="FILE",
                       help="also write the result to FILE" if name == "train-step" else "write the result as JSON to FILE")
        p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("import-checkpoint", help="convert an authors' release checkpoint (mmseg .pth) to our model file")
    p.add_argument("src", type=Path, help="release checkpoint, e.g. iter_80000.pth")
    p.add_argument("out", type=Path, help="model file to write (.safetensors)")
    p.add_argument("--preset", choices=[x for x in presets if x != "demo"], required=True, help="model configuration of the checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="unpickle arbitrary objects (trusted files only; prints a warning)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    p.set_defaults(func=_cmd_import_checkpoint)

    p = sub.add_parser("compare", help="table of mIoU^S / mIoU^U / hIoU of evaluation runs in MLflow, best model registered")
    p.add_argument("--experiment", action="append", help="MLflow experiment (repeatable; default: cascade-clip)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--csv", type=Path, help="also write the table as CSV")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown")
    p.add_argument("--register", metavar="NAME", default=None, help="register the best run's model under NAME in the model registry")
    p.add_argument("--alias", default="best", help="alias given to the registered version")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("fetch-model", help="download a registered model's file, refused unless its sha256 is the one recorded when it was logged")
    p.add_argument("name", help="registered model name (as given to compare --register)")
    p.add_argument("--alias", default="best", help="version alias (default: best)")
    p.add_argument("--version", default=None, help="version number (instead of --alias)")
    p.add_argument("--out", type=Path, default=Path("model.safetensors"), help="file to write; then `cascade-clip predict --model FILE`")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.set_defaults(func=_cmd_fetch_model)

    p = sub.add_parser("report", help="the paper's tables (or an ablation table) filled from MLflow, beside the paper's numbers")
    p.add_argument("--table", default="paper", help="paper (Tables 2-3) or an ablation table of presets/ablations.yaml, e.g. table4")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: cascade-clip)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--out", type=Path, default=Path("reports"), help="folder for report.md and report.html")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("queue", help="queue a paper ablation table as DVC experiments (list the tables without TABLE)")
    p.add_argument("table", nargs="?", help="table name from presets/ablations.yaml, e.g. table8")
    p.add_argument("--base", default="table", help="base preset: the table's own (default), a preset name, or none (params.yaml as is)")
    p.add_argument("--dry-run", action="store_true", help="print the dvc commands without queueing")
    p.set_defaults(func=_cmd_queue)

    p = sub.add_parser("predict", help="segment images with any class names (open vocabulary)")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,dog,grass"')
    p.add_argument("--model", type=Path, default=None, help=f"model file (default: the first of {', '.join(DEFAULT_MODELS)} that exists)")
    p.add_argument("--out", type=Path, default=Path("predictions"),
                   help="output folder; images from a given folder keep their subfolders under it")
    p.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run (default: refuse)")
    p.add_argument("--backbone", type=Path, default=None,
                   help="the model's frozen CLIP backbone file or folder (default: where the model file says, checked by sha256)")
    p.add_argument("--templates", default=None, help="template set (single, paper15); default: the model's own")
    p.add_argument("--threshold", type=float, default=0.0, help="pixels whose best score is below this stay unlabelled (255)")
    p.add_argument("--scores", action="store_true", help="also write per-class score maps (<name>_scores.npy, float16 [C, H, W])")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="inference settings from this params file's evaluate section")
    p.add_argument("--mode", choices=["slide", "whole"], default=None, help="override evaluate.mode")
    p.add_argument("--crop", type=int, default=None, help="override evaluate.crop_size (sliding window)")
    p.add_argument("--stride", type=int, default=None, help="override evaluate.stride")
    p.add_argument("--short-side", type=int, default=None, help="override evaluate.short_side (test scale)")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    choose_openmp_wait()  # before any command imports torch
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CascadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
