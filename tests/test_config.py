import re

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
from tests.project import REPO


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


@pytest.mark.parametrize("url", ["file:///tmp/ViT-B-16.pt", "ftp://example.org/ViT-B-16.pt", "openaipublic.azureedge.net/x.pt",
                                 "https:///no-host.pt"])
def test_clip_url_must_be_http_or_https(url):
    with pytest.raises(ParamsError) as info:
        validate_params({"clip": {"source": "openai", "url": url}})
    message = str(info.value)
    assert "clip.url" in message and "http" in message and repr(url) in message
    assert Params.model_validate({"clip": {"url": "https://example.org/models/ViT-B-16.pt"}}).clip.url
    assert Params.model_validate({"clip": {"url": "http://127.0.0.1:8000/ViT-B-16.pt"}}).clip.url


def test_apply_preset_keeps_the_files_comments_layout_and_mode(tmp_path, capsys):
    from pipeline.cli import main

    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    text = text.replace("\nseed: 0\n", "\n# my note: seed 7 matches the lab notebook\nseed: 7  # keep\n")
    text = text.replace("  iterations: 600\n", "  iterations: 600  # the preset changes this\n", 1)
    path.write_text(text)
    path.chmod(0o640)
    expected = load_params(path, preset="voc12")
    assert main(["params", "--apply-preset", "voc12", "--file", str(path)]) == 0
    after = path.read_text()
    assert "# my note: seed 7 matches the lab notebook\nseed: 7  # keep\n" in after
    assert re.search(r"\n  iterations: 20000 +# the preset changes this\n", after)  # the comment stays on its line
    assert "  # where CLIP weights come from" in after  # the file's own comments, not regenerated ones
    changed = [line for line in after.splitlines() if line not in text.splitlines()]
    assert changed and all(":" in line and not line.lstrip().startswith("#") for line in changed)
    assert len(after.splitlines()) == len(text.splitlines())  # only the preset's keys' lines changed
    assert load_params(path) == expected
    assert path.stat().st_mode & 0o777 == 0o640
    assert "voc12 applied" in capsys.readouterr().out


def test_apply_preset_adds_keys_the_file_lacks(tmp_path):
    from pipeline.cli import main

    path = tmp_path / "short.yaml"
    path.write_text("# a short params file\nseed: 3\ntrain:\n  # fewer steps\n  iterations: 5\n")
    expected = load_params(path, preset="voc12")
    assert main(["params", "--apply-preset", "voc12", "--file", str(path)]) == 0
    after = path.read_text()
    assert after.startswith("# a short params file\nseed: 3\ntrain:\n  # fewer steps\n  iterations: 20000\n")
    assert load_params(path) == expected
