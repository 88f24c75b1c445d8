import pytest
import yaml

from pipeline.config import (
    Params,
    ParamsError,
    describe_fields,
    load_params,
    params_hash,
    render_params_yaml,
    validate_params,
)
from tests.conftest import REPO


def test_repo_params_yaml_is_valid_and_covers_every_section():
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in ("dataset", "clip", "text", "model", "loss", "train", "pseudo", "self_train", "evaluate", "tracking"):
        assert section in raw, section
    assert params.dataset.name == "demo"


def test_unknown_key_names_path_and_valid_keys():
    with pytest.raises(ParamsError) as info:
        validate_params({"train": {"iteration": 5}})
    message = str(info.value)
    assert "train.iteration: unknown key" in message
    assert "iterations" in message and "batch_size" in message


def test_unknown_top_level_section_is_rejected():
    with pytest.raises(ParamsError, match=r"trian: unknown key; valid keys here: seed, dataset"):
        validate_params({"trian": {}})


def test_wrong_type_names_path_and_value():
    with pytest.raises(ParamsError) as info:
        validate_params({"train": {"batch_size": "eight"}})
    assert "train.batch_size" in str(info.value)
    assert "'eight'" in str(info.value)


def test_invalid_choice_lists_valid_choices():
    with pytest.raises(ParamsError) as info:
        validate_params({"model": {"variant": "cascad"}})
    message = str(info.value)
    assert "model.variant: invalid value 'cascad'" in message
    assert "'cascade'" in message and "'zegclip'" in message and "'fusion'" in message


def test_out_of_range_value_is_rejected():
    with pytest.raises(ParamsError, match=r"pseudo.threshold"):
        validate_params({"pseudo": {"threshold": 1.5}})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ParamsError) as info:
        validate_params({"train": {"iteration": 5, "lr": "fast"}, "model": {"variant": "x"}})
    assert "(3 problems)" in str(info.value)


def test_stage_split_outside_encoder_depth_is_rejected():
    with pytest.raises(ParamsError) as info:
        validate_params({"model": {"stages": [[6, 8], [9, 13]]}})
    assert "model.stages" in str(info.value)
    assert "encoder depth (12 blocks)" in str(info.value)


def test_overlapping_stages_are_rejected():
    with pytest.raises(ParamsError, match="overlaps"):
        validate_params({"model": {"stages": [[6, 9], [9, 11]]}})


def test_custom_templates_need_a_placeholder():
    with pytest.raises(ParamsError, match=r"exactly one '\{\}'"):
        validate_params({"text": {"templates": "custom", "custom_templates": ["a photo"]}})


def test_every_field_has_a_one_line_description():
    rows = describe_fields()
    assert len(rows) > 60
    for key, _, doc in rows:
        assert doc and "\n" not in doc, key


def test_rendered_defaults_round_trip(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(render_params_yaml())
    assert load_params(path) == Params()


def test_overrides_and_hash():
    params = load_params(REPO / "params.yaml", overrides={"train.iterations": 7})
    assert params.train.iterations == 7
    a = params.section_dict("train")
    assert params_hash(a) == params_hash(dict(reversed(list(a.items()))))
    assert params_hash(a) != params_hash(load_params(REPO / "params.yaml").section_dict("train"))


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(ParamsError, match="--params"):
        load_params(tmp_path / "nope.yaml")
