"""Class text embeddings: the template recipe against a hand computation, the files, the stage."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import TextConfig, ToyClipConfig, render_params_yaml
from pipeline.data.catalog import get_dataset, template_set
from pipeline.data.prepared import ClassInfo
from pipeline.model.clip import create_clip, make_tokenizer, toy_arch
from pipeline.model.text_encoder import average_class_embeddings
from pipeline.text import (
    TEXT_SCHEMA,
    Templates,
    class_embeddings,
    resolve_templates,
    similarity,
    similarity_figure,
    write_text_embeddings,
)
from pipeline.tracking import TAG_STAGE
from pipeline.weights import save_backbone
from stages import embed_text
from stages.common import run_stage

TINY = dict(embed_dim=16, image_size=32, patch_size=8, width=32, layers=2, head_width=16,
            text_width=32, text_layers=1, text_heads=2, context_length=16)
CLASSES = ClassInfo.from_catalog(get_dataset("demo"), None)


def tiny_clip():
    torch.manual_seed(0)
    arch = toy_arch(ToyClipConfig(**TINY))
    return create_clip(arch).eval(), make_tokenizer(arch), arch


def test_average_of_normalised_templates_by_hand():
    # class 0: templates (3, 4) and (0, 2) -> (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> / sqrt(0.9)
    # class 1: templates (-5, 0) and (0, 0.5) -> (-1, 0) and (0, 1) -> mean (-0.5, 0.5) -> / sqrt(0.5)
    raw = torch.tensor([[[3.0, 4.0], [0.0, 2.0]], [[-5.0, 0.0], [0.0, 0.5]]])
    expected = torch.tensor([[0.3, 0.9], [-0.5, 0.5]])
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert torch.allclose(average_class_embeddings(raw), expected)


def test_class_embeddings_follow_the_recipe_prompt_by_prompt():
    model, tokenizer, _ = tiny_clip()
    names, templates = ["red circle", "blue star", "green square"], ["a photo of a {}.", "There is a {} in the scene."]
    result = class_embeddings(model, tokenizer, names, templates, batch_size=4)  # 6 prompts in two passes
    with torch.no_grad():
        expected = []
        for name in names:
            per_template = [F.normalize(model.encode_text(tokenizer([t.format(name)]))[0], dim=0) for t in templates]
            expected.append(F.normalize(torch.stack(per_template).mean(0), dim=0))
    assert torch.allclose(result.embeddings, torch.stack(expected), atol=1e-6)
    assert result.prompts.shape == (3, 2, 16) and result.prompt_norms.shape == (3, 2)
    assert torch.allclose(result.embeddings.norm(dim=1), torch.ones(3))
    single = class_embeddings(model, tokenizer, names, templates[:1]).embeddings
    assert torch.allclose(single, result.prompts[:, 0], atol=1e-6)


def test_templates_from_dataset_catalog_set_or_custom_list():
    assert resolve_templates(TextConfig(), CLASSES) == Templates("single", ("a photo of a {}.",))
    assert resolve_templates(TextConfig(templates="paper15"), CLASSES) == Templates("paper15", template_set("paper15"))
    custom = TextConfig(templates="custom", custom_templates=["a {} shape", "the {}"])
    assert resolve_templates(custom, CLASSES) == Templates("custom", ("a {} shape", "the {}"))


def test_written_embeddings_have_the_schema_shape_and_unit_norms(tmp_path):
    model, tokenizer, _ = tiny_clip()
    templates = Templates("paper15", template_set("paper15"))
    result = class_embeddings(model, tokenizer, CLASSES.names, templates.templates)
    write_text_embeddings(tmp_path, CLASSES, result, templates, per_template=True)

    table = pq.read_table(tmp_path / "embeddings.parquet")
    assert table.schema.equals(TEXT_SCHEMA)
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert table.column("class_name").to_pylist() == CLASSES.names
    assert table.column("class_id").to_pylist() == list(range(16))
    assert [i for i, s in enumerate(table.column("seen").to_pylist()) if not s] == CLASSES.unseen_ids
    npy = np.load(tmp_path / "embeddings.npy")
    assert npy.shape == (16, 16) and npy.dtype == np.float32
    assert np.allclose(np.linalg.norm(npy, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(np.array(table.column("embedding").to_pylist(), dtype=np.float32), npy)
    assert np.load(tmp_path / "per_template.npy").shape == (16, 15, 16)

    assert json.loads((tmp_path / "templates.json").read_text()) == {"name": templates.name, "templates": list(templates.templates)}


def test_similarity_figure_draws_small_and_large_class_sets():
    sim = similarity(np.eye(4) + 0.1)
    assert np.allclose(np.diag(sim), 1.0)
    small = similarity_figure(sim, ["a", "b", "c", "d"], unseen_ids=[1])
    assert [t.get_text() for t in small.axes[0].get_xticklabels()] == ["a", "b*", "c", "d"]
    large = similarity_figure(similarity(np.random.default_rng(0).normal(size=(80, 8))), [f"c{i}" for i in range(80)])
    assert large.axes[0].get_xticklabels() == [] or len(large.axes[0].get_xticks()) != 80


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_uri, prefect_harness):
    """A temp project with a prepared classes.json and a tiny backbone, as the earlier stages leave them."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = yaml.safe_load(render_params_yaml())
    params["clip"]["toy"].update(TINY)
    params["model"]["stages"] = [[1, 1], [2, 2]]
    params["text"]["templates"] = "paper15"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/classes.json").write_text(CLASSES.to_json())
    (tmp_path / "artifacts/backbone").mkdir(parents=True)
    model, _, arch = tiny_clip()
    save_backbone(tmp_path / "artifacts/backbone", arch, model, source="toy")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_writes_embeddings_heatmap_and_a_run(project, mlflow_uri):
    assert run_stage(embed_text.NAME, embed_text.main, embed_text.SECTIONS, []) == 0
    out = project / "artifacts/text"
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.shape == (16, 16) and json.loads((out / "templates.json").read_text())["name"] == "paper15"
    model, tokenizer, _ = tiny_clip()
    expected = class_embeddings(model, tokenizer, CLASSES.names, template_set("paper15")).embeddings
    assert np.allclose(embeddings, expected.numpy(), atol=1e-6)
    assert (out / "similarity.png").stat().st_size > 1000 and (out / "stage_params.yaml").exists()
    metrics = json.loads((project / embed_text.METRICS).read_text())
    assert metrics["classes"] == 16 and metrics["templates"] == 15

    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("cascade-clip").experiment_id],
                               filter_string=f"tags.`{TAG_STAGE}` = 'embed_text'")  # not its pipeline's parent run
    assert run.info.status == "FINISHED" and run.data.tags[TAG_STAGE] == "embed_text"
    assert run.data.tags["text.template_set"] == "paper15"
    assert run.data.params["text.templates"] == "paper15" and "clip.source" not in run.data.params
    assert run.data.metrics["templates"] == 15
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"similarity.png", "templates.json"} <= artifacts


def test_stage_without_a_backbone_fails_clearly(project, mlflow_uri, capsys):
    import shutil

    shutil.rmtree(project / "artifacts/backbone")
    assert run_stage(embed_text.NAME, embed_text.main, embed_text.SECTIONS, []) == 1
    err = capsys.readouterr().err
    assert "clip.json" in err and "dvc repro backbone" in err
    assert not (project / "artifacts/text").exists()
