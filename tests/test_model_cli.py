import json

from pipeline.cli import main


def test_model_info_command_prints_json(capsys):
    assert main(["model-info", "--preset", "demo", "--image-size", "96", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "demo" and info["params_trainable"] > 0


def test_import_release_command_reports_a_missing_file(tmp_path, capsys):
    assert main(["import-checkpoint", str(tmp_path / "none.pth"), str(tmp_path / "out.safetensors"), "--preset", "coco"]) == 2
    assert "release checkpoint not found" in capsys.readouterr().err


def test_model_info_table_lists_the_trainable_count(capsys):
    assert main(["model-info", "--preset", "coco"]) == 0
    out = capsys.readouterr().out
    assert "23,117,574" in out


def test_import_checkpoint_refuses_to_overwrite_out_without_overwrite(tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier import")
    argv = ["import-checkpoint", str(tmp_path / "iter_80000.pth"), str(out), "--preset", "coco"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "release checkpoint not found" not in err
    assert out.read_bytes() == b"an earlier import"
    assert main([*argv, "--overwrite"]) == 2  # past the check: now the missing source is reported
    assert "release checkpoint not found" in capsys.readouterr().err
