"""Presets and ablation tables as DVC experiments (`cascade-clip queue`, the pipeline flow), and
presets merged into a params file (`cascade-clip params --apply-preset`)."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken
from ruamel.yaml.util import load_yaml_guess_indent

from pipeline.config import ABLATIONS_FILE, DEFAULT_PARAMS, PRESETS_DIR, ParamsError, load_params, preset_path, validate_params
from pipeline.errors import CascadeError
from pipeline.io import atomic_file
from pipeline.tracking import flatten

ABLATIONS = PRESETS_DIR / ABLATIONS_FILE


@dataclass(frozen=True)
class Experiment:
    name: str
    overrides: dict[str, Any]  # dotted key -> value, base preset included

    def set_args(self) -> list[str]:
        """`-S key=value` arguments for `dvc exp run` (values in YAML flow style)."""
        args = []
        for key, value in self.overrides.items():
            args += ["-S", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
        return args


def preset_overrides(name: str | None) -> dict[str, Any]:
    """A preset file flattened to dotted keys ({} for None)."""
    if name is None:
        return {}
    return flatten(yaml.safe_load(preset_path(name).read_text()) or {})


def apply_preset(path: str | Path, name: str) -> list[str]:
    """Merge presets/NAME.yaml into the params file `path` in place; returns the dotted keys that changed.

    Only the preset's keys change: a value the file has is replaced on its own line (the line's
    comments stay), a key the file lacks is added at the end of its section; every other line, comment
    and blank line is kept (a round-trip YAML editor, ruamel.yaml). The merged params are validated
    first, the file is replaced atomically and keeps its permission bits.
    """
    path = Path(path)
    expected = load_params(path, preset=name)  # ParamsError, naming every problem, before anything is written
    text = path.read_text()
    _, sequence, offset = load_yaml_guess_indent(text)  # block lists' indent and dash offset
    nested = re.search(r"^( +)[^\s#-][^:]*:", text, re.MULTILINE)  # the first nested key sets the mapping indent
    editor = YAML()  # round trip: comments, key order, quotes and flow style survive
    editor.preserve_quotes = True
    editor.width = 1 << 16  # never re-wrap a long value
    editor.indent(mapping=len(nested.group(1)) if nested else 2, sequence=sequence or 2, offset=offset or 0)
    editor.representer.add_representer(type(None), _null)
    document = editor.load(text)
    changed = _merge(document, editor.load(preset_path(name).read_text()) or {})
    out = io.StringIO()
    editor.dump(document, out)
    if validate_params(yaml.safe_load(out.getvalue()) or {}, source=str(path)) != expected:
        raise CascadeError(f"{path}: merging preset {name} while keeping the file's layout gave other values than "
                           f"the preset; the file is unchanged. Write a fresh file with `cascade-clip params --defaults` "
                           f"and apply the preset to it")
    mode = stat.S_IMODE(path.stat().st_mode)
    with atomic_file(path, "w") as handle:
        os.fchmod(handle.fileno(), mode)  # the temporary file is 0600; the user's file keeps its own mode
        handle.write(out.getvalue())
    return changed


def _null(representer: Any, _: None) -> Any:
    """null written as `null`, as params files spell it (ruamel.yaml leaves the value empty)."""
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _merge(node: CommentedMap, update: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Set `update`'s leaves into the round-trip mapping `node`; the dotted keys whose value changed."""
    changed, appended, trailing = [], False, None
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(node.get(key), Mapping):
            changed += _merge(node[key], value, f"{prefix}{key}.")
            continue
        if key not in node and not appended:
            appended, trailing = True, _trailing_comment(node)  # as it is before the first key added here
        if key not in node or node[key] != value:
            node[key] = value
            changed.append(f"{prefix}{key}")
    if trailing is not None:
        _move_below_last_entry(node, trailing)
    return changed


def _trailing_comment(node: Any) -> CommentToken | None:
    """The comment token ruamel.yaml keeps on a mapping's last entry: its line's comment and any comment
    and blank lines after it (often the heading of the next section)."""
    if not isinstance(node, CommentedMap) or not node:
        return None
    last = next(reversed(node))
    entry = node.ca.items.get(last)
    return entry[2] if entry and entry[2] is not None else _trailing_comment(node[last])


def _move_below_last_entry(node: CommentedMap, token: CommentToken) -> None:
    """Keys were appended to `node` after the entry `token` belongs to: keep the token's own line's comment
    there and move the lines after it below the new last entry, so they stay above what follows."""
    inline, _, after = token.value.partition("\n")
    if not after:
        return  # nothing below the entry's own line
    token.value = inline + "\n" if inline.strip() else "\n"
    while isinstance(node[last := next(reversed(node))], CommentedMap) and node[last]:
        node = node[last]
    node.ca.items.setdefault(last, [None, None, None, None])[2] = CommentToken("\n" + after, CommentMark(0), None)


def ablation_tables() -> dict[str, dict]:
    return yaml.safe_load(ABLATIONS.read_text())


def table_experiments(table: str, *, base: str | None = "table", params: Path = DEFAULT_PARAMS) -> list[Experiment]:
    """The experiments of an ablation table, each validated against the params schema first."""
    tables = ablation_tables()
    if table not in tables:
        raise CascadeError(f"unknown ablation table {table!r}; valid tables: {', '.join(tables)}")
    spec = tables[table]
    base_name = spec.get("base") if base == "table" else (None if base in (None, "none") else base)
    common = preset_overrides(base_name)
    experiments = []
    for row, overrides in spec["rows"].items():
        merged = {**common, **(overrides or {})}
        try:
            load_params(params, overrides=merged)
        except ParamsError as exc:
            raise CascadeError(f"{ABLATIONS}: {table}.rows.{row} does not validate: {exc}") from None
        experiments.append(Experiment(name=f"{table}-{row}", overrides=merged))
    return experiments


def dvc(args: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CascadeError(f"`dvc {' '.join(args)}` failed:\n{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def queue(experiments: list[Experiment], cwd: Path | None = None) -> list[str]:
    """`dvc exp run --queue` each experiment; `dvc queue start` then runs them."""
    for experiment in experiments:
        dvc(["exp", "run", "--queue", "--name", experiment.name, *experiment.set_args()], cwd)
    return [e.name for e in experiments]
