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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-clip", description="Cascade-CLIP zero-shot segmentation tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="list every parameter with its meaning, or check a params file")
    p.add_argument("--check", type=Path, metavar="FILE", help="validate FILE and report every problem")
    p.add_argument("--defaults", action="store_true", help="print a params.yaml with the defaults and comments")
    p.set_defaults(func=_cmd_params)
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
