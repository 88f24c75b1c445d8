import subprocess

import pytest

from pipeline.errors import CascadeError
from pipeline.experiments import ablation_tables, queue, table_experiments
from tests.project import copy_project, venv_env


@pytest.mark.parametrize("table", sorted(ablation_tables()))
def test_every_ablation_row_validates_on_its_base_preset(table):
    experiments = table_experiments(table)
    assert len(experiments) == len(ablation_tables()[table]["rows"]) >= 2
    assert all(e.name.startswith(f"{table}-") for e in experiments)


def test_rows_override_the_base_preset():
    [shared, independent] = table_experiments("table9")
    assert shared.overrides["model.shared_text_proj"] is True
    assert shared.overrides["model.prompt_tokens"] == 50  # from presets/coco.yaml
    assert ["-S", "model.shared_text_proj=true"] == shared.set_args()[-2:]
    assert ["-S", "model.stages=[[6, 8], [12, 12]]"] == table_experiments("table15")[1].set_args()[-2:]


def test_unknown_table_is_a_clear_error():
    with pytest.raises(CascadeError, match="unknown ablation table 'table99'; valid tables: table4"):
        table_experiments("table99")


@pytest.mark.slow
def test_queueing_a_table_creates_dvc_experiments(tmp_path, monkeypatch):
    repo = copy_project(tmp_path / "repo")
    monkeypatch.setenv("PATH", venv_env()["PATH"])
    experiments = table_experiments("table8", base="none")
    queue(experiments[:2], cwd=repo)
    shown = subprocess.run(["dvc", "queue", "status"], cwd=repo, capture_output=True, text=True).stdout
    queued = [row.split()[1] for row in shown.splitlines()[1:] if row.split()[-1:] == ["Queued"]]
    assert queued == ["table8-concat", "table8-self_attention"]
