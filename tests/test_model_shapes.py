import pytest
import torch

from pipeline.model import VARIANTS, SegOutput
from tests.tiny import class_embeddings, images, tiny_model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_returns_input_size_logits_and_per_layer_masks(variant):
    model = tiny_model(variant=variant).eval()
    out = model(images(2, 32), class_embeddings(5))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 5, 32, 32)
    expected_stages = {"cascade": 3, "frozen": 3, "zegclip": 1, "fusion": 1, "multi_decoder_last": 3, "multi_decoder_fusion": 3}[variant]
    assert len(out.layer_logits) == expected_stages
    for layers in out.layer_logits:
        assert len(layers) == 3
        assert all(m.shape == (2, 5, 4, 4) for m in layers)
    assert len(out.stage_logits) == expected_stages


def test_variant_stage_splits():
    assert tiny_model(variant="zegclip").stages == [(12, 12)]
    assert tiny_model(variant="fusion").stages == [(6, 12)]
    assert tiny_model(variant="cascade", stages=[(4, 5), (10, 12)]).stages == [(4, 5), (10, 12)]
    assert tiny_model(variant="frozen").encoder.prompts is None
    assert tiny_model(variant="cascade").encoder.prompts is not None


@pytest.mark.parametrize("aggregator", ["nga", "sum", "trainable_sum", "concat", "attention"])
def test_every_aggregator_gives_the_same_shapes(aggregator):
    model = tiny_model(aggregator=aggregator).eval()
    out = model(images(1, 32), class_embeddings(3))
    assert out.logits.shape == (1, 3, 32, 32)
    assert [len(layers) for layers in out.layer_logits] == [3, 3, 3]


def test_any_class_set_at_call_time_and_non_square_inputs():
    model = tiny_model().eval()
    assert model(images(1, 32), class_embeddings(2)).logits.shape == (1, 2, 32, 32)
    assert model(images(1, 32), class_embeddings(9)).logits.shape == (1, 9, 32, 32)
    out = model(torch.randn(1, 3, 40, 24), class_embeddings(4))
    assert out.logits.shape == (1, 4, 40, 24)
    assert out.layer_logits[0][0].shape == (1, 4, 5, 3)


def test_one_layer_decoders_and_shared_text_projection():
    model = tiny_model(decoder_layers=1, shared_text_proj=True).eval()
    assert len(model.head.text_projs) == 1
    out = model(images(1, 32), class_embeddings(3))
    assert [len(layers) for layers in out.layer_logits] == [1, 1, 1]


def test_last_decoder_layer_has_only_q_and_k():
    model = tiny_model()
    last = model.head.decoders[0].layers[-1]
    assert sorted(name for name, _ in last.named_parameters()) == ["k.bias", "k.weight", "q.bias", "q.weight"]


def test_stage_past_encoder_depth_is_rejected():
    with pytest.raises(ValueError, match="encoder depth"):
        tiny_model(stages=[(6, 8), (9, 13)])


def test_tap_init_clip_copies_ln_post_and_proj_and_random_is_the_default():
    clip_init = tiny_model(tap_init="clip").encoder
    for j in range(len(clip_init.tap_blocks)):
        assert torch.equal(clip_init.tap_proj[j], clip_init.proj)
        assert torch.equal(clip_init.tap_norms[j].weight, clip_init.ln_post.weight)
    random_init = tiny_model().encoder
    assert random_init.tap_blocks == (6, 7, 8, 9, 10, 11)
    assert not torch.equal(random_init.tap_proj[0], random_init.proj)
