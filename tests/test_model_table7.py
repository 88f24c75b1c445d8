"""Table 7's multi-decoder variants: three decoders on the last block, or on one fusion of blocks 6-12."""

import typing

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.experiments import ABLATIONS
from pipeline.model import VARIANTS
from pipeline.model.aggregation import PlainSum, SingleBlock
from pipeline.model.head import relationship_descriptor
from pipeline.model.tools import model_info
from tests.tiny import class_embeddings, images, tiny_model

TABLE7 = ["multi_decoder_last", "multi_decoder_fusion"]


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def with_equal_decoders(model):
    """The model with every stage's decoder and text projection a copy of stage 0's."""
    for decoder, proj in zip(model.head.decoders[1:], model.head.text_projs[1:]):
        decoder.load_state_dict(model.head.decoders[0].state_dict())
        proj.load_state_dict(model.head.text_projs[0].state_dict())
    return model


def test_model_config_accepts_every_registered_variant():
    assert set(typing.get_args(ModelConfig.model_fields["variant"].annotation)) == set(VARIANTS)


@pytest.mark.parametrize("variant", TABLE7)
def test_table7_variant_returns_input_size_logits_from_three_decoders(variant):
    model = tiny_model(variant=variant).eval()
    out = model(images(2, 32), class_embeddings(5))
    assert out.logits.shape == (2, 5, 32, 32)
    assert len(out.layer_logits) == 3 and len(model.head.decoders) == 3 and len(model.head.text_projs) == 3
    assert all(len(layers) == 3 and all(m.shape == (2, 5, 4, 4) for m in layers) for layers in out.layer_logits)
    # the output is the sum of the three decoders' masks, as in the cascade
    summed = torch.nn.functional.interpolate(sum(out.stage_logits), size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(out.logits, summed, atol=1e-6)


def test_multi_decoder_last_feeds_every_decoder_the_last_block():
    model = tiny_model(variant="multi_decoder_last").eval()
    assert model.stages == [(12, 12)] * 3
    assert model.encoder.tap_blocks == ()  # nothing but the last block is computed
    assert all(isinstance(agg, SingleBlock) for agg in model.head.aggregators)
    out = with_equal_decoders(model)(images(1, 32), class_embeddings(4))
    assert torch.equal(out.stage_logits[0], out.stage_logits[1]) and torch.equal(out.stage_logits[0], out.stage_logits[2])


def test_multi_decoder_fusion_feeds_every_decoder_one_sum_of_the_cascade_blocks():
    model = tiny_model(variant="multi_decoder_fusion").eval()
    assert model.stages == [(6, 12)] * 3
    assert model.encoder.tap_blocks == (6, 7, 8, 9, 10, 11)  # the blocks Cascade-CLIP uses, tapped once
    assert all(isinstance(agg, PlainSum) for agg in model.head.aggregators)
    out = with_equal_decoders(model)(images(1, 32), class_embeddings(4))
    assert torch.equal(out.stage_logits[0], out.stage_logits[1]) and torch.equal(out.stage_logits[0], out.stage_logits[2])
    # the fused feature is the sum of the seven blocks' features
    features = model.encoder(images(1, 32))
    fused = sum(features.blocks[b] for b in range(6, 13))
    queries = model.head.text_projs[0](relationship_descriptor(class_embeddings(4), features.global_embedding))
    assert torch.allclose(model.head.decoders[0](queries, fused)[-1].unflatten(-1, (4, 4)), out.stage_logits[0], atol=1e-6)


@pytest.mark.parametrize("variant", TABLE7)
def test_table7_variant_has_cascade_parameters_less_the_nga_weights(variant):
    cascade, other = tiny_model(variant="cascade"), tiny_model(variant=variant)
    nga = sum(p.numel() for agg in cascade.head.aggregators for p in agg.parameters())
    assert nga == 6  # two stages of three blocks
    assert trainable(other) == trainable(cascade) - nga
    for part in ("decoders", "text_projs"):
        assert sum(p.numel() for p in getattr(other.head, part).parameters()) == sum(
            p.numel() for p in getattr(cascade.head, part).parameters()
        )
    assert sum(p.numel() for p in other.encoder.prompts.parameters()) == sum(p.numel() for p in cascade.encoder.prompts.parameters())


@pytest.mark.parametrize("variant", TABLE7)
def test_paper_size_table7_counts(variant):
    info = model_info("coco", variant, image_size=512)
    assert info["params_trainable"] == 23_117_574 - 6  # Table 7: "equivalent parameter amounts"
    assert info["params_by_part"]["head"] == 23_117_574 - 6 - info["params_by_part"]["prompts"]
    assert info["nga_initial_weights"] == [None, None, None]


def test_model_info_command_accepts_the_table7_variants(capsys):
    assert main(["model-info", "--preset", "coco", "--variant", "multi_decoder_fusion"]) == 0
    assert "23,117,568" in capsys.readouterr().out


def test_ablation_grids_reference_only_registered_variants():
    tables = yaml.safe_load(ABLATIONS.read_text())
    used = {row["model.variant"] for table in tables.values() for row in table["rows"].values() if "model.variant" in row}
    assert used <= set(VARIANTS), used - set(VARIANTS)
    table7 = [row.get("model.variant", "cascade") for row in tables["table7"]["rows"].values()]
    assert sorted(table7) == ["cascade", "multi_decoder_fusion", "multi_decoder_last"]
