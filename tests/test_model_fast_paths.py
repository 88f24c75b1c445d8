"""The encoder's fast paths compute the same functions as the plain modules they replace."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock

from pipeline.model import SegOutput
from pipeline.model.frozen_linear import ONEDNN, frozen_linear
from pipeline.model.image_encoder import prompted_block
from tests.tiny import class_embeddings, images, tiny_model


def _frozen_block(act: type[torch.nn.Module], width: int = 32, heads: int = 4) -> ResidualAttentionBlock:
    torch.manual_seed(0)
    block = ResidualAttentionBlock(width, heads, act_layer=act)
    return block.requires_grad_(False)


@pytest.mark.parametrize("act", [QuickGELU, torch.nn.GELU])
@pytest.mark.parametrize("training", [False, True])
def test_prompted_block_is_the_block_on_tokens_and_prompts_cut_to_the_tokens(act, training, onednn_for_any_size):
    block = _frozen_block(act).train(training)
    x = torch.randn(3, 17, 32)
    prompts = torch.randn(3, 5, 32, requires_grad=True)
    reference = block(torch.cat([x, prompts], dim=1))[:, :17]
    ours = prompted_block(block, x, prompts)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(reference)
    (expected,) = torch.autograd.grad(reference, prompts, grad)
    (got,) = torch.autograd.grad(ours, prompts, grad)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prompted_block(block, x, None), block(x), rtol=1e-5, atol=1e-5)


def test_prompted_block_refuses_a_cross_attention_block():
    block = ResidualAttentionBlock(32, 4, is_cross_attention=True)
    with pytest.raises(ValueError, match="self-attention block"):
        prompted_block(block, torch.randn(1, 4, 32), None)


@pytest.fixture
def onednn_for_any_size(monkeypatch):
    """oneDNN's path (where torch has it) for the small tensors of these tests, whatever the CPU."""
    monkeypatch.setattr("pipeline.model.frozen_linear.MIN_MACS", 0)
    monkeypatch.setattr("pipeline.model.frozen_linear.MIN_WIDTH", 0)
    monkeypatch.setattr("pipeline.model.frozen_linear._use_onednn", ONEDNN)


@pytest.mark.parametrize("library", ["onednn", "torch"])
@pytest.mark.parametrize("scale", [1.0, 1.702])
def test_frozen_linear_matches_f_linear_with_its_gradient(scale, library, onednn_for_any_size):
    from pipeline.model.frozen_linear import onednn

    torch.manual_seed(1)
    weight, bias = torch.randn(24, 16), torch.randn(24)
    x = torch.randn(2, 7, 16, requires_grad=True)
    expected = scale * F.linear(x, weight) + bias
    with onednn(library == "onednn"):  # "torch": as wide layers on AVX2 CPUs (the scale inside the product)
        got = frozen_linear(x, weight, bias, scale=scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                               rtol=1e-5, atol=1e-5)
    # a transposed weight view, as the backward pass uses it
    torch.testing.assert_close(frozen_linear(x.detach(), weight.t().contiguous().t()), F.linear(x.detach(), weight),
                               rtol=1e-5, atol=1e-5)


def test_frozen_linear_leaves_trainable_weights_and_autocast_to_torch():
    weight = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(3, 4)
    out = frozen_linear(x, weight)
    out.sum().backward()  # a trainable weight gets its gradient (the plain path)
    torch.testing.assert_close(weight.grad, x.sum(0).expand(8, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen_linear(x, weight.detach()).dtype == torch.bfloat16


def _takes_onednn(call) -> bool:
    from torch.profiler import profile

    with profile() as prof:
        call()
    return any("mkldnn::_linear_pointwise" in e.key for e in prof.key_averages())


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_frozen_linear_takes_onednn_for_wide_enough_frozen_fp32_cpu_layers(monkeypatch):
    from pipeline.model.frozen_linear import MIN_MACS, MIN_WIDTH

    monkeypatch.setattr("pipeline.model.frozen_linear._use_onednn", True)  # as on an AVX-512 CPU
    weight, bias = torch.randn(MIN_WIDTH, MIN_WIDTH), torch.randn(MIN_WIDTH)
    rows = MIN_MACS // MIN_WIDTH**2
    assert _takes_onednn(lambda: frozen_linear(torch.randn(rows, MIN_WIDTH), weight, bias))
    assert not _takes_onednn(lambda: frozen_linear(torch.randn(rows - 1, MIN_WIDTH), weight, bias))  # too few rows
    # narrow layers (the demo's width 64) stay with MKL, however many rows
    assert not _takes_onednn(lambda: frozen_linear(torch.randn(1 << 16, 64), torch.randn(MIN_WIDTH, 64)))
    assert not _takes_onednn(lambda: frozen_linear(torch.randn(1 << 16, MIN_WIDTH), torch.randn(64, MIN_WIDTH)))


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_a_trainable_layer_takes_onednn_under_no_grad_only(onednn_for_any_size):
    from pipeline.model.frozen_linear import linear

    torch.manual_seed(2)
    layer, x = torch.nn.Linear(16, 24), torch.randn(2, 7, 16)
    with torch.no_grad():
        assert _takes_onednn(lambda: linear(layer, x))
        torch.testing.assert_close(linear(layer, x), layer(x), rtol=1e-5, atol=1e-5)
    assert not _takes_onednn(lambda: linear(layer, x))  # its weights need a gradient: torch's own
    linear(layer, x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum((0, 1)).expand(24, 16), rtol=1e-5, atol=1e-5)


def test_inference_scores_without_logits_equal_the_scores_of_the_logits():
    model = tiny_model().eval()
    x, t = images(2, 32), class_embeddings(4)
    seen = torch.tensor([True, False, True, False])
    with torch.no_grad():
        lazy = model(x, t).scores(0.1, seen)  # M never read: computed in place
        out = model(x, t)
        logits = out.logits.clone()
        eager = out.scores(0.1, seen)
    expected = logits.sigmoid() - 0.1 * seen.float().reshape(1, -1, 1, 1)
    torch.testing.assert_close(lazy, expected)
    torch.testing.assert_close(eager, expected)
    assert torch.equal(out.logits, logits)  # scores of a read M leave M alone


def test_scores_stay_differentiable():
    model = tiny_model().train()
    scores = model(images(1, 32), class_embeddings(4)).scores(0.1, torch.tensor([True, False, True, False]))
    scores.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())


def test_an_output_needs_logits_or_a_size():
    with pytest.raises(ValueError, match="input size"):
        SegOutput(layer_logits=[])


def test_frozen_linear_can_be_held_to_plain_torch():
    from torch.profiler import profile

    from pipeline.model.frozen_linear import onednn

    with onednn(False), profile() as prof:
        frozen_linear(torch.randn(1 << 16, 64), torch.randn(64, 64), torch.randn(64))
    assert not any("mkldnn" in e.key for e in prof.key_averages())


def test_the_cpu_library_is_onednn_on_avx512_and_torch_elsewhere_unless_chosen():
    from pipeline.model.frozen_linear import preferred_library

    assert preferred_library("AVX512", None) == "onednn"
    assert preferred_library("AVX2", None) == "torch"
    assert preferred_library("DEFAULT", "auto") == "torch"
    assert preferred_library("AVX2", "oneDNN") == "onednn"
    assert preferred_library("AVX512", "torch") == "torch"
    with pytest.raises(ValueError, match=r"CASCADE_CLIP_LINEAR='mkl': expected auto, onednn or torch"):
        preferred_library("AVX2", "mkl")


@pytest.mark.parametrize("choice", ["onednn", "torch"])
def test_the_environment_variable_chooses_the_cpu_library(choice, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("CASCADE_CLIP_LINEAR", choice)
    code = "import pipeline.model.frozen_linear as f; print(f.CPU_LIBRARY, f._use_onednn == f.ONEDNN)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [choice, str(choice == "onednn")]


def test_a_bad_library_choice_fails_the_first_linear_layer_with_a_message_not_the_import(monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("CASCADE_CLIP_LINEAR", "mkl")
    code = ("import torch; from pipeline.errors import CascadeError; from pipeline.model import frozen_linear as f\n"
            "try:\n    f.frozen_linear(torch.randn(2, 4), torch.randn(3, 4))\n"
            "except CascadeError as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("CASCADE_CLIP_LINEAR='mkl': expected auto, onednn or torch (unset it")
