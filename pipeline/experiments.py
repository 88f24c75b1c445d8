"""Presets and ablation tables as DVC experiments (`cascade-clip queue`, the pipeline flow)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import DEFAULT_PARAMS, PRESETS_DIR, ParamsError, load_params, preset_path
from pipeline.errors import CascadeError
from pipeline.tracking import flatten

ABLATIONS = PRESETS_DIR / "ablations.yaml"


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


def queued_names(cwd: Path | None = None) -> list[str]:
    """Names of the experiments waiting in DVC's queue (`dvc queue status`)."""
    lines = dvc(["queue", "status"], cwd).splitlines()
    return [parts[1] for parts in (line.split() for line in lines[1:]) if len(parts) >= 4 and parts[-1] == "Queued"]
