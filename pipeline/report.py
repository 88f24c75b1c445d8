"""`cascade-clip report`: the paper's tables filled from the evaluation runs in MLflow, each cell
beside the paper's number (pipeline/paper_results.yaml) with the difference; Markdown and HTML.

Runs come from `pipeline.compare.evaluation_runs` (finished `evaluate` runs). Per cell the run with
the best hIoU is taken (protocol-matching runs first); its name and id are shown, so a cell can be
traced back. Cross-dataset evaluations and ablation experiments never fill the paper table."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from pipeline.compare import evaluation_runs
from pipeline.errors import CascadeError
from pipeline.experiments import ablation_tables
from pipeline.io import atomic_file
from pipeline.tracking import TAG_DVC_EXP, TAG_GROUP, TAG_ROLE

PAPER_RESULTS = Path(__file__).with_name("paper_results.yaml")  # data, not a preset: presets/*.yaml are model presets
PAPER_TABLE = "paper"
REPORT_ROLE = "report"  # cascade.role of the report's own MLflow run
METRICS = ("mIoU_seen", "mIoU_unseen", "hIoU")
HEADERS = ("mIoU^S", "mIoU^U", "hIoU")
SETTINGS = {"inductive": "inductive", "self_train": "+ST"}  # metric prefix -> row label
PAPER_ST_MODE = "online"  # the paper's +ST numbers come from the release's online pseudo-labels
MISSING = "—"


@dataclass
class Section:
    heading: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)  # lines under the table (footnotes)


@dataclass
class Report:
    title: str
    header: list[str]  # lines above the tables
    sections: list[Section]

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", "", *self.header]
        for section in self.sections:
            lines += ["", f"## {section.heading}", "", "| " + " | ".join(section.columns) + " |",
                      "|" + "---|" * len(section.columns)]
            lines += ["| " + " | ".join(row) + " |" for row in section.rows]
            if section.notes:
                lines += ["", *section.notes]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        e = html.escape
        parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{e(self.title)}</title>",
                 "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
                 "td,th{border:1px solid #999;padding:2px 8px}</style>", "</head><body>", f"<h1>{e(self.title)}</h1>"]
        parts += [f"<p>{e(line)}</p>" for line in self.header if line]
        for section in self.sections:
            parts += [f"<h2>{e(section.heading)}</h2>", "<table>",
                      "<tr>" + "".join(f"<th>{e(c)}</th>" for c in section.columns) + "</tr>"]
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in section.rows]
            parts.append("</table>")
            parts += [f"<p>{e(line)}</p>" for line in section.notes if line]
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


def paper_results() -> dict:
    return yaml.safe_load(PAPER_RESULTS.read_text())


def table_names() -> list[str]:
    return [PAPER_TABLE, *ablation_tables()]


def check_table(table: str) -> None:
    valid = table_names()
    if table not in valid:
        raise CascadeError(f"unknown report table {table!r}; valid tables: {', '.join(valid)}")


def cell(ours: float | None, paper: float | None) -> str:
    """'ours (paper, diff)', or '— (paper)' without a run, or 'ours' without a paper number."""
    if ours is None:
        return MISSING if paper is None else f"{MISSING} ({paper:.1f})"
    if paper is None:
        return f"{ours:.1f}"
    shown = round(ours, 1)  # the difference of the numbers as shown, so the cell adds up
    return f"{shown:.1f} ({paper:.1f}, {shown - paper:+.1f})"


def run_label(run) -> str:
    """The run's pipeline execution (DVC experiment, else group: stage runs are all named by stage) and id."""
    name = run.data.tags.get(TAG_DVC_EXP) or run.data.tags.get(TAG_GROUP) or run.info.run_name or "run"
    return f"{name} ({run.info.run_id[:8]})"


def _is_set(value: str | None) -> bool:
    return value not in (None, "", "None", "null")


def _ablation_experiments() -> set[str]:
    return {f"{table}-{row}" for table, spec in ablation_tables().items() for row in spec["rows"]}


def _best(candidates: list[tuple], metric: str):
    """The (protocol matches, run, ...) with the best `metric` (ties: the latest run), runs
    matching the paper's protocol first; None without candidates."""
    return max(candidates, key=lambda c: (c[0], c[1].data.metrics[metric], c[1].info.start_time), default=None)


def paper_section(runs: list) -> tuple[Section, int]:
    """Tables 2-3's layout: datasets x (inductive, +ST). Returns the section and the number of runs used."""
    paper, ablation_runs = paper_results()["paper"], _ablation_experiments()
    eligible = [r for r in runs if not _is_set(r.data.params.get("evaluate.cross_dataset"))
                and r.data.params.get("model.variant", "cascade") == "cascade"
                and r.data.tags.get(TAG_DVC_EXP) not in ablation_runs]
    footnotes: list[str] = []
    rows, used = [], set()

    def mark(text: str) -> str:
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    for dataset, spec in paper.items():
        for setting, label in SETTINGS.items():
            candidates = []
            for run in (r for r in eligible if r.data.params.get("dataset.name") == dataset):
                if f"{setting}.hIoU" not in run.data.metrics:
                    continue
                flags = []
                split = run.data.tags.get("cascade.unseen_split", "")
                if split != spec["unseen_split"]:
                    flags.append(f"unseen split '{split or 'unknown'}', not the paper's '{spec['unseen_split']}'")
                mode = run.data.tags.get("cascade.self_train_mode", "")
                if setting == "self_train" and mode != PAPER_ST_MODE:
                    flags.append(f"{mode or 'unknown'} pseudo-labels; the paper's +ST used {PAPER_ST_MODE} ones")
                candidates.append((not flags, run, flags))
            best = _best(candidates, f"{setting}.hIoU")
            expected = spec[setting]
            if best is None:
                rows.append([spec["label"], label, *(cell(None, expected[m]) for m in METRICS), MISSING])
                continue
            _, run, flags = best
            used.add(run.info.run_id)
            marks = "".join(mark(f) for f in flags)
            metrics = run.data.metrics
            rows.append([spec["label"], label, *(cell(metrics.get(f"{setting}.{m}"), expected[m]) for m in METRICS),
                         run_label(run) + (f" {marks}" if marks else "")])
    notes = [f"[{i}] {text} (compared anyway; not the paper's protocol)." for i, text in enumerate(footnotes, 1)]
    sources = ", ".join(sorted({spec["source"].removeprefix("Table ") for spec in paper.values()}))
    heading = f"Cascade-CLIP, inductive and +ST (the paper's Tables {sources})"
    return Section(heading, ["dataset", "setting", *HEADERS, "run"], rows, notes), len(used)


def ablation_section(table: str, runs: list) -> tuple[Section, int]:
    """An ablation table of presets/ablations.yaml: one row per row, its runs named `<table>-<row>`
    (the DVC experiments `cascade-clip queue` makes); inductive scores, as the paper's ablations."""
    spec = ablation_tables()[table]
    paper = paper_results().get("ablations", {}).get(table)
    rows, used = [], 0
    for row in spec["rows"]:
        matching = [(True, r) for r in runs if r.data.tags.get(TAG_DVC_EXP) == f"{table}-{row}"
                    and "inductive.hIoU" in r.data.metrics]
        best = _best(matching, "inductive.hIoU")
        expected = (paper or {}).get(row, {})
        if best is None:
            rows.append([row, *(cell(None, expected.get(m)) for m in METRICS), MISSING])
            continue
        used += 1
        metrics = best[1].data.metrics
        rows.append([row, *(cell(metrics.get(f"inductive.{m}"), expected.get(m)) for m in METRICS), run_label(best[1])])
    notes = [] if paper else [f"The paper's numbers for {table} are not in {PAPER_RESULTS.name}: ours only."]
    return Section(f"{table}: {spec['description']} (inductive)", ["row", *HEADERS, "run"], rows, notes), used


def build_report(runs: list, table: str = PAPER_TABLE, *, source: str = "") -> Report:
    """The report of one table (`paper` or an ablation table's name) from evaluation runs."""
    check_table(table)
    section, used = paper_section(runs) if table == PAPER_TABLE else ablation_section(table, runs)
    header = [f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {source or 'MLflow'}: "
              f"{len(runs)} finished evaluation runs, {used} used in this table.",
              f"Each cell: ours (paper, ours - paper), in percent; {MISSING} (paper) where no run exists. "
              "Per cell, the run with the best hIoU is shown (runs with the paper's protocol first)."]
    if not runs:
        header.insert(0, "No finished evaluation runs were found: every cell shows the paper's number only.")
    return Report(title=f"Cascade-CLIP results vs the paper ({table})", header=header, sections=[section])


def load_runs(client, experiment: str) -> tuple[list, str | None]:
    """Finished evaluation runs of `experiment` and its id; ([], None) when the experiment does not exist."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [], None
    try:
        return evaluation_runs(client, [experiment]), found.experiment_id
    except CascadeError:  # the experiment exists, so: no finished evaluate runs in it
        return [], found.experiment_id


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    paths = (Path(out) / "report.md", Path(out) / "report.html")
    for path, text in zip(paths, (report.to_markdown(), report.to_html())):
        with atomic_file(path, "w") as handle:
            handle.write(text)
    return paths


def log_report(client, experiment_id: str, table: str, files: tuple[Path, ...]) -> str:
    """An MLflow run of its own (cascade.role=report) holding the report files; returns its id."""
    run = client.create_run(experiment_id, run_name=f"report {table}", tags={TAG_ROLE: REPORT_ROLE, "cascade.report_table": table})
    try:
        for path in files:
            client.log_artifact(run.info.run_id, str(path), "report")
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
