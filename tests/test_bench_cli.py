import json

import pytest
import torch

from pipeline.cli import main

TINY = ["--preset", "demo", "--image-size", "64", "--runs", "1", "--warmup", "0", "--threads", "1"]


def test_bench_inference_prints_fps_beside_the_papers_table_12_and_writes_the_json(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    assert main(["bench", "inference", *TINY, "--amp", "bf16", "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "AMP bf16" in out and "FPS (images/s)" in out and "median latency" in out
    assert "Table 12" in out and "Cascade-CLIP 18.4 FPS, ZegCLIP 20.9 FPS" in out and "RTX 3090" in out
    result = json.loads(out_file.read_text())
    assert result["amp"] == "bf16" and result["device"] == "cpu" and result["device_name"] in out
    assert result["torch_version"] == torch.__version__ and result["torch_threads"] == 1
    assert set(result["variants"]) == {"cascade", "zegclip"}
    for name, row in result["variants"].items():
        assert row["fps"] == row["images_per_s"] == pytest.approx(1 / row["median_latency_s"], rel=0.01)
        assert "peak_gpu_mem_mb" not in row  # CUDA only
        assert f"{row['fps']:.2f}" in next(line for line in out.splitlines() if line.startswith(name))


def test_bench_inference_keeps_dtype_as_the_old_name_of_amp(capsys):
    assert main(["bench", "inference", *TINY, "--variant", "zegclip", "--dtype", "bf16"]) == 0
    assert "AMP bf16" in capsys.readouterr().out
    assert main(["bench", "inference", *TINY, "--dtype", "fp32", "--amp", "fp16"]) == 2
    assert "--amp fp16 and --dtype fp32 disagree" in capsys.readouterr().err


@pytest.mark.parametrize("bench", ["inference", "train-step"])
def test_bench_on_cuda_without_a_gpu_is_a_one_line_error(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this project's machines, also on a GPU host
    assert main(["bench", bench, *TINY, "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert "--device cuda: CUDA is not available" in captured.err and "--device cpu" in captured.err


def test_bench_names_the_cpu_it_ran_on():
    from pipeline.model.tools import _device_name

    name = _device_name(torch.device("cpu"))
    assert name and "\n" not in name


def test_bench_refuses_a_missing_gpu_index_and_bf16_on_a_gpu_without_it(monkeypatch):
    from pipeline.model.tools import DeviceError, _check_device

    for name, value in {"is_available": True, "device_count": 1, "current_device": 0, "is_bf16_supported": False,
                        "get_device_name": "Tesla V100"}.items():
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value: value)
    assert _check_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="cuda:0 to cuda:0"):
        _check_device("cuda:1")
    with pytest.raises(DeviceError, match="Tesla V100 has no bfloat16; use --amp fp16"):
        _check_device("cuda", "bf16")


def test_bench_inference_on_cuda_prints_the_gpu_and_its_peak_memory(capsys):
    from pipeline.cli import _print_bench_inference

    row = {"median_latency_s": 0.05435, "fps": 18.4, "images_per_s": 18.4, "peak_rss_mb": 2900.0, "peak_gpu_mem_mb": 1234.5}
    _print_bench_inference({"preset": "coco", "image_size": 512, "batch_size": 1, "amp": "fp16", "torch_version": "2.x",
                            "device": "cuda:0", "device_name": "NVIDIA GeForce RTX 3090", "torch_threads": 16,
                            "variants": {"cascade": row}, "paper_table12": {"gpu": "RTX 3090", "batch_size": 1,
                                                                            "fps": {"cascade": 18.4}}})
    out = capsys.readouterr().out
    assert "device: cuda:0 (NVIDIA GeForce RTX 3090)\n" in out  # no CPU threads
    assert "peak GPU memory" in out and "1,234 MB" in out and "54.35 ms" in out and "18.40" in out
