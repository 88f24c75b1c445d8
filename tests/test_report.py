import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.errors import CascadeError
from pipeline.report import REPORT_ROLE, build_report, load_runs
from pipeline.tracking import TAG_DVC_EXP, TAG_GROUP, TAG_ROLE, TAG_STAGE, ensure_experiment


def log_evaluation(client, experiment_id, *, dataset, scores, st_mode="online", split="paper", params=None, tags=None, name="evaluate"):
    """An evaluation run as stages/evaluate.py logs it: every param section, protocol tags,
    `<setting>.<metric>` per scored setting and the final (self_train) metrics unprefixed."""
    run = client.create_run(experiment_id, run_name=name, tags={
        TAG_STAGE: "evaluate", TAG_GROUP: f"g-{dataset}-{st_mode}", "cascade.final_setting": "self_train",
        "cascade.self_train_mode": st_mode, "cascade.unseen_split": split, **(tags or {})})
    run_id = run.info.run_id
    for key, value in {"dataset.name": dataset, "dataset.unseen_split": "None", "evaluate.cross_dataset": "None",
                       "model.variant": "cascade", **(params or {})}.items():
        client.log_param(run_id, key, value)
    for setting, (seen, unseen, h) in scores.items():
        for metric, value in (("mIoU_seen", seen), ("mIoU_unseen", unseen), ("hIoU", h)):
            client.log_metric(run_id, f"{setting}.{metric}", value)
            if setting == "self_train":
                client.log_metric(run_id, metric, value)
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables and nothing else, made once (the schema takes seconds)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def client(tmp_path, mlflow_uri, empty_store):
    shutil.copy(empty_store, tmp_path / "mlflow.db")  # mlflow_uri's file
    return MlflowClient(mlflow_uri)


@pytest.fixture
def experiment_id(client, tmp_path, mlflow_uri):
    return ensure_experiment(client, "cascade-clip", tmp_path, mlflow_uri)


def rows(report) -> dict[tuple[str, str], list[str]]:
    return {(row[0], row[1]): row[2:] for row in report.sections[0].rows}


def test_paper_table_fills_matching_cells_with_differences_and_footnotes_offline_self_training(client, experiment_id, tmp_path, mlflow_uri, capsys):
    voc = log_evaluation(client, experiment_id, dataset="voc12", st_mode="online",
                         scores={"inductive": (92.0, 80.0, 85.58), "self_train": (93.0, 94.0, 93.5)})
    coco = log_evaluation(client, experiment_id, dataset="coco_stuff164k", st_mode="offline",
                          scores={"inductive": (41.5, 42.0, 41.75), "self_train": (41.0, 60.0, 48.71)})
    log_evaluation(client, experiment_id, dataset="coco_stuff164k", scores={"inductive": (1.0, 1.0, 1.0)},
                   params={"evaluate.cross_dataset": "voc12"})  # cross-dataset: never in the paper table
    log_evaluation(client, experiment_id, dataset="coco_stuff164k", scores={"inductive": (50.0, 50.0, 50.0)},
                   params={"model.variant": "zegclip"}, tags={TAG_DVC_EXP: "table4-baseline_zegclip"})
    runs, _ = load_runs(client, "cascade-clip")
    table = rows(build_report(runs))

    assert table[("PASCAL VOC 2012", "inductive")][:3] == ["92.0 (92.7, -0.7)", "80.0 (83.1, -3.1)", "85.6 (87.7, -2.1)"]
    assert table[("PASCAL VOC 2012", "+ST")][:3] == ["93.0 (93.3, -0.3)", "94.0 (93.4, +0.6)", "93.5 (93.4, +0.1)"]
    assert table[("PASCAL VOC 2012", "+ST")][3] == f"g-voc12-online ({voc[:8]})"  # no footnote: the paper's protocol
    assert table[("COCO-Stuff 164k", "inductive")] == ["41.5 (41.1, +0.4)", "42.0 (43.4, -1.4)", "41.8 (42.2, -0.4)", f"g-coco_stuff164k-offline ({coco[:8]})"]
    assert table[("COCO-Stuff 164k", "+ST")][2] == "48.7 (50.0, -1.3)"
    assert table[("COCO-Stuff 164k", "+ST")][3] == f"g-coco_stuff164k-offline ({coco[:8]}) [1]"
    assert table[("PASCAL Context-59", "inductive")] == ["— (55.9)", "— (47.2)", "— (51.2)", "—"]
    report = build_report(runs)
    assert report.sections[0].notes == ["[1] offline pseudo-labels; the paper's +ST used online ones "
                                        "(compared anyway; not the paper's protocol)."]

    out = tmp_path / "out"
    assert main(["report", "--tracking-uri", mlflow_uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    print(printed)  # shown with `pytest -s`
    assert (out / "report.md").read_text() in printed and "| PASCAL VOC 2012 | +ST | 93.0 (93.3, -0.3) |" in printed
    assert "<td>93.0 (93.3, -0.3)</td>" in (out / "report.html").read_text()
    [logged] = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_ROLE}` = '{REPORT_ROLE}'")
    assert logged.info.status == "FINISHED" and logged.info.run_id in printed
    assert sorted(a.path for a in client.list_artifacts(logged.info.run_id, "report")) == ["report/report.html", "report/report.md"]


def test_context_on_the_release_split_is_footnoted_and_the_paper_split_preferred(client, experiment_id):
    log_evaluation(client, experiment_id, dataset="context59", split="release",
                   scores={"inductive": (60.0, 60.0, 60.0), "self_train": (60.0, 60.0, 60.0)})
    runs, _ = load_runs(client, "cascade-clip")
    report = build_report(runs)
    assert rows(report)[("PASCAL Context-59", "inductive")][3].endswith("[1]")
    assert "unseen split 'release', not the paper's 'paper'" in report.sections[0].notes[0]
    paper_split = log_evaluation(client, experiment_id, dataset="context59", scores={"inductive": (50.0, 40.0, 44.4)})
    runs, _ = load_runs(client, "cascade-clip")
    assert rows(build_report(runs))[("PASCAL Context-59", "inductive")][3] == f"g-context59-online ({paper_split[:8]})"


def test_ablation_table_uses_the_queued_experiments_inductive_scores(client, experiment_id):
    log_evaluation(client, experiment_id, dataset="coco_stuff164k", tags={TAG_DVC_EXP: "table4-cascade_without_nga"},
                   scores={"inductive": (40.0, 42.0, 40.98), "self_train": (45.0, 60.0, 51.4)})
    runs, _ = load_runs(client, "cascade-clip")
    section = build_report(runs, "table4").sections[0]
    table = {row[0]: row[1:] for row in section.rows}
    assert table["cascade_without_nga"][:3] == ["40.0 (40.8, -0.8)", "42.0 (42.6, -0.6)", "41.0 (41.7, -0.7)"]
    assert table["baseline_zegclip"] == ["— (40.1)", "— (39.5)", "— (39.8)", "—"]
    assert build_report(runs, "table16").sections[0].notes == ["The paper's numbers for table16 are not in paper_results.yaml: ours only."]


def test_unknown_table_is_a_clear_error_listing_the_valid_ones(mlflow_uri, tmp_path, capsys):
    with pytest.raises(CascadeError, match="unknown report table 'table99'; valid tables: paper, table4, .*table8"):
        build_report([], "table99")
    assert main(["report", "--table", "table99", "--tracking-uri", mlflow_uri, "--out", str(tmp_path)]) == 2
    assert "valid tables: paper, table4" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "mlflow.db").exists()  # refused before any store is opened


def test_an_empty_store_gives_a_report_saying_no_runs_were_found(client, experiment_id, mlflow_uri, tmp_path, capsys, empty_store):
    assert main(["report", "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "a")]) == 0
    assert "No finished evaluation runs were found" in capsys.readouterr().out
    assert "| PASCAL VOC 2012 | inductive | — (92.7) |" in (tmp_path / "a" / "report.md").read_text()
    shutil.copy(empty_store, tmp_path / "fresh.db")
    other = f"sqlite:///{tmp_path / 'fresh.db'}"  # no experiment at all: written, not logged
    assert main(["report", "--tracking-uri", other, "--out", str(tmp_path / "b")]) == 0
    assert "so the report was not logged" in capsys.readouterr().out and Path(tmp_path / "b" / "report.html").is_file()


def test_the_flow_reports_from_the_store_its_params_name_and_never_fails_for_it(client, experiment_id, mlflow_uri, tmp_path, capsys):
    from stages.pipeline_flow import report_markdown

    log_evaluation(client, experiment_id, dataset="voc12", scores={"inductive": (92.0, 80.0, 85.58)})
    (tmp_path / "params.yaml").write_text(f"tracking:\n  tracking_uri: {mlflow_uri}\n")
    assert "| PASCAL VOC 2012 | inductive | 92.0 (92.7, -0.7) |" in report_markdown(str(tmp_path))
    assert not client.search_runs([experiment_id], filter_string=f"tags.`{TAG_ROLE}` = '{REPORT_ROLE}'")  # read only
    (tmp_path / "params.yaml").write_text("tracking:\n  no_such_key: 1\n")
    assert report_markdown(str(tmp_path)) is None
    assert "no results report artifact: ParamsError" in capsys.readouterr().out


def test_the_paper_numbers_name_real_ablation_rows_and_catalog_datasets_and_their_hiou_adds_up():
    from pipeline.data.catalog import get_dataset
    from pipeline.experiments import ablation_tables
    from pipeline.report import paper_results

    data, tables = paper_results(), ablation_tables()
    for table, rows in data["ablations"].items():
        assert set(rows) <= set(tables[table]["rows"]), table
    entries = [*(data["paper"][d][s] for d in data["paper"] for s in ("inductive", "self_train")),
               *(row for rows in data["ablations"].values() for row in rows.values())]
    for values in entries:  # hIoU = 2SU/(S+U), to the paper's rounding
        seen, unseen = values["mIoU_seen"], values["mIoU_unseen"]
        assert abs(2 * seen * unseen / (seen + unseen) - values["hIoU"]) < 0.11, values
    for dataset, spec in data["paper"].items():
        assert spec["unseen_split"] in get_dataset(dataset).unseen_splits, dataset
